"""Charsets: every text a run of bytes may be read as, labels taken as hints, never as facts.

The readings of a body, in order:

* a byte order mark's (UTF-8, UTF-16 and UTF-32, LE and BE);
* the declared charset's, believed alone only when the bytes bear it out: clean UTF-8 without
  NULs, an ASCII body in an ASCII-compatible charset, or any other charset that decodes
  without an error into text that reads as text (and bytes that are not UTF-8);
* otherwise UTF-8 (strict: it is what it is; else its runs of three or more valid characters,
  so that one bad byte, or a binary header, does not hide the rest) and, unless the bytes look
  binary, every CJK code page (GB18030, Big5, CP932/Shift_JIS, EUC-JP, CP949/EUC-KR) —
  scanning each costs less than guessing wrong, and only bodies that are not UTF-8 pay for it;
* UTF-16 and UTF-32 (LE, BE) without a BOM when their letters read as text;
* the 7-bit encodings a UTF-8 reading would take literally: ISO-2022-JP/KR (escape sequences),
  HZ (``~{``) and UTF-7 (``+…-`` runs).
"""

from __future__ import annotations

import codecs
import re
from functools import lru_cache

BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),  # before UTF-16 LE: it starts with the same two bytes
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)
LEGACY: tuple[str, ...] = ("gb18030", "big5", "cp932", "euc_jp", "cp949")
WIDE: tuple[str, ...] = ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
UTF8_RUNS = "utf-8-runs"  # pseudo-codec: the valid UTF-8 runs of text that is not clean UTF-8
BINARY_RUNS = "binary-runs"  # the same, of bytes that look binary

_UNICODE_FAMILY = {
    "utf-8": "utf-8",
    "utf-8-sig": "utf-8",
    "utf-16": "utf-16",
    "utf-16-le": "utf-16",
    "utf-16-be": "utf-16",
    "utf-32": "utf-32",
    "utf-32-le": "utf-32",
    "utf-32-be": "utf-32",
}
_CONTROL_BYTES = bytes([*range(0x09), *range(0x0E, 0x20)])
# What real text is made of; a binary read as UTF-16 has about 60 % of it, text over 80 %.
_IMPLAUSIBLE = re.compile("[^\t\n\r\x20-\x7e\u2000-\u27bf\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]")
_TEXT_RUN = re.compile("[^\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]{3,}")
_UTF7_RUN = re.compile(rb"\+[A-Za-z0-9+/]{2,64}-")  # bounded: a base64 blob must stay cheap
SAMPLE = 8192


@lru_cache(maxsize=256)
def codec_name(label: str) -> str:
    """The Python codec for a charset label, "" when there is none (or it is not text)."""
    name = label.strip().strip("\"'").lower()
    if not name:
        return ""
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return ""
    # Bytes-to-bytes codecs (base64, zlib, rot13...) are not charsets: decode() refuses them.
    return info.name if getattr(info, "_is_text_encoding", True) else ""


@lru_cache(maxsize=256)
def _ascii_compatible(codec: str) -> bool:
    try:
        return "Az09 <>=&\n".encode(codec) == b"Az09 <>=&\n"
    except (UnicodeError, LookupError):
        return False


def looks_binary(sample: bytes) -> bool:
    """More than 5 % control bytes: not text in any single-byte-based charset."""
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    return controls > len(sample) // 20


def _samples(data: bytes, size: int = SAMPLE) -> list[bytes]:
    """The head, middle and tail of ``data``: a binary header must not decide for the rest."""
    if len(data) <= 2 * size:
        return [data[: 2 * size]]
    mid = len(data) // 2
    return [data[:size], data[mid : mid + size], data[-size:]]


def textual(data: bytes) -> bool:
    return any(not looks_binary(s) for s in _samples(data))


def plausible_text(text: str) -> bool:
    """Mostly printable ASCII, CJK, Hangul, punctuation and full-width forms."""
    return len(_IMPLAUSIBLE.findall(text)) <= 0.2 * len(text)


def all_plausible(text: str) -> bool:
    """Every character a plausible one (for short texts, where 80 % proves nothing)."""
    return _IMPLAUSIBLE.search(text) is None


def _wide_plausible(data: bytes, codec: str) -> bool:
    unit = 4 if "32" in codec else 2
    if unit == 4 and b"\x00" not in data[:SAMPLE]:
        return False  # UTF-32 of any text has zero bytes
    for sample in _samples(data):
        sample = sample[: len(sample) - len(sample) % unit]
        if sample and plausible_text(sample.decode(codec, "replace")):
            return True
    return False


def binary_runs(data: bytes, ascii_run: int = 3) -> str:
    """The runs of three or more valid UTF-8 characters in ``data``, one a line; with
    ``ascii_run`` above 3, a run of ASCII only must be that long (a run holding any other
    character is kept whole). Random bytes are a run of ASCII every few bytes: dropping the
    short ones makes the text of a 32 MiB binary a few KB instead of 13 MB."""
    pattern = _TEXT_RUN if ascii_run <= 3 else _long_ascii_runs(ascii_run)
    return "\n".join(pattern.findall(data.decode("utf-8", "replace")))


@lru_cache(maxsize=16)
def _long_ascii_runs(ascii_run: int) -> re.Pattern[str]:
    # Linear: the first branch starts at a run of enough ASCII and takes the rest of the run if
    # something not ASCII follows; the second starts where that is not so and needs a character
    # that is not ASCII within the run (its lazy scan ends at the run's end).
    char = "[^\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
    ascii_char = "[\t\n\r\x20-\x7e]"
    other = "[^\ufffd\x00-\x7f]"
    return re.compile(
        f"{ascii_char}{{{ascii_run},}}(?:{char}*{other}{char}*)?"
        f"|(?={char}{{3}}){char}*?{other}{char}*"
    )


def _bom(data: bytes) -> tuple[str, int] | None:
    for prefix, codec in BOMS:
        if data.startswith(prefix):
            return codec, len(prefix)
    return None


def _believable(declared: str, data: bytes, text: str) -> bool:
    """The declared charset's clean reading is all there is to read."""
    if "\x00" in text:
        return False  # NULs in text: UTF-16/32 declared as something else
    if declared == "utf-8":
        return True
    if _ascii_compatible(declared) and data.isascii():
        return True
    sample = text[:SAMPLE]
    if not plausible_text(sample):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False  # UTF-8 bytes (not ASCII) declared as something else


def readings(data: bytes, charset: str = "") -> list[tuple[str, int, str | None]]:
    """(codec, bytes to skip, text if already decoded) for every reading of ``data``."""
    out: list[tuple[str, int, str | None]] = []
    done: set[str] = set()

    def add(codec: str, skip: int = 0, text: str | None = None) -> None:
        if codec not in done:
            done.add(codec)
            out.append((codec, skip, text))

    declared = codec_name(charset) if charset else ""
    bom = _bom(data)
    if bom:
        add(bom[0], bom[1])
        if not declared or _UNICODE_FAMILY.get(declared) == _UNICODE_FAMILY[bom[0]]:
            return out + _seven_bit(data, done)  # a BOM is what every reader goes by
    if declared:
        try:
            text = data.decode(declared)
        except UnicodeDecodeError:
            add(declared)
        else:
            add(declared, 0, text)
            if _believable(declared, data, text):
                return out + _seven_bit(data, done)
    if "utf-8" not in done:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            add("utf-8", 0, text)
            if "\x00" not in text:
                return out + _seven_bit(data, done)
    # UTF-8 that is not clean: its text runs (one bad byte must not hide the rest, nor a binary
    # header the text behind it). Runs, not the whole text with replacement characters: a
    # mojibake reading is expensive to scan, and the runs are all it can hold of a marker.
    if textual(data):
        add(UTF8_RUNS)
        for codec in LEGACY:
            add(codec)
    else:
        add(BINARY_RUNS)
    for codec in WIDE:
        if codec not in done and _wide_plausible(data, codec):
            unit = 4 if "32" in codec else 2
            add(codec, 0, data[: len(data) - len(data) % unit].decode(codec, "replace"))
    return out + _seven_bit(data, done)


def _seven_bit(data: bytes, done: set[str]) -> list[tuple[str, int, str | None]]:
    """7-bit encodings of CJK text read as ASCII by every other reading."""
    found = []
    # One byte first (memchr, 100 times faster than a two-byte search): most texts have none.
    if b"\x1b" in data and (b"\x1b$" in data or b"\x1b(" in data):
        found.append("iso2022_kr" if b"\x1b$)C" in data else "iso2022_jp_2")
    if b"~" in data and b"~{" in data:
        found.append("hz")
    if b"+" in data and b"-" in data and data.isascii() and _UTF7_RUN.search(data):
        found.append("utf-7")
    if found and not data.isascii() and not textual(data):
        return []  # two bytes that happen to be ESC $ in a binary are no text
    return [(codec, 0, None) for codec in found if codec not in done]


def decode_as(data: bytes, codec: str, skip: int = 0) -> str:
    if codec in (UTF8_RUNS, BINARY_RUNS):
        return binary_runs(data)
    return data[skip:].decode(codec, "replace")


def texts_of(data: bytes, charset: str = "") -> list[str]:
    """Every text ``data`` may be (see the module docstring), the declared reading first."""
    return [
        text if text is not None else decode_as(data, codec, skip)
        for codec, skip, text in readings(data, charset)
    ]
