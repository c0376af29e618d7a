"""Decode: undoes everything that hides text in a request body, yielding the texts to scan.

Content-Encoding (gzip, deflate, br, zstd, stacked), multipart (every part and file,
recursively), url-encoded forms, JSON (every string), XML/HTML, plain text in any charset
(declared, else BOM, UTF-8, and both GB18030 and Big5 when neither is declared), base64 blocks
and data: URLs, zip and the formats built on it (docx/xlsx/pptx, ODF), and PDF text (pypdf).

A ``Budget`` bounds what one body may cost: expanded bytes, nesting depth, parts and seconds.
Crossing it raises ``Unscannable`` with the reason; the caller decides the verdict.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import json
import mimetypes
import re
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy as email_policy
from email.parser import BytesParser
from html import unescape

import brotli
import zstandard

MiB = 1024 * 1024


class Unscannable(Exception):
    """The body cannot be fully scanned (too big, too deep, too slow, encrypted, broken)."""


@dataclass
class Budget:
    max_expanded: int = 64 * MiB
    max_depth: int = 5
    max_parts: int = 5000
    max_seconds: float = 10.0
    base64_min: int = 64
    expanded: int = 0
    parts: int = 0
    deadline: float = field(default=0.0)

    def __post_init__(self) -> None:
        if not self.deadline:
            self.deadline = time.monotonic() + self.max_seconds

    def charge(self, n: int) -> None:
        self.expanded += n
        if self.expanded > self.max_expanded:
            raise Unscannable(f"expands to more than {self.max_expanded} bytes")
        if time.monotonic() > self.deadline:
            raise Unscannable(f"took longer than {self.max_seconds:g} s")

    def part(self, depth: int) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise Unscannable(f"more than {self.max_parts} parts")
        if depth > self.max_depth:
            raise Unscannable(f"nested deeper than {self.max_depth} levels")
        if time.monotonic() > self.deadline:
            raise Unscannable(f"took longer than {self.max_seconds:g} s")


# --- content-encoding ------------------------------------------------------------------------


def _bounded_zlib(data: bytes, wbits: int, budget: Budget) -> bytes:
    d = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    while pending:
        room = budget.max_expanded - budget.expanded - len(out) + 1
        chunk = d.decompress(pending, max(room, 1))
        out += chunk
        if len(out) > budget.max_expanded - budget.expanded:
            raise Unscannable(f"expands to more than {budget.max_expanded} bytes")
        pending = d.unconsumed_tail
        if d.eof or (not chunk and not pending):
            break
    budget.charge(len(out))
    return bytes(out)


def _brotli(data: bytes, budget: Budget) -> bytes:
    d = brotli.Decompressor()
    out = bytearray()
    for i in range(0, len(data), 256):  # small input steps keep each step's output bounded
        out += d.process(data[i : i + 256])
        if len(out) > budget.max_expanded - budget.expanded:
            raise Unscannable(f"expands to more than {budget.max_expanded} bytes")
    budget.charge(len(out))
    return bytes(out)


def _zstd(data: bytes, budget: Budget) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
    room = budget.max_expanded - budget.expanded
    out = reader.read(room + 1)
    if len(out) > room:
        raise Unscannable(f"expands to more than {budget.max_expanded} bytes")
    budget.charge(len(out))
    return out


def undo_content_encoding(data: bytes, header: str, budget: Budget) -> bytes:
    """Undo a (possibly stacked) Content-Encoding, last applied first."""
    for coding in reversed([c.strip().lower() for c in header.split(",") if c.strip()]):
        try:
            if coding in ("gzip", "x-gzip"):
                data = _bounded_zlib(data, 16 + zlib.MAX_WBITS, budget)
            elif coding == "deflate":
                try:
                    data = _bounded_zlib(data, zlib.MAX_WBITS, budget)
                except zlib.error:
                    data = _bounded_zlib(data, -zlib.MAX_WBITS, budget)  # raw deflate
            elif coding == "br":
                data = _brotli(data, budget)
            elif coding == "zstd":
                data = _zstd(data, budget)
            elif coding != "identity":
                raise Unscannable(f"unknown content-encoding {coding!r}")
        except (zlib.error, brotli.error, zstandard.ZstdError) as e:
            raise Unscannable(f"broken {coding} content-encoding: {e}") from None
    return data


# --- charsets --------------------------------------------------------------------------------


def _param(content_type: str, name: str) -> str:
    m = re.search(rf";\s*{name}\s*=\s*\"?([^\";]+)", content_type, re.IGNORECASE)
    return m.group(1).strip() if m else ""


_MEDIA_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"ID3", b"OggS", b"fLaC")
_CONTROL_BYTES = bytes([*range(0x09), *range(0x0E, 0x20)])


def looks_binary(sample: bytes) -> bool:
    """More than 5 % control bytes: not text in any single-byte-based charset."""
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    return controls > len(sample) // 20


def texts_of(data: bytes, charset: str = "") -> list[str]:
    """The text(s) bytes may be: the declared charset, else BOM, else UTF-8, else every one of
    GB18030, Big5 and (even length) UTF-16 LE/BE: scanning each costs less than guessing wrong,
    and only bodies that are not UTF-8 pay it."""
    if charset:
        try:
            return [data.decode(charset, "replace")]
        except LookupError:
            pass  # an unknown charset name: sniff instead
    if data.startswith(b"\xef\xbb\xbf"):
        return [data[3:].decode("utf-8", "replace")]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return [data.decode("utf-16", "replace")]
    try:
        return [data.decode("utf-8")]
    except UnicodeDecodeError:
        pass
    sample = data[:8192]
    candidates = [] if looks_binary(sample) else ["gb18030", "big5"]
    if len(data) % 2 == 0:  # Chinese UTF-16 without a BOM looks binary too: check its letters
        candidates += [
            c
            for c in ("utf-16-le", "utf-16-be")
            if _plausible_text(sample[: len(sample) & ~1].decode(c, "replace"))
        ]
    return [data.decode(c, "replace") for c in candidates]


def _plausible_text(text: str) -> bool:
    """Mostly printable ASCII, CJK and full-width forms: real text, not a binary decoded."""
    ok = sum(
        1
        for ch in text
        if " " <= ch <= "~"
        or ch in "\t\r\n"
        or "\u3000" <= ch <= "\u9fff"
        or "\uff00" <= ch <= "\uffef"
    )
    return ok >= 0.8 * len(text)


_ESCAPED_RUN = re.compile(rb"(?:%[0-9A-Fa-f]{2})+")


def unquote_plus(data: bytes) -> bytes:
    """Percent-decoding at C speed (urllib.parse makes a Python call per byte, 5 ms for a
    100 KB Chinese form): %XX become \\xXX for the codec's escape decoder; a body with a
    stray % falls back to one regex match per run of escapes."""
    plus = data.replace(b"+", b" ")
    try:
        return codecs.escape_decode(plus.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]
    except ValueError:
        return _ESCAPED_RUN.sub(
            lambda m: bytes.fromhex(m.group().replace(b"%", b"").decode()), plus
        )


def form_fields(data: bytes, charset: str = "") -> list[list[tuple[str, str]]]:
    """A url-encoded form's fields; the percent-escapes are bytes in the form's charset:
    declared, else UTF-8, else both GB18030 and Big5."""
    pairs = [field.partition(b"=") for field in data.split(b"&") if field]
    raw = [(unquote_plus(k), unquote_plus(v)) for k, _, v in pairs]

    def decoded(encoding: str, errors: str) -> list[tuple[str, str]]:
        return [(k.decode(encoding, errors), v.decode(encoding, errors)) for k, v in raw]

    if charset:
        try:
            return [decoded(charset, "replace")]
        except LookupError:
            pass
    try:
        return [decoded("utf-8", "strict")]
    except UnicodeDecodeError:
        return [decoded(enc, "replace") for enc in ("gb18030", "big5")]


_BLOCK_END = re.compile(
    r"</(?:w:p|a:p|text:p|text:h|p|div|li|tr|h\d|si|title)\s*>|<(?:w:br|br|w:tab|text:line-break)"
    r"\b[^>]*>",
    re.IGNORECASE,
)
_TAG = re.compile(r"<[^>]*>")


def markup_text(text: str) -> str:
    """Text of XML/HTML: block ends become line breaks (for line-start markers), tags go,
    entities are resolved, so a marker split across runs (<w:t>机</w:t><w:t>密</w:t>) joins."""
    return unescape(_TAG.sub("", _BLOCK_END.sub("\n", text)))


# --- the walk --------------------------------------------------------------------------------

_B64_BLOCK = re.compile(r"[A-Za-z0-9+/_-]{64,}={0,2}")
_DATA_URL = re.compile(r"data:[\w.+-]*/?[\w.+-]*(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)
_OFFICE_TEXT_PARTS = (".xml", ".rels", ".vml")


def _b64(block: str) -> bytes | None:
    try:
        if "-" in block or "_" in block:
            return base64.urlsafe_b64decode(block + "=" * (-len(block) % 4))
        return base64.b64decode(block + "=" * (-len(block) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


class Walker:
    def __init__(self, budget: Budget):
        self.budget = budget

    def body(self, data: bytes, content_type: str, content_encoding: str) -> Iterator[str]:
        data = undo_content_encoding(data, content_encoding, self.budget)
        yield from self.blob(data, content_type, 0)

    def blob(self, data: bytes, content_type: str, depth: int, name: str = "") -> Iterator[str]:
        self.budget.part(depth)
        if name:
            yield name  # file names carry markers too ("机密★合同.docx")
        mime = content_type.split(";", 1)[0].strip().lower()
        if not mime and name:
            mime = (mimetypes.guess_type(name)[0] or "").lower()
        charset = _param(content_type, "charset")
        head = data[:8]
        if mime.startswith("multipart/"):
            yield from self.multipart(data, content_type, depth)
        elif head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            yield from self.archive(data, depth)
        elif head.startswith(b"%PDF-"):
            yield from self.pdf(data)
        elif head.startswith((b"Rar!\x1a\x07", b"7z\xbc\xaf\x27\x1c")):
            # Archives we cannot open: what they carry cannot be checked.
            raise Unscannable("RAR/7z archive (contents cannot be inspected)")
        elif head.startswith(_MEDIA_MAGIC) or mime.startswith(("image/", "video/", "audio/")):
            return  # pictures and media carry no text to scan
        elif head.startswith(b"\x1f\x8b"):
            yield from self.blob(undo_content_encoding(data, "gzip", self.budget), "", depth + 1)
        elif mime == "application/x-www-form-urlencoded":
            for pairs in form_fields(data, charset):
                for key, value in pairs:
                    yield from self.value(key, depth)
                    yield from self.text(value, "", depth)  # values carry JSON, HTML, base64
        else:
            for text in texts_of(data, charset):
                yield from self.text(text, mime, depth)

    def text(self, text: str, mime: str, depth: int) -> Iterator[str]:
        stripped = text.lstrip()[:1]
        if "json" in mime or ((not mime or mime == "text/plain") and stripped in ("{", "[")):
            try:
                yield from self.json_strings(json.loads(text), depth)
                return
            except ValueError:
                pass  # not JSON after all: scan it as text
        if "xml" in mime or "html" in mime or stripped == "<":
            yield markup_text(text)
            yield from self.embedded(text, depth)  # data: URLs live in attributes
            return
        yield from self.value(text, depth)

    def value(self, text: str, depth: int) -> Iterator[str]:
        """A piece of text, and whatever is base64-encoded inside it."""
        yield text
        yield from self.embedded(text, depth)

    def embedded(self, text: str, depth: int) -> Iterator[str]:
        """Base64 blocks and data: URLs inside a text, decoded and walked."""
        if len(text) < self.budget.base64_min:
            return
        for m in _DATA_URL.finditer(text):
            block = _B64_BLOCK.match(text, m.end())
            if block and (raw := _b64(block.group())) is not None:
                self.budget.charge(len(raw))
                yield from self.blob(raw, m.group()[5:].split(";")[0], depth + 1)
        for m in _B64_BLOCK.finditer(text):
            raw = _b64(m.group())
            if raw is not None:
                self.budget.charge(len(raw))
                yield from self.blob(raw, "", depth + 1)

    def json_strings(self, obj: object, depth: int) -> Iterator[str]:
        stack = [obj]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                yield from (
                    self.text(item, "", depth + 1)
                    if item[:1] in ("{", "[", "<")
                    else self.value(item, depth)
                )
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)

    def multipart(self, data: bytes, content_type: str, depth: int) -> Iterator[str]:
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = BytesParser(policy=email_policy.HTTP).parsebytes(head + data)
        if not message.is_multipart():
            raise Unscannable("broken multipart body")
        for part in message.walk():
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True) or b""
            self.budget.charge(len(payload))
            yield from self.blob(
                payload, str(part.get("Content-Type", "")), depth + 1, part.get_filename() or ""
            )

    def archive(self, data: bytes, depth: int) -> Iterator[str]:
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError) as e:
            raise Unscannable(f"broken zip archive: {e}") from None
        with zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if info.flag_bits & 0x1:
                    raise Unscannable(f"encrypted archive member {info.filename!r}")
                self.budget.part(depth + 1)
                room = self.budget.max_expanded - self.budget.expanded
                if info.file_size > room:
                    raise Unscannable(f"expands to more than {self.budget.max_expanded} bytes")
                try:
                    with zf.open(info) as member:
                        content = member.read(room + 1)
                except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
                    raise Unscannable(f"unreadable archive member: {e}") from None
                self.budget.charge(len(content))
                name = info.filename
                if name.lower().endswith(_OFFICE_TEXT_PARTS):
                    yield name
                    for text in texts_of(content):
                        yield markup_text(text)
                else:
                    yield from self.blob(content, "", depth + 1, name)

    def pdf(self, data: bytes) -> Iterator[str]:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise Unscannable("encrypted PDF")
            for page in reader.pages:
                self.budget.part(0)
                text = page.extract_text() or ""
                self.budget.charge(len(text))
                yield text
            info = reader.metadata
            if info:
                yield "\n".join(str(v) for v in info.values())
        except (PdfReadError, ValueError, KeyError, TypeError) as e:
            raise Unscannable(f"unreadable PDF: {e}") from None


def extract_texts(
    data: bytes, content_type: str = "", content_encoding: str = "", budget: Budget | None = None
) -> Iterator[str]:
    """Every text inside a request body. Raises Unscannable when the budget is exceeded."""
    return Walker(budget or Budget()).body(data, content_type, content_encoding)
