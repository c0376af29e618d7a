"""Scan: finds secret markers in text — normalization, the Aho-Corasick automaton, marker rules.

The fast path never normalizes the whole text. Instead the automaton holds every spelling a
marker may take (simplified and traditional characters, full- and half-width punctuation and
brackets, optional separators), the text is lowercased as UTF-8 bytes (ASCII only, at memory
speed), and one pass of ``Automaton.iter`` finds markers. The characters that hide a marker
(zero-width and other format characters, soft hyphens, full-width Latin letters) are in the
automaton too, as sentinels: only a text that contains one takes the slow path (NFKC, format
characters removed, casefolded) and is scanned again. Plain text pays for one pass.

Matches never leave this module as text: callers get marker ids and levels.
"""

from __future__ import annotations

import hashlib
import itertools
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import ahocorasick

from .selector import Selector

Action = Literal["log", "alert", "block"]
ACTION_RANK: dict[str, int] = {"": 0, "log": 1, "alert": 2, "block": 3}
Context = Literal["any", "line_start", "line"]

# Characters that are the same letter to a reader. Only what markers use needs to be here:
# the automaton holds the combinations, the text is never rewritten.
EQUIVALENT: tuple[str, ...] = (
    "绝絕",
    "机機",
    "秘祕",
    "级級",
    "业業",
    "内內",
    "资資",
    "注註",
    "长長",
    "务務",
    "护護",
    "【[［〔〖",
    "】]］〕〗",
    "：:︰∶",
    "（(",
    "）)",
)
# A space in a pattern: nothing, a space, an ideographic space, or a comma/enumeration mark.
SEPARATORS: tuple[str, ...] = ("", " ", "\u3000", "，", ",", "、")
MAX_VARIANTS = 4096

_CLASS_OF: dict[str, str] = {ch: group for group in EQUIVALENT for ch in group}

# Characters that can hide a marker from a plain match. Invisible ones are deleted by the slow
# path; full-width Latin letters are folded by its NFKC. Their presence is what sends a text
# down the slow path.
_INVISIBLE: frozenset[str] = frozenset(
    {chr(c) for c in range(0x10000) if unicodedata.category(chr(c)) == "Cf"}
    | {"\u034f", "\u115f", "\u1160", "\u3164", "\uffa0"}  # joiners and fillers outside Cf
    | {chr(c) for c in range(0xFE00, 0xFE10)}  # variation selectors
)
_FULL_WIDTH_LATIN = frozenset(chr(c) for c in (*range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)))
_HIDERS = _INVISIBLE | _FULL_WIDTH_LATIN
_DELETE = dict.fromkeys(map(ord, _INVISIBLE))


def lower_ascii(text: str) -> str:
    """ASCII-lowercase a str at memory speed (via UTF-8 bytes; str.lower is 10x slower)."""
    return text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


def normalize_slow(text: str) -> str:
    """The full normalization, for texts with hiding characters: format characters removed,
    NFKC (full-width → ASCII and other compatibility forms), lowercased."""
    return unicodedata.normalize("NFKC", text.translate(_DELETE)).lower()


def spellings(pattern: str) -> list[str]:
    """Every spelling of a pattern the automaton must know (lowercased)."""
    options: list[Sequence[str]] = []
    for ch in pattern.lower():
        if ch == " ":
            options.append(SEPARATORS)
        else:
            options.append(tuple(_CLASS_OF.get(ch, ch)))
    count = 1
    for opts in options:
        count *= len(opts)
    if count > MAX_VARIANTS:
        raise ValueError(
            f"pattern {pattern!r} has {count} spellings (limit {MAX_VARIANTS}); "
            "use fewer spaces or split it"
        )
    return sorted({"".join(combo) for combo in itertools.product(*options) if "".join(combo)})


@dataclass(frozen=True)
class Marker:
    id: str
    level: str
    action: Action
    patterns: tuple[str, ...]
    context: Context = "any"


@dataclass(frozen=True)
class Hit:
    marker_id: str
    level: str
    action: Action


_MARKER, _SUPPRESS = 0, 1
# Partial matches one pass may verify before the text counts as built to stall the scanner
# (plus one per 100 characters): ordinary text has a few per megabyte.
CANDIDATE_BASE = 20_000


class TooManyCandidates(Exception):
    """Text made of marker fragments (密密密…): scanning it fully would take minutes."""


_LINE_LEAD = frozenset(" \t\u3000•·-–—*#>0123456789.、)）(（")


_LINE_TAIL = frozenset(
    " \t\u3000★☆0123456789０１２３４５６７８９年月日个長长期永久.,;:!?，。；：！？、)）】]-–—*"
)


def _alone_on_line(text: str, end: int) -> bool:
    """Only a period form, punctuation or space follows on the line ("核心商密★10年")."""
    i = end + 1
    while i < len(text) and text[i] not in "\n\r":
        if text[i] not in _LINE_TAIL:
            return False
        i += 1
    return True


def _at_line_start(text: str, start: int) -> bool:
    i = start - 1
    while i >= 0 and text[i] not in "\n\r":
        if text[i] not in _LINE_LEAD:
            return False
        i -= 1
    return True


_NOT_ANCHORS = frozenset(" \t\u3000，,、：:.-/[]【】［］〔〕〖〗()（）★☆0123456789")
_ASCII_RARITY = {ch: i for i, ch in enumerate("etaoinsrhldcumfpgwybvkxjqz")}
_FULL_WIDTH = {ch: chr(ord(ch) - 0x20 + 0xFF21 - 0x21) for ch in "abcdefghijklmnopqrstuvwxyz"}


def choose_anchors(keys: Iterable[str]) -> dict[str, int]:
    """Where each key is entered into the automaton.

    ``Automaton.iter`` pays at every character of the text for the number of distinct first
    characters of its keys (the root's children are searched linearly). So keys are entered
    from an *anchor* onwards, chosen greedily so that few anchor characters cover every key
    (密 covers most Chinese markings), at its last occurrence so the entered part is short;
    the part before the anchor is verified only when the rest has matched. Ties go to the
    rarer character.
    """
    remaining = set(keys)
    anchors: dict[str, int] = {}
    while remaining:
        coverage: dict[str, int] = {}
        for key in remaining:
            for ch in set(key) - _NOT_ANCHORS:
                coverage[ch] = coverage.get(ch, 0) + 1
        if not coverage:  # keys made only of punctuation: enter them whole
            anchors.update(dict.fromkeys(remaining, 0))
            break
        best = max(coverage, key=lambda c: (coverage[c], _ASCII_RARITY.get(c, 13)))
        for key in [k for k in remaining if best in k]:
            anchors[key] = key.rindex(best)  # the last one: a short entered part
            remaining.discard(key)
    return anchors


@dataclass
class MarkerSet:
    """The compiled markers and suppress phrases of a policy: one automaton."""

    markers: tuple[Marker, ...]
    suppress: tuple[str, ...] = ()
    max_pattern: int = 0
    digest: str = ""  # of the markers and suppress phrases: equal content, equal digest
    _automaton: ahocorasick.Automaton = field(default_factory=ahocorasick.Automaton, repr=False)

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(repr((self.markers, self.suppress)).encode()).hexdigest()
        # (kind, index, spelling) for every spelling of every marker and suppress phrase
        spelled: list[tuple[int, int, str]] = [
            (_MARKER, i, sp)
            for i, m in enumerate(self.markers)
            for p in m.patterns
            for sp in spellings(p)
        ] + [
            (_SUPPRESS, i, sp) for i, phrase in enumerate(self.suppress) for sp in spellings(phrase)
        ]
        anchors = choose_anchors(sp for _, _, sp in spelled)
        # Per entered key: the entries with nothing before the anchor, and the others grouped
        # by the length and text of what must precede it, so a match costs one dict lookup
        # per prefix length, not one comparison per spelling (密 ends hundreds of them).
        plain: dict[str, list[tuple[int, int]]] = {}
        before: dict[str, dict[int, dict[str, list[tuple[int, int]]]]] = {}
        for kind, idx, spelling in spelled:
            at = anchors[spelling]
            suffix = spelling[at:]
            if at:
                table = before.setdefault(suffix, {}).setdefault(at, {})
                table.setdefault(spelling[:at], []).append((kind, idx))
            else:
                plain.setdefault(suffix, []).append((kind, idx))
            self.max_pattern = max(self.max_pattern, len(spelling))
        a = self._automaton
        for key in plain.keys() | before.keys():
            tables = tuple(
                (n, {p: tuple(e) for p, e in t.items()})
                for n, t in sorted(before.get(key, {}).items())
            )
            longest = max((n for n, _ in tables), default=0)
            a.add_word(key, (False, len(key), tuple(plain.get(key, ())), tables, longest))
        # Sentinels: a hiding character right after part of an entered key means the text may
        # hide a marker there; and a full-width form of an anchor letter may spell one.
        keys = plain.keys() | before.keys()
        sentinels = {key[:j] + h for key in keys for j in range(1, len(key)) for h in _INVISIBLE}
        sentinels |= {
            f
            for ch in {k[0] for k in keys}
            if ch in _FULL_WIDTH
            for f in (_FULL_WIDTH[ch], _FULL_WIDTH[ch].upper())
        }
        for key in sentinels - keys:
            a.add_word(key, (True, 1, (), (), 0))
        a.make_automaton()

    def _pass(self, text: str, skip_before: int) -> tuple[set[int], bool]:
        """One pass over lowercased text: marker indexes found, and whether something that can
        hide a marker was seen. Matches ending before ``skip_before`` were reported by an
        earlier window. Raises TooManyCandidates on text built to make matching slow."""
        found: list[tuple[int, int, int]] = []  # (start, end, marker index)
        spans: list[tuple[int, int]] = []  # suppress phrases
        hidden = False
        candidates = 0
        limit = CANDIDATE_BASE + len(text) // 100

        def record(start: int, end: int, kind: int, idx: int) -> None:
            if kind == _SUPPRESS:
                spans.append((start, end))
            elif end >= skip_before:
                found.append((start, end, idx))

        for end, (is_hider, length, plain, tables, longest) in self._automaton.iter(text):
            if is_hider:
                hidden = True
                continue
            candidates += 1
            if candidates > limit:
                raise TooManyCandidates(f"more than {limit} partial marker matches")
            anchor = end - length + 1
            for kind, idx in plain:
                record(anchor, end, kind, idx)
            if not tables:
                continue
            for n, table in tables:
                if n <= anchor and (hit := table.get(text[anchor - n : anchor])):
                    for kind, idx in hit:
                        record(anchor - n, end, kind, idx)
            if not hidden:  # something invisible before the anchor may hide a longer marker
                hidden = not _INVISIBLE.isdisjoint(text[max(0, anchor - 2 * longest - 8) : anchor])
        result: set[int] = set()
        for start, end, idx in found:
            context = self.markers[idx].context
            if context != "any" and not _at_line_start(text, start):
                continue
            if context == "line" and not _alone_on_line(text, end):
                continue
            if any(s <= end and start <= e for s, e in spans):  # a suppress phrase overlaps
                continue
            result.add(idx)
        return result, hidden

    def find_utf8(self, raw: bytes) -> set[int]:
        """Markers in UTF-8 bytes: lowercased as bytes, decoded once, one pass."""
        return self.find(raw.lower().decode("utf-8", "replace"), lowered=True)

    def find(self, text: str, *, lowered: bool = False, skip_before: int = 0) -> set[int]:
        """Marker indexes in ``text``. ``lowered``: the caller already ASCII-lowercased it."""
        if not lowered:
            text = lower_ascii(text)
        found, hidden = self._pass(text, skip_before)
        if hidden:
            # Rare: something hides characters. Normalize everything and look again.
            again, _ = self._pass(normalize_slow(text), 0)
            found |= again
        return found

    def hits(self, indexes: Iterable[int]) -> list[Hit]:
        return [
            Hit(self.markers[i].id, self.markers[i].level, self.markers[i].action)
            for i in sorted(indexes)
        ]


class StreamScanner:
    """Scans text that arrives in pieces (a streamed body): each window keeps the tail of the
    previous one, so a marker split across chunks is still found, and found once."""

    def __init__(self, markers: MarkerSet, keep: int = 512):
        self.markers = markers
        self.keep = max(keep, markers.max_pattern * 2)
        self.tail = ""
        self.found: set[int] = set()

    def feed(self, text: str) -> set[int]:
        window = self.tail + lower_ascii(text)
        try:
            new = self.markers.find(window, lowered=True, skip_before=len(self.tail)) - self.found
        except TooManyCandidates:
            new = set()  # the end-of-body verdict of an over-size body is `unscannable` anyway
        self.found |= new
        self.tail = window[-self.keep :]
        return new


# --- marker rules → verdict --------------------------------------------------------------------


@dataclass(frozen=True)
class ScanLimits:
    max_body: int = 32 * 1024 * 1024  # bodies up to this are decoded whole; larger: text only
    max_expanded: int = 64 * 1024 * 1024
    max_depth: int = 5
    max_seconds: float = 10.0


@dataclass(frozen=True)
class MarkerOverride:
    id: str
    selector: Selector
    actions: tuple[tuple[str, Action], ...]  # level → action
    unscannable: Action | None


@dataclass(frozen=True)
class Verdict:
    action: Action | Literal[""]  # "" when nothing matched
    hits: tuple[Hit, ...] = ()  # with the action in force for each
    unscannable: str = ""  # why the body could not be fully scanned
    override_id: str = ""

    @property
    def rule_id(self) -> str:
        """The id logged as the rule: the strongest hit's marker, or scan.unscannable."""
        top = max(self.hits, key=lambda h: ACTION_RANK[h.action], default=None)
        if top is not None and ACTION_RANK[top.action] >= ACTION_RANK[self.action]:
            return top.marker_id
        return "scan.unscannable" if self.unscannable else ""

    @property
    def level(self) -> str:
        top = max(self.hits, key=lambda h: ACTION_RANK[h.action], default=None)
        return top.level if top else ""


@dataclass(frozen=True)
class MarkerPolicy:
    markers: MarkerSet = field(default_factory=lambda: MarkerSet(()))
    unscannable: Action = "block"
    limits: ScanLimits = field(default_factory=ScanLimits)
    overrides: tuple[MarkerOverride, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.markers.markers)

    def verdict(
        self,
        found: Iterable[int],
        unscannable: str,
        user: str,
        groups: tuple[str, ...],
        host: str,
        category: str,
    ) -> Verdict:
        """The action for what a scan found, with the first applying override in force."""
        override = next(
            (o for o in self.overrides if o.selector.applies(user, groups, host, category)), None
        )
        actions = dict(override.actions) if override else {}
        hits = tuple(
            Hit(h.marker_id, h.level, actions.get(h.level, h.action))
            for h in self.markers.hits(found)
        )
        action: str = max((h.action for h in hits), key=ACTION_RANK.__getitem__, default="")
        if unscannable:
            fallback = (
                override.unscannable if override and override.unscannable else self.unscannable
            )
            action = max(action, fallback, key=ACTION_RANK.__getitem__)
        return Verdict(action, hits, unscannable, override.id if override else "")  # type: ignore[arg-type]


@dataclass
class ScanResult:
    found: set[int]
    unscannable: str = ""


def scan_body(
    markers: MarkerSet, data: bytes, content_type: str, content_encoding: str, limits: ScanLimits
) -> ScanResult:
    """Decode a whole body and find markers in every text inside it."""
    from .decode import Budget, Unscannable, Walker

    budget = Budget(
        max_expanded=limits.max_expanded, max_depth=limits.max_depth, max_seconds=limits.max_seconds
    )
    found: set[int] = set()
    try:
        for text in Walker(budget).body(data, content_type, content_encoding):
            found |= markers.find(text)
    except Unscannable as e:
        return ScanResult(found, str(e))
    except TooManyCandidates as e:
        return ScanResult(found, f"pathological text: {e}")
    return ScanResult(found)


# --- worker processes -------------------------------------------------------------------------
# Large bodies are scanned in a process pool (``runtime.scanpool``): workers build a policy's
# automaton once and keep it under the marker set's content digest, so a reloaded policy is
# never scanned with an older one's automaton.

_WORKER_SETS: dict[str, MarkerSet] = {}


def scan_in_worker(
    digest: str,
    markers: tuple[Marker, ...],
    suppress: tuple[str, ...],
    data: bytes | str,
    content_type: str,
    content_encoding: str,
    limits: ScanLimits,
) -> ScanResult:
    """Scan ``data`` (a body, or the path of a file holding it) with the marker set whose
    content digest is ``digest``."""
    marker_set = _WORKER_SETS.get(digest)
    if marker_set is None:
        _WORKER_SETS.clear()
        marker_set = _WORKER_SETS[digest] = MarkerSet(markers, suppress)
    if isinstance(data, str):
        with open(data, "rb") as f:
            data = f.read()
    return scan_body(marker_set, data, content_type, content_encoding, limits)
