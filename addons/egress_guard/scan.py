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

import itertools
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import ahocorasick

Action = Literal["log", "alert", "block"]
ACTION_RANK: dict[str, int] = {"": 0, "log": 1, "alert": 2, "block": 3}
Context = Literal["any", "line_start"]

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


_MARKER, _SUPPRESS, _HIDER = 0, 1, 2
_LINE_LEAD = frozenset(" \t\u3000•·-–—*#>0123456789.、)）(（")


def _at_line_start(text: str, start: int) -> bool:
    i = start - 1
    while i >= 0 and text[i] not in "\n\r":
        if text[i] not in _LINE_LEAD:
            return False
        i -= 1
    return True


@dataclass
class MarkerSet:
    """The compiled markers and suppress phrases of a policy: one automaton."""

    markers: tuple[Marker, ...]
    suppress: tuple[str, ...] = ()
    max_pattern: int = 0
    _automaton: ahocorasick.Automaton = field(default_factory=ahocorasick.Automaton, repr=False)

    def __post_init__(self) -> None:
        a = self._automaton
        entries: dict[str, list[tuple[int, int, int]]] = {}
        for i, marker in enumerate(self.markers):
            for pattern in marker.patterns:
                for spelling in spellings(pattern):
                    entries.setdefault(spelling, []).append((_MARKER, i, len(spelling)))
        for i, phrase in enumerate(self.suppress):
            for spelling in spellings(phrase):
                entries.setdefault(spelling, []).append((_SUPPRESS, i, len(spelling)))
        for ch in _HIDERS:
            entries.setdefault(ch, []).append((_HIDER, 0, 1))
        for key, values in entries.items():
            a.add_word(key, tuple(values))
            self.max_pattern = max(self.max_pattern, len(key))
        a.make_automaton()

    def _pass(self, text: str, skip_before: int) -> tuple[set[int], bool]:
        """One pass over lowercased text: marker indexes found, and whether a hider was seen.
        Matches ending before ``skip_before`` were reported by an earlier window."""
        found: list[tuple[int, int, int]] = []  # (start, end, marker index)
        spans: list[tuple[int, int]] = []  # suppress phrases
        hidden = False
        for end, values in self._automaton.iter(text):
            for kind, idx, length in values:
                if kind == _HIDER:
                    hidden = True
                elif kind == _SUPPRESS:
                    spans.append((end - length + 1, end))
                elif end >= skip_before:
                    found.append((end - length + 1, end, idx))
        result: set[int] = set()
        for start, end, idx in found:
            if self.markers[idx].context == "line_start" and not _at_line_start(text, start):
                continue
            if any(s <= end and start <= e for s, e in spans):  # a suppress phrase overlaps
                continue
            result.add(idx)
        return result, hidden

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
        new = self.markers.find(window, lowered=True, skip_before=len(self.tail)) - self.found
        self.found |= new
        self.tail = window[-self.keep :]
        return new
