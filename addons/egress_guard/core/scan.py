"""Scan: finds secret markers in text — normalization, the Aho-Corasick automaton, marker rules.

The fast path never normalizes the whole text. Instead the automaton holds every spelling a
marker may take (simplified and traditional characters, full- and half-width punctuation and
brackets, optional separators), the text is lowercased as UTF-8 bytes (ASCII only, at memory
speed), and one pass of ``Automaton.iter`` finds markers. What can hide a marker from that pass
is detected cheaply, and only a text that has it takes the slow path (invisible characters
removed, NFKC, lowercased, confusable letters folded) and is scanned again:

- invisible characters (every format character and Default_Ignorable code point of the BMP) and
  look-alikes of a marker's characters (Kangxi radicals and compatibility ideographs such as ⼼
  for 心, full-width, circled and Cyrillic letters, small-form and vertical punctuation) right
  after part of an entered key: sentinels in the automaton; before a matched key's anchor: a
  look at the few characters there; around a match whose context did not hold: the same look;
- a look-alike of an anchor character itself (where keys are entered): full-width ones are
  sentinels at the root; the others (circled, letter-like, Cyrillic) are found by a
  memchr-gated search of the UTF-8 bytes, as root children would slow every character;
- characters outside the BMP that hide or fold (tag characters, the variation selectors
  supplement, musical and shorthand format controls, mathematical letters, enclosed and
  compatibility-supplement ideographs): the same byte search, before the pass.

Plain text pays for one pass and a few memchr calls.

Matches never leave this module as text: callers get marker ids and levels.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import ahocorasick

from .selector import Selector

Action = Literal["log", "alert", "block"]
ACTION_RANK: dict[str, int] = {"": 0, "log": 1, "alert": 2, "block": 3}
Context = Literal["any", "line_start", "line", "label"]

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
    # Black five-pointed stars: the national mark ★ to a reader.
    "★⭑🟊",
    # Other stars, triangles and asterisks stand in for ★ when it is typed by hand (机密*5年) or
    # avoided on purpose (companies may not use the national mark: 核心商密▲5年). They are also
    # decoration (我的小秘密☆), so a pattern spelled with one belongs in the "label" context.
    "☆✩✭✮✯✰✪✫✬⋆⭐⭒🌟▲△*＊",
)
# A space in a pattern: nothing, a space, an ideographic space, or a comma/enumeration mark.
SEPARATORS: tuple[str, ...] = ("", " ", "\u3000", "，", ",", "、")
MAX_VARIANTS = 4096

_CLASS_OF: dict[str, str] = {ch: group for group in EQUIVALENT for ch in group}


def _format_characters(*planes: range) -> set[str]:
    return {chr(c) for plane in planes for c in plane if unicodedata.category(chr(c)) == "Cf"}


# Characters a reader does not see: every format character (Cf) and every Default_Ignorable
# code point (Unicode DerivedCoreProperties: Hangul fillers, the combining grapheme joiner,
# Khmer inherent vowels, Mongolian variation selectors, variation selectors, tag characters,
# the variation selectors supplement, reserved ignorables). Cf also lies in planes 1 and 14.
_IGNORABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
_HIDDEN: frozenset[str] = frozenset(
    _format_characters(range(0x10000), range(0x10000, 0x20000), range(0xE0000, 0xE1000))
    | {chr(c) for lo, hi in _IGNORABLE_RANGES for c in range(lo, hi + 1)}
)
# The BMP ones are sentinels in the automaton; the others are found in the bytes (_ASTRAL).
_INVISIBLE: frozenset[str] = frozenset(ch for ch in _HIDDEN if ord(ch) < 0x10000)
_DELETE = dict.fromkeys(map(ord, _HIDDEN))

# Letters that look the same but NFKC keeps apart: Cyrillic and Greek letters shaped like
# Latin ones (small letters only: the slow path folds them after lowercasing), the katakana
# prolonged sound mark and the CJK stroke that are 一 to a reader, the radicals-supplement
# forms of 長/长.
_CONFUSABLE = str.maketrans(
    {
        "а": "a", "в": "b", "с": "c", "е": "e", "һ": "h", "н": "h", "і": "i", "ј": "j",
        "к": "k", "м": "m", "о": "o", "р": "p", "ѕ": "s", "т": "t", "х": "x", "у": "y",
        "α": "a", "β": "b", "ε": "e", "η": "h", "ι": "i", "κ": "k", "μ": "m", "ν": "n",
        "ο": "o", "ρ": "p", "τ": "t", "χ": "x",
        "ー": "一", "㇐": "一", "⻑": "長", "⻓": "长",
    }
)  # fmt: skip

# Outside the BMP, by UTF-8 lead bytes: planes 12-15 (F3: tag characters, the variation
# selectors supplement, private use) always; in plane 1 and 2 (F0) the musical format
# controls and mathematical letters (U+1D000-1DFFF), the shorthand format controls, the
# Egyptian and Brahmi format characters, enclosed letters and ideographs (U+1F100-1F17F,
# U+1F200-1F27F) and the compatibility ideographs supplement (U+2F800-2FA1F). A text with one
# takes the slow path; the regular expression has a literal first byte, so it runs at memchr
# speed over text that has none.
_ASTRAL_ALWAYS = b"\xf3"
_ASTRAL = re.compile(
    rb"\xf0(?:\x9d|\x9b\xb2|\x91\x82\xbd|\x91\x83\x8d|\x93\x90[\xb0-\xbf]"
    rb"|\x9f[\x84\x85\x88\x89]|\xaf[\xa0-\xa8])"
)
# UTF-8 lead bytes of characters that fill Chinese text (CJK, kana and CJK punctuation,
# full-width forms): a look-alike with one of these is a root sentinel, as a byte search for
# it would stop at nearly every character. Others are found by a byte search.
_COMMON_LEADS = frozenset((0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEF))


def lower_ascii(text: str) -> str:
    """ASCII-lowercase a str at memory speed (via UTF-8 bytes; str.lower is 10x slower)."""
    return text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


def normalize_slow(text: str) -> str:
    """The full normalization, for texts with hiding characters: invisible characters removed,
    NFKC (full-width → ASCII, ⼼ → 心 and other compatibility forms), lowercased, confusable
    letters folded (Cyrillic о → o)."""
    return unicodedata.normalize("NFKC", text.translate(_DELETE)).lower().translate(_CONFUSABLE)


@functools.cache
def _folds() -> dict[str, str]:
    """Every BMP character (not ASCII, not invisible) the slow path changes → what it becomes.
    Built once (about 65 000 normalizations) when the first marker set is compiled."""
    out: dict[str, str] = {}
    for cp in range(0x80, 0x10000):
        if 0xD800 <= cp < 0xE000:
            continue
        ch = chr(cp)
        if ch not in _INVISIBLE and (folded := normalize_slow(ch)) and folded != ch:
            out[ch] = folded
    return out


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


# --- contexts ---------------------------------------------------------------------------------

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


# The "label" context: how a grade stands on a document (核心商密★10年, （一级商密）,
# 密级：核心商密, 二级商密 保密期限：3年, a cell or a first line "普通商密 供应商名单") as against
# how a text talks about grades ("公司将商业秘密分为核心商密和普通商密两级管理",
# "核心商密管理办法").
_SPACE = frozenset(" \t\u3000\xa0")
_LABEL_GAP = _SPACE | frozenset("|｜-–—/·•")  # between a label's parts: "核心商密 | 10年"
_STARS = frozenset("".join(g for g in EQUIVALENT if "★" in g or "☆" in g))
# Typed asterisks are also Markdown emphasis (**核心商密**): they count as a star only before a
# protection period.
_HAND_STARS = frozenset("*＊")
_OPENERS = frozenset("（(【[［〔〖")  # not 《》 (titles) nor quotes (a word being talked about)
_CLOSERS = frozenset("）)】]］〕〗")
_COLONS = frozenset("：:︰∶")
_LABEL_END = _CLOSERS | _COLONS | frozenset("\n\r")
# What may follow a protection period that makes a label: the end of the line or of a bracket,
# a gap. Not a comma or more words: "核心商密5年、普通商密3年" and "核心商密长期处于保护之下"
# are prose.
_PERIOD_END = _SPACE | _CLOSERS | frozenset("\n\r|｜/")
_NUM = "0-9０-９〇○零一二三四五六七八九十两百"
_GAP_RE = "[ \\t\\u3000\\xa0]*"
# A protection period: "5年", "保密期限：长期", "保密期限至2030年12月31日", "一年", "公布前".
_PERIOD = re.compile(
    f"(?:保密期限|保密期)?{_GAP_RE}[：:︰∶]?{_GAP_RE}(?:至|到)?{_GAP_RE}"
    f"(?:[{_NUM}]+{_GAP_RE}(?:年|个月|個月|月|日|天)(?:[{_NUM}]+{_GAP_RE}(?:月|日|号))*(?:前|止)?"
    "|长期|長期|永久|公布前|解密前)"
)
# Characters the context rules read as they are: look-alikes of these are what hides a context.
_CONTEXT_CHARS = (
    frozenset(
        "0123456789０１２３４５６７８９〇○零一二三四五六七八九十两百年个個月日天号长長期永久公布前解保密限至到止"
    )
    | _LINE_LEAD
    | _LINE_TAIL
    | _LABEL_GAP
    | _STARS
    | _OPENERS
    | _CLOSERS
    | _COLONS
)


def _label_start(text: str, start: int) -> bool:
    """Where a label begins: the start of a line (or cell), right after an opening bracket,
    right after a field's colon (密级：, 保密等级：)."""
    if _at_line_start(text, start):
        return True
    i = start - 1
    while i >= 0 and text[i] in _SPACE:
        i -= 1
    return i >= 0 and (text[i] in _OPENERS or text[i] in _COLONS)


def _is_label(text: str, start: int, end: int) -> bool:
    """A match standing as a label. Anywhere: followed by a protection period that ends there
    (核心商密 保密期限：5年, 秘密☆10年, 核心商密（保密期限：3年）). At a label's start
    (_label_start): followed by the end of the line, a colon, a closing bracket, a star, or a
    gap before a title (核心商密 关于……) — not by more of a word (核心商密管理办法)."""
    n = len(text)
    i = end + 1
    while i < n and text[i] in _LABEL_GAP:
        i += 1
    gap = i > end + 1
    starred = text[end] in _STARS  # the pattern itself ends in a star variant (秘密☆)
    by_hand = text[end] in _HAND_STARS
    if i < n and text[i] in _STARS:
        starred, by_hand = True, by_hand or text[i] in _HAND_STARS
        i += 1
        while i < n and text[i] in _SPACE:
            i += 1
    j = i + 1 if i < n and text[i] in _OPENERS else i
    period = _PERIOD.match(text, j)
    if period and (period.end() >= n or text[period.end()] in _PERIOD_END):
        return True
    if by_hand or not _label_start(text, start):
        return False
    return starred or gap or i >= n or text[i] in _LABEL_END


def _whole_word(text: str, start: int, end: int) -> bool:
    """A marker that begins or ends with a Latin letter matches whole words only:
    "CONFIDENTIALITY NOTICE" is not "confidential", "top secretary" is not "top secret"."""
    after = text[end + 1 : end + 2]
    before = text[start - 1 : start] if start else ""
    return not (
        (_latin_letter(text[end]) and _latin_letter(after))
        or (_latin_letter(text[start]) and _latin_letter(before))
    )


def _latin_letter(ch: str) -> bool:
    return ch.isascii() and ch.isalpha()


def _in_context(text: str, start: int, end: int, context: str) -> bool:
    if context == "any":
        return True
    if context == "label":
        return _is_label(text, start, end)
    return _at_line_start(text, start) and (context != "line" or _alone_on_line(text, end))


_NOT_ANCHORS = frozenset(" \t\u3000，,、：:.-/[]【】［］〔〕〖〗()（）★☆0123456789")
_ASCII_RARITY = {ch: i for i, ch in enumerate("etaoinsrhldcumfpgwybvkxjqz")}


def choose_anchors(keys: Iterable[str], avoid: Container[str] = ()) -> dict[str, int]:
    """Where each key is entered into the automaton.

    ``Automaton.iter`` pays at every character of the text for the number of distinct first
    characters of its keys (the root's children are searched linearly). So keys are entered
    from an *anchor* onwards, chosen greedily so that few anchor characters cover every key
    (密 covers most Chinese markings), at its last occurrence so the entered part is short;
    the part before the anchor is verified only when the rest has matched. Ties go to a
    character not in ``avoid`` (one with look-alikes, which must then be watched for at the
    root), then to the rarer character.
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
        best = max(
            sorted(coverage),
            key=lambda c: (coverage[c], c not in avoid, _ASCII_RARITY.get(c, 13)),
        )
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
    # The shortest spelling of ASCII only: a binary's ASCII runs shorter than it hold no
    # marker (a longer marker spelled with a non-ASCII character is in a run kept whole).
    shortest_ascii: int = 0
    digest: str = ""  # of the markers and suppress phrases: equal content, equal digest
    _automaton: ahocorasick.Automaton = field(default_factory=ahocorasick.Automaton, repr=False)
    # Characters that, near a match, may hide a longer marker or the match's context.
    _near: frozenset[str] = field(default=frozenset(), repr=False)
    # (lead byte, pattern): look-alikes of anchor characters found in the bytes, not the root.
    _gates: tuple[tuple[bytes, re.Pattern[bytes]], ...] = field(default=(), repr=False)

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
        # Look-alikes: characters the slow path turns into characters of a spelling without
        # being one themselves (⼼ → 心, ﹕ → :, NO-BREAK SPACE → space); and, for contexts,
        # into characters the context rules read (⽉ → 月, ． → .).
        letters = {ch for _, _, sp in spelled for ch in sp}
        context = letters | _CONTEXT_CHARS
        folds = _folds()
        looks = {x: f for x, f in folds.items() if x not in letters and f[0] in letters}
        self._near = (
            _INVISIBLE
            | frozenset(looks)
            | {x for x, f in folds.items() if x not in context and f[0] in context}
        )
        anchors = choose_anchors((sp for _, _, sp in spelled), set(looks.values()))
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
        ascii_lengths = [len(sp) for kind, _, sp in spelled if kind == _MARKER and sp.isascii()]
        self.shortest_ascii = min(ascii_lengths, default=self.max_pattern + 1)
        a = self._automaton
        keys = plain.keys() | before.keys()
        for key in keys:
            tables = tuple(
                (n, {p: tuple(e) for p, e in t.items()})
                for n, t in sorted(before.get(key, {}).items())
            )
            longest = max((n for n, _ in tables), default=0)
            a.add_word(key, (False, len(key), tuple(plain.get(key, ())), tables, longest))
        # Sentinels: an invisible character or a look-alike right after part of an entered key
        # means the text may hide a marker there. A look-alike of the anchor itself is a root
        # sentinel only if its bytes are common in Chinese text; the others are byte searches.
        by_first: dict[str, list[tuple[str, str]]] = {}
        for x, f in looks.items():
            by_first.setdefault(f[0], []).append((x, f))
        sentinels: set[str] = set()
        gated: dict[int, set[bytes]] = {}
        for key in keys:
            for j in range(len(key)):
                alike = [x for x, f in by_first.get(key[j], ()) if key.startswith(f, j)]
                if j:
                    sentinels.update(key[:j] + h for h in itertools.chain(_INVISIBLE, alike))
                    continue
                for x in alike:
                    raw = x.encode()
                    if raw[0] in _COMMON_LEADS:
                        sentinels.add(x)
                    else:
                        gated.setdefault(raw[0], set()).add(raw)
        for key in sentinels - keys:
            a.add_word(key, (True, 1, (), (), 0))
        a.make_automaton()
        self._gates = tuple(
            (
                bytes([lead]),
                re.compile(
                    re.escape(bytes([lead]))
                    + b"(?:"
                    + b"|".join(re.escape(r[1:]) for r in sorted(raws))
                    + b")"
                ),
            )
            for lead, raws in sorted(gated.items())
        )

    def _outside(self, raw: bytes) -> bool:
        """Whether the UTF-8 bytes hold a character the automaton does not watch for but that
        may hide a marker: outside the BMP (tag characters, mathematical letters, ...), or a
        look-alike of an anchor character. memchr first: plain text costs a few scans at
        memory speed."""
        if _ASTRAL_ALWAYS in raw or (b"\xf0" in raw and _ASTRAL.search(raw)):
            return True
        return any(lead in raw and pattern.search(raw) for lead, pattern in self._gates)

    def _pass(self, text: str, skip_before: int) -> tuple[set[int], bool]:
        """One pass over lowercased text: marker indexes found, and whether something that can
        hide a marker was seen. Matches ending before ``skip_before`` were reported by an
        earlier window. Raises TooManyCandidates on text built to make matching slow."""
        found: list[tuple[int, int, int]] = []  # (start, end, marker index)
        spans: list[tuple[int, int]] = []  # suppress phrases
        hidden = False
        near = self._near
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
            if not hidden:  # something hidden before the anchor may hide a longer marker
                hidden = not near.isdisjoint(text[max(0, anchor - 2 * longest - 8) : anchor])
        result: set[int] = set()
        for start, end, idx in found:
            if not _whole_word(text, start, end):
                continue
            if not _in_context(text, start, end, self.markers[idx].context):
                # A context read through an invisible character or a look-alike
                # ("核心商密\u200b：", "（一级商密﹚") is read again by the slow path.
                hidden = hidden or not near.isdisjoint(text[max(0, start - 16) : end + 33])
                continue
            if any(s <= end and start <= e for s, e in spans):  # a suppress phrase overlaps
                continue
            result.add(idx)
        return result, hidden

    def find_utf8(self, raw: bytes) -> set[int]:
        """Markers in UTF-8 bytes: lowercased as bytes, decoded once, one pass."""
        return self._find(raw.lower().decode("utf-8", "replace"), self._outside(raw), 0)

    def find(self, text: str, *, lowered: bool = False, skip_before: int = 0) -> set[int]:
        """Marker indexes in ``text``. ``lowered``: the caller already ASCII-lowercased it."""
        raw = text.encode("utf-8", "surrogatepass")
        if not lowered:
            text = raw.lower().decode("utf-8", "surrogatepass")
        return self._find(text, self._outside(raw), skip_before)

    def _find(self, text: str, outside: bool, skip_before: int) -> set[int]:
        found, hidden = self._pass(text, skip_before)
        if hidden or outside:
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
        self.tail_outside = False  # the tail holds a character only the slow path can read
        self.found: set[int] = set()

    def feed(self, text: str) -> set[int]:
        raw = text.encode("utf-8", "surrogatepass")
        window = self.tail + raw.lower().decode("utf-8", "surrogatepass")
        outside = self.tail_outside or self.markers._outside(raw)
        try:
            new = self.markers._find(window, outside, len(self.tail)) - self.found
        except TooManyCandidates:
            new = set()  # the end-of-body verdict of an over-size body is `unscannable` anyway
        self.found |= new
        self.tail = window[-self.keep :]
        self.tail_outside = self.markers._outside(self.tail.encode("utf-8", "surrogatepass"))
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
    exception_id: str = ""  # an approved exception that lowered a level's action

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
        walker = Walker(budget, ascii_run=markers.shortest_ascii)
        for text in walker.body(data, content_type, content_encoding):
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
