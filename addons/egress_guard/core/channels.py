"""Channels outside the body: the request target (path and query) and the request headers and
cookies, as the texts a receiving server could read from them.

A marking in a query string, a path segment, a header or a cookie leaves just as surely as one
in a body, so every request's head is scanned before anything of it is forwarded. What a
server decodes is decoded here too: percent-escapes (repeatedly, since double encoding is
undone by some servers), ``+`` as a space in queries, and the encodings the body decoders undo
inside a value (base64, JSON, ``data:`` URLs). ``head_findings`` says in which channel each
marker was found, so the request log can store that channel redacted: the log never keeps the
text a marker matched.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from .decode import Unscannable, extract_texts
from .scan import MarkerSet, TooManyCandidates

MAX_HEAD_TEXT = 256 * 1024  # a head is bounded upstream (64 KiB per HTTP/1 head); so is this
_DECODE_ROUNDS = 3  # %2525 → %25 → % : servers that decode twice are not rare


_PERCENT_U = re.compile(r"%u([0-9A-Fa-f]{4})")  # IIS and old JavaScript escape(): %u673A
_HEAD_CHARSETS = ("gb18030", "big5")  # what a Chinese client sends undeclared, besides UTF-8


def _readings(raw: bytes) -> Iterator[str]:
    """The texts bytes may be in a head: UTF-8, else every plausible Chinese charset (a query
    as Baidu sends it is GBK percent-encoded; a header may carry raw GBK bytes)."""
    try:
        yield raw.decode("utf-8")
        return
    except UnicodeDecodeError:
        yield raw.decode("utf-8", "replace")
    for charset in _HEAD_CHARSETS:
        yield raw.decode(charset, "replace")


def _percent_decoded(raw: str) -> Iterator[str]:
    """``raw`` and each distinct percent-decoding of it, in every plausible charset, with
    ``%uXXXX`` escapes resolved too; up to ``_DECODE_ROUNDS`` deep."""
    layer = [raw]
    seen = {raw}
    yield raw
    for _ in range(_DECODE_ROUNDS):
        following = []
        for text in layer:
            if "%" not in text and "+" not in text:
                continue
            text = _PERCENT_U.sub(lambda m: chr(int(m.group(1), 16)), text)
            raw_bytes = unquote_to_bytes(text.replace("+", " "))
            for decoded in _readings(raw_bytes):
                if decoded not in seen:
                    seen.add(decoded)
                    following.append(decoded)
                    yield decoded
        if not following:
            return
        layer = following


def _raw_header_readings(value: str) -> Iterator[str]:
    """A header value mitmproxy read as UTF-8 with surrogate escapes: the bytes it really
    held, in the other plausible charsets."""
    if value.isascii():
        return
    raw = value.encode("utf-8", "surrogateescape")
    for charset in _HEAD_CHARSETS:
        yield raw.decode(charset, "replace")


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")  # a marker in base64: 12+ characters
_CONTAINER_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"%PDF-", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def _base64(token: str) -> bytes | None:
    try:
        if "-" in token or "_" in token:
            return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _deep(data: bytes, content_type: str = "") -> Iterator[str]:
    try:
        yield from extract_texts(data, content_type)
    except Unscannable:
        return  # too deep or too large to decode in a head: its plain text was scanned


def _inside(text: str, depth: int = 0) -> Iterator[str]:
    """What a head value carries inside it: JSON, markup, data: URLs and MIME encoded-words
    (through the body decoders), and base64 runs of any length a marker fits in. Most header
    values hold none of these, and pay one regular expression."""
    if text.lstrip()[:1] in ("{", "[", "<") or "data:" in text or "=?" in text:
        yield from _deep(text.encode("utf-8", "surrogatepass"), "text/plain")
    for token in _BASE64_RUN.findall(text):
        raw = _base64(token)
        if raw is None:
            continue
        if raw.startswith(_CONTAINER_MAGIC):
            yield from _deep(raw)
            continue
        for encoding in ("utf-8", "gb18030"):
            try:
                decoded = raw.decode(encoding)
            except UnicodeDecodeError:
                continue
            yield decoded
            if depth < 2:  # base64 of base64
                yield from _inside(decoded, depth + 1)
            break


def head_texts(target: str, headers: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(channel, text) for everything a server could read from this request's head: the
    channels are ``path``, ``query`` and ``header:<name>`` (cookies as ``header:cookie``)."""
    path, _, query = target.partition("?")
    for decoded in _percent_decoded(path):
        yield "path", decoded
        for segment in decoded.split("/"):
            for text in _inside(segment):
                yield "path", text
    if query:
        for decoded in _percent_decoded(query):
            yield "query", decoded
            for pair in decoded.split("&"):
                for text in _inside(pair.partition("=")[2]):
                    yield "query", text
    for name, value in headers:
        channel = f"header:{name.lower()}"
        yield channel, f"{name}: {value}"
        readings = [value, *_raw_header_readings(value)]
        for reading in readings[1:]:
            yield channel, reading
        for reading in readings:
            if channel == "header:cookie":
                values = [part.partition("=")[2] for part in reading.split(";")]
            else:
                values = [reading]
            for part in values:
                for n, decoded in enumerate(_percent_decoded(part)):
                    if n:  # the first is the value itself, already yielded above
                        yield channel, decoded
                    for text in _inside(decoded):
                        yield channel, text


@dataclass(frozen=True)
class HeadScan:
    found: dict[str, set[int]] = field(default_factory=dict)  # channel → markers found there
    unscannable: str = ""  # why the head could not be fully scanned

    @property
    def markers(self) -> set[int]:
        return set().union(*self.found.values()) if self.found else set()


def head_findings(markers: MarkerSet, target: str, headers: Iterable[tuple[str, str]]) -> HeadScan:
    """The markers found in each channel of a request head. A head whose texts (decodings
    included) run past ``MAX_HEAD_TEXT``, or built of marker fragments to stall the scanner,
    is ``unscannable`` — never passed unread."""
    texts = list(head_texts(target, headers))
    if sum(len(text) for _, text in texts) > MAX_HEAD_TEXT:
        return HeadScan({}, f"request head decodes to more than {MAX_HEAD_TEXT} characters")
    try:
        # One pass over all of it (the common case: nothing), then one per channel to say where.
        if not markers.find("\n".join(text for _, text in texts)):
            return HeadScan()
        found: dict[str, set[int]] = {}
        for channel, text in texts:
            if hits := markers.find(text):
                found.setdefault(channel, set()).update(hits)
    except TooManyCandidates as e:
        return HeadScan({}, f"pathological text in the request head: {e}")
    return HeadScan(found)
