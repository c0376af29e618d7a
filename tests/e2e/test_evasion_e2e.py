"""The scanner sees what the receiving server sees: evasions through the real gateway.

Every variant hides a marker of a blocking level where a receiving server would still read
it: a decoding the scanner trusts a label for or gives up on (class 1), a spelling that only
normalization reveals (class 2), a channel outside the body (class 3), or a trade-secret
grade written the way real documents write it (class 4). Benign texts (class 5) must arrive
byte for byte.

What is asserted is what a recording upstream (``recorder.py``) RECEIVED, never the status
the client got: every raw byte of every connection, and every request target, header value,
body, trailer and WebSocket payload, read the way a server could read them
(``server_texts``: any charset, percent-decoding, base64, every compression member and frame,
archives and their comments, e-mail parts, PDF annotations, fields and attachments, RTF and
JSON escapes, ...) and normalized the way a reader sees them (``human``: invisible characters
removed, NFKC, confusables, traditional forms). The marker must not be in any of them. Then
the row: decision block, reason marker, a marker of the expected level, and no column (path,
query, error, user agent, ...) may hold the marker in any of those forms.

``test_every_variant_carries_its_marker`` runs the same reading over what each variant SENDS:
a variant whose marker ``server_texts`` cannot see is a broken test, not a pass.

Variants that leak at the commit they were written against are ``xfail(strict=True)``; the
reason says what reached the upstream. A fix turns them red (XPASS) until the mark goes.
Containers the gateway may refuse instead of decoding (other compressions, e-mail, PDF
attachments) also pass on an ``unscannable`` block (rule ``scan.unscannable``).

WebSocket ping/pong/close payloads: ``test_transport_e2e.py::
test_websocket_control_frame_payload_with_marker`` (not repeated here);
marker-in-trailer of a chunked body and of HTTP/2 to an HTTP/1 upstream, the same file's
``test_chunked_body_with_trailers`` / ``test_http2_request_with_trailers_to_an_http1_upstream``;
the trailer variants here hide the marker in other ways or go HTTP/2 to HTTP/2.

Speed: one gateway for the module; every variant is sent once, in parallel, by the
``campaign`` fixture (each to a recorder of its own, so the recorder's port names its row),
then the rows are read once; each test checks its variant's results. All on 127.0.0.1, every
socket with a timeout.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import email
import email.header
import gzip
import html
import io
import json
import lzma
import re
import socket
import tarfile
import time
import unicodedata
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email import policy as email_policy
from pathlib import Path

import brotli
import pytest
import zstandard
from recorder import Recorder, TestCA
from test_transport_e2e import Findings, H2Client, read_response, tunnel, ws_exchange

from documents import (
    LEGAL_ARTICLE,
    NEWS,
    docx,
    eml,
    multipart,
    pdf_hidden,
    rtf_codepage,
    rtf_unicode,
    tar_of,
    xlsx,
    zip_commented,
    zip_of,
)
from harness import GatewayProcess
from support import policy_copy

pytestmark = pytest.mark.slow

MARK = "机密★5年"  # national_secret, block in the shipped policies/markers.yaml
TIMEOUT = 15  # every socket
NATIONAL, TRADE, ENGLISH = "national_secret", "trade_secret", "english_classified"
TEXT = f"{MARK} 内部讨论稿\n关于华东区域渠道返利的说明，请各部门参阅。\n"
TEXTB = TEXT.encode()
FILLER = "第二季度经营数据汇总，供参考。" * 8 + "\n"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


# === how a reader and a server read bytes (the recorder side) ==================================

_CONFUSABLES = {
    0x0410: "A", 0x0412: "B", 0x0421: "C", 0x0415: "E", 0x041D: "H", 0x0406: "I", 0x0408: "J",
    0x041A: "K", 0x041C: "M", 0x041E: "O", 0x0420: "P", 0x0405: "S", 0x0422: "T", 0x0425: "X",
    0x0430: "a", 0x0435: "e", 0x043E: "o", 0x0440: "p", 0x0441: "c", 0x0445: "x", 0x0443: "y",
    0x0455: "s", 0x0456: "i", 0x0458: "j", 0x0391: "A", 0x0392: "B", 0x0395: "E", 0x0397: "H",
    0x0399: "I", 0x039A: "K", 0x039C: "M", 0x039D: "N", 0x039F: "O", 0x03A1: "P", 0x03A4: "T",
    0x03A7: "X", 0x03BF: "o",
}  # fmt: skip
_TRADITIONAL = str.maketrans("機絕祕級業內資註長務護", "机绝秘级业内资注长务护")


def _hidden(ch: str) -> bool:
    """Characters a reader does not see: format characters (every plane, tag characters
    included), variation selectors (both blocks), the combining grapheme joiner."""
    n = ord(ch)
    return (
        unicodedata.category(ch) == "Cf"
        or 0xFE00 <= n <= 0xFE0F
        or 0xE0100 <= n <= 0xE01EF
        or n == 0x034F
    )


def human(text: str) -> str:
    """What a reader sees: invisible characters gone, compatibility forms folded (NFKC: full
    width, Kangxi radicals, circled and mathematical letters, presentation forms), Latin
    look-alikes and traditional forms mapped, case folded, white space runs collapsed."""
    if text.isascii():
        return re.sub(r"\s+", " ", text.casefold())
    text = "".join(ch for ch in text if not _hidden(ch))
    text = unicodedata.normalize("NFKC", text).translate(_CONFUSABLES).translate(_TRADITIONAL)
    return re.sub(r"\s+", " ", text.casefold())


CHARSETS = (
    "utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "gb18030",
    "big5", "shift_jis", "euc_jp", "iso2022_jp", "euc_kr", "utf-7",
)  # fmt: skip
MAGIC = (
    b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd", b"%PDF",
    b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf", b"x\x9c", b"x\x01", b"x\xda", b"{\\rtf",
)  # fmt: skip
_B64_TOKEN = re.compile(rb"[A-Za-z0-9+/_-]{8,}={0,2}")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_U_ESCAPE = re.compile(r"(?:\\u[0-9a-fA-F]{4})+")
_X_ESCAPE = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")
_PERCENT_U = re.compile(r"%u([0-9a-fA-F]{4})")
_RTF_U = re.compile(r"\\u(-?\d+)\??")
_RTF_HEX = re.compile(r"(?:\\'[0-9a-fA-F]{2})+")
MAX_DEPTH = 4


def _readings(data: bytes) -> Iterator[str]:
    """The bytes in every charset a server might assume (errors replaced)."""
    for charset in CHARSETS:
        with contextlib.suppress(LookupError, UnicodeError, ValueError):
            yield data.decode(charset, "replace")


def _unquoted(text: str) -> Iterator[str]:
    once = urllib.parse.unquote(text)
    yield once
    yield urllib.parse.unquote_plus(text)
    yield urllib.parse.unquote(once)  # double-encoded
    yield urllib.parse.unquote_plus(urllib.parse.unquote_plus(text))


def _json_strings(text: str) -> Iterator[str]:
    """Every key and value of a JSON text (or of each line of NDJSON), duplicate keys kept."""
    found: list[str] = []

    def keep(pairs: list[tuple[str, object]]) -> dict:
        for key, value in pairs:
            found.append(key)
            if isinstance(value, str):
                found.append(value)
            elif isinstance(value, list):
                found.extend(v for v in value if isinstance(v, str))
        return {}

    for doc in [text, *text.splitlines()]:
        with contextlib.suppress(ValueError, RecursionError):
            json.loads(doc, object_pairs_hook=keep)
    yield from found


def _u_escapes(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        raw = bytes.fromhex(m.group().replace("\\u", ""))
        return raw.decode("utf-16-be", "replace")

    return _U_ESCAPE.sub(one, text)


def _rtf(text: str) -> str:
    cp = re.search(r"\\ansicpg(\d+)", text)
    charset = f"cp{cp.group(1)}" if cp else "cp1252"

    def hexrun(m: re.Match[str]) -> str:
        raw = bytes.fromhex(m.group().replace("\\'", ""))
        try:
            return raw.decode(charset, "replace")
        except LookupError:
            return raw.decode("latin-1")

    text = _RTF_U.sub(lambda m: chr(int(m.group(1)) % 65536), text)
    return _RTF_HEX.sub(hexrun, text)


def _encoded_words(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        try:
            return str(email.header.make_header(email.header.decode_header(m.group())))
        except (ValueError, LookupError, UnicodeError):
            return m.group()

    return _ENCODED_WORD.sub(one, text)


def _x_escapes(text: str) -> str:
    """Python/C byte escapes (b'\\xe6\\x9c\\xba') as the bytes they stand for, read as UTF-8."""

    def one(m: re.Match[str]) -> str:
        return bytes.fromhex(m.group().replace("\\x", "")).decode("utf-8", "replace")

    return _X_ESCAPE.sub(one, text)


def _percent_u(text: str) -> str:
    """IIS-style %uXXXX escapes."""
    return _PERCENT_U.sub(lambda m: chr(int(m.group(1), 16)), text)


def _text_views(text: str) -> Iterator[str]:
    yield text
    if "\\x" in text:
        yield _x_escapes(text)
    if "%u" in text:
        yield _percent_u(text)
    yield html.unescape(text)
    yield from _unquoted(text)
    yield _encoded_words(text)
    yield _encoded_words(urllib.parse.unquote(text))
    if "\\u" in text:
        yield _u_escapes(text)
    if "{\\rtf" in text:
        yield _rtf(text)
    if text.lstrip()[:1] in ("{", "["):
        yield from _json_strings(text)


def _all_members(decompressor: Callable[[], object], data: bytes, limit: int = 8) -> bytes:
    """Every member of a stream of concatenated compressed members, trailing bytes kept."""
    out = b""
    for _ in range(limit):
        d = decompressor()
        try:
            out += d.decompress(data)  # type: ignore[attr-defined]
        except (zlib.error, OSError, EOFError, lzma.LZMAError):
            return out + data
        data = getattr(d, "unused_data", b"")
        if not data:
            return out
    return out + data


def _zstd_frames(data: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return reader.read(8 * 1024 * 1024)


def _interesting(data: bytes) -> bool:
    """Decoded bytes worth reading again: a known container or compression, or text."""
    if len(data) < 2:
        return False
    if data.startswith(MAGIC):
        return True
    for charset in ("utf-8", "gbk", "big5", "shift_jis", "euc_kr", "utf-16-le", "utf-16-be"):
        try:
            text = data.decode(charset)
        except UnicodeDecodeError:
            continue
        if charset == "utf-8" or sum(ch.isprintable() or ch.isspace() for ch in text) > 0.9 * len(
            text
        ):
            return True
    return False


def _decompressions(data: bytes) -> Iterator[bytes]:
    if data.startswith(b"\x1f\x8b"):
        yield _all_members(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), data)
    if data[:1] in (b"x", b"h", b"X"):
        yield _all_members(zlib.decompressobj, data)
    yield _all_members(lambda: zlib.decompressobj(-zlib.MAX_WBITS), data)
    if data.startswith(b"BZh"):
        yield _all_members(bz2.BZ2Decompressor, data)
    if data.startswith(b"\xfd7zXZ"):
        yield _all_members(lzma.LZMADecompressor, data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        with contextlib.suppress(zstandard.ZstdError):
            yield _zstd_frames(data)
    with contextlib.suppress(brotli.error):
        yield brotli.decompress(data)


def _archive(data: bytes) -> Iterator[bytes]:
    if data.startswith(b"PK"):
        broken = (zipfile.BadZipFile, ValueError, OSError, EOFError)
        with contextlib.suppress(*broken), zipfile.ZipFile(io.BytesIO(data)) as zf:
            yield zf.comment
            for info in zf.infolist()[:50]:
                yield info.filename.encode()
                yield info.comment
                with contextlib.suppress(Exception):
                    content = zf.read(info)
                    yield content
                    if info.filename.endswith(".xml"):  # Office XML: the text of it
                        yield re.sub(rb"<[^>]*>", b"", content)
    if len(data) >= 512 and data[257:262] == b"ustar":
        broken = (tarfile.TarError, OSError)
        with contextlib.suppress(*broken), tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for member in tf.getmembers()[:50]:
                yield member.name.encode()
                extracted = tf.extractfile(member)
                if extracted is not None:
                    yield extracted.read()


def _mime_parts(data: bytes) -> Iterator[bytes]:
    """A multipart body (its boundary from its first line) or an e-mail message: each part's
    headers as decoded (names, RFC 2231 / 2047 file names), each payload decoded."""
    head = data[:4096]
    message = None
    if head.startswith(b"--"):
        boundary = head[2:].split(b"\r\n", 1)[0].split(b"\n", 1)[0].strip()
        synthetic = b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n' % boundary
        message = email.message_from_bytes(synthetic + data, policy=email_policy.default)
    elif re.search(rb"(?im)^(subject|mime-version|from|content-type):", head):
        message = email.message_from_bytes(data, policy=email_policy.default)
    if message is None:
        return
    with contextlib.suppress(Exception):
        for part in message.walk():
            for key, value in part.items():
                yield f"{key}: {value}".encode()
            name = part.get_filename()
            if name:
                yield name.encode()
            if not part.is_multipart():
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    yield payload


def _pdf(data: bytes) -> Iterator[bytes]:
    if not data.startswith(b"%PDF"):
        return
    with contextlib.suppress(Exception):
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        for page in reader.pages:
            yield (page.extract_text() or "").encode()
            for annot in page.get("/Annots") or []:
                annot = annot.get_object()
                for key in ("/Contents", "/T", "/RC"):
                    if key in annot:
                        yield str(annot[key]).encode()
        for name, value in (reader.get_fields() or {}).items():
            yield f"{name}: {value.get('/V', '')}".encode()
        for name, contents in reader.attachments.items():
            yield name.encode()
            yield from contents
        if reader.metadata:
            yield "\n".join(str(v) for v in reader.metadata.values()).encode()


def _children(data: bytes) -> Iterator[bytes]:
    """What a server can unwrap from the bytes: decompressed members, base64 tokens (lines
    joined, as MIME wraps them), percent-decoded bytes, archive members and comments, MIME
    parts, PDF annotations/fields/attachments."""
    yield from _decompressions(data)
    yield from _archive(data)
    yield from _mime_parts(data)
    yield from _pdf(data)
    if b"%" in data:
        yield urllib.parse.unquote_to_bytes(data)
    joined = re.sub(rb"(?:\r?\n|\\r\\n|\\n)[ \t]*", b"", data)
    tokens: dict[bytes, None] = {}
    for source in (data, joined):
        for m in _B64_TOKEN.finditer(source):
            tokens.setdefault(m.group(), None)
    for token in list(tokens)[:200]:
        padded = token + b"=" * (-len(token) % 4)
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            with contextlib.suppress(ValueError, TypeError):
                yield decode(padded)


def server_texts(data: bytes, depth: int = 0) -> Iterator[str]:
    """Every text a receiving server could make of ``data``."""
    if not data:
        return
    for reading in _readings(data):
        yield from _text_views(reading)
    if depth >= MAX_DEPTH:
        return
    seen: set[bytes] = set()
    for child in _children(data):
        if child and child != data and child not in seen and _interesting(child):
            seen.add(child)
            yield from server_texts(child, depth + 1)


def find_in(needle: str, data: bytes) -> str | None:
    """The reading of ``data`` in which a reader sees ``needle`` (None: in none)."""
    want = human(needle)
    for text in server_texts(data):
        if want in human(text):
            return text
    return None


# === variants ==================================================================================


@dataclass(frozen=True)
class Variant:
    id: str
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    encoding: str = ""  # Content-Encoding
    target: str = "/upload"  # path and query as sent (non-ASCII goes out as UTF-8)
    headers: tuple[tuple[str, str | bytes], ...] = ()  # bytes: sent as they are
    method: str = "POST"
    transport: str = "h1"  # h1 | chunked | h2 (to an HTTP/1 upstream) | h2-h2 | ws
    trailers: tuple[tuple[str, str], ...] = ()
    frames: tuple[tuple[str, bytes, bool], ...] = ()  # ws: (text|binary, payload, finished)
    needle: str = MARK  # the marking as a reader sees it
    level: str = NATIONAL
    expect: str = "block"  # block | allow | alert
    unscannable_ok: bool = False  # an unscannable block is as good as finding the marker

    def sent_components(self) -> list[bytes]:
        """Everything the client sends that a server reads."""
        parts = [self.target.encode(), self.body, *(p for _, p, _ in self.frames)]
        parts.append(b"".join(p for _, p, _ in self.frames))  # a message sent in fragments
        return parts + [_header_line(k, v) for k, v in (*self.headers, *self.trailers)]


def _header_line(name: str, value: str | bytes) -> bytes:
    return name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())


def _mp(
    parts: list[tuple[str, str, str, bytes]], extra_part_headers: str = ""
) -> tuple[bytes, str]:
    body, ctype = multipart(parts)
    if extra_part_headers:
        body = body.replace(b"\r\n\r\n", f"\r\n{extra_part_headers}\r\n\r\n".encode(), 1)
    return body, ctype


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _mime_lines(data: bytes) -> str:
    encoded = _b64(data)
    return "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def _pct(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _interleave(text: str, hider: str) -> str:
    return hider.join(text)


STRADDLE = ("x" * 50 + TEXT + FILLER * 3).encode()  # the marker crosses base64 line 1 → 2
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
JAPANESE = "機密★5年 社外秘 取扱注意\n新製品の価格表を送付します。\n"
KOREAN = "機密★5年 대외비\n신제품 가격표를 보내드립니다.\n"
MP_IMAGE_TEXT = _mp([("photo", "scan.png", "image/png", TEXTB)])
MP_JPG_NAME = _mp([("photo", "photo.jpg", "", TEXTB)])
MP_IMAGE_DOCX = _mp([("photo", "scan.png", "image/png", docx("正文", header=MARK))])
SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="40">'
    f'<text x="0" y="20">{MARK} 内部讨论稿</text></svg>'
).encode()
GBK_B64 = _b64(("附件 " * 20 + TEXT).encode("gbk"))
B64_LONG = _b64(("说明：" * 10 + TEXT).encode())
EML_DOCX = eml("报价", attachments=[("plan.docx", DOCX, docx("正文", header=MARK))])

DECODING = [
    # --- charset labels that lie, text the strict decoder gives up on ---
    Variant("charset-declared-utf8-body-gbk", TEXT.encode("gbk")),
    Variant(
        "charset-declared-latin1-body-gbk", TEXT.encode("gbk"), "text/plain; charset=iso-8859-1"
    ),
    Variant("charset-declared-gbk-body-utf8", TEXTB, "text/plain; charset=gbk"),
    Variant("charset-declared-big5-body-utf8", TEXTB, "text/html; charset=big5"),
    Variant("charset-declared-utf16-body-utf8", TEXTB, "text/plain; charset=utf-16"),
    Variant("charset-unknown-name-body-gbk", TEXT.encode("gbk"), "text/plain; charset=x-klingon"),
    Variant("utf8-one-invalid-byte-first-undeclared", b"\xff" + TEXTB, "text/plain"),
    Variant("utf8-one-invalid-byte-later-undeclared", TEXTB + b"\xc3(" + FILLER.encode(), ""),
    Variant("utf8-one-invalid-byte-declared-utf8", TEXTB + b"\xff", "text/plain; charset=utf-8"),
    Variant("utf7-undeclared", TEXT.encode("utf-7"), "text/plain"),
    Variant("utf16-le-odd-length", TEXT.encode("utf-16-le") + b"\n", "application/octet-stream"),
    Variant("utf16-declared-with-bom", TEXT.encode("utf-16"), "text/plain; charset=utf-16"),
    Variant("utf32-le-bom", TEXT.encode("utf-32"), "text/plain"),
    Variant("utf32-be-bom", b"\x00\x00\xfe\xff" + TEXT.encode("utf-32-be"), "text/plain"),
    Variant("utf32-le-no-bom", TEXT.encode("utf-32-le"), "application/octet-stream"),
    Variant("utf32-be-no-bom", TEXT.encode("utf-32-be"), ""),
    Variant("shift-jis-undeclared", JAPANESE.encode("shift_jis"), "text/plain"),
    Variant("euc-jp-undeclared", JAPANESE.encode("euc_jp"), "text/plain"),
    Variant("iso-2022-jp-undeclared", JAPANESE.encode("iso2022_jp"), "text/plain"),
    Variant("euc-kr-undeclared", KOREAN.encode("euc_kr"), "text/plain"),
    Variant("shift-jis-declared", JAPANESE.encode("shift_jis"), "text/plain; charset=shift_jis"),
    # --- media labels and media magic in front of text ---
    Variant("ctype-image-png-body-text", TEXTB, "image/png"),
    Variant("ctype-image-svg-xml", SVG, "image/svg+xml"),
    Variant("ctype-audio-body-text", TEXTB, "audio/mpeg"),
    Variant("png-magic-then-text", PNG + TEXTB, "application/octet-stream"),
    Variant("jpeg-magic-then-text", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + TEXTB, ""),
    Variant("gif-magic-then-text", b"GIF89a" + TEXTB, "text/plain"),
    Variant("id3-magic-then-text", b"ID3\x04\x00" + TEXTB, "application/octet-stream"),
    Variant("multipart-part-typed-png-carrying-text", *MP_IMAGE_TEXT),
    Variant("multipart-part-named-jpg-carrying-text", *MP_JPG_NAME),
    Variant("multipart-part-typed-png-carrying-docx", *MP_IMAGE_DOCX),
    # --- JSON ---
    Variant(
        "json-duplicate-key-marker-first",
        b'{"memo": "%s", "memo": "ok"}' % TEXTB.replace(b"\n", b"\\n"),
        "application/json",
    ),
    Variant(
        "json-duplicate-key-escaped",
        ('{"memo": ' + json.dumps(TEXT) + ', "memo": "ok"}').encode(),
        "application/json",
    ),
    Variant(
        "json-duplicate-key-nested",
        ('{"doc": {"title": ' + json.dumps(MARK) + ', "title": "季度报告"}, "v": 1}').encode(),
        "text/plain",
    ),
    Variant(
        "ndjson-escaped-lines",
        (
            json.dumps({"i": 1, "t": "普通"}) + "\n" + json.dumps({"i": 2, "t": TEXT}) + "\n"
        ).encode(),
        "application/x-ndjson",
    ),
    Variant(
        "json-escapes-in-non-json-text",
        ("memo = " + json.dumps(TEXT) + ";\n").encode(),
        "application/javascript",
    ),
    # --- compression members, frames, trailing data ---
    Variant(
        "gzip-two-members-content-encoding",
        _gzip(FILLER.encode()) + _gzip(TEXTB),
        encoding="gzip",
    ),
    Variant(
        "gzip-two-members-by-magic",
        _gzip(FILLER.encode()) + _gzip(TEXTB),
        "application/octet-stream",
    ),
    Variant("gzip-trailing-data", _gzip(FILLER.encode()) + TEXTB, encoding="gzip"),
    Variant(
        "deflate-two-streams",
        zlib.compress(FILLER.encode()) + zlib.compress(TEXTB),
        encoding="deflate",
    ),
    Variant(
        "zstd-two-frames",
        zstandard.ZstdCompressor().compress(FILLER.encode())
        + zstandard.ZstdCompressor().compress(TEXTB),
        encoding="zstd",
    ),
    Variant(
        "brotli-trailing-data",
        brotli.compress(FILLER.encode()) + TEXTB,
        encoding="br",
        unscannable_ok=True,
    ),
    Variant("gzip-of-gzip-one-label", _gzip(_gzip(TEXTB)), encoding="gzip"),
    Variant("bz2-body", bz2.compress(TEXTB), "application/octet-stream", unscannable_ok=True),
    Variant("xz-body", lzma.compress(TEXTB), "application/x-xz", unscannable_ok=True),
    Variant(
        "bz2-content-encoding",
        bz2.compress(TEXTB),
        encoding="bzip2",
        unscannable_ok=True,
    ),
    # --- markup: attributes, comments, CDATA ---
    Variant(
        "html-attribute",
        f'<body><img src="a.png" alt="{MARK}" title="附图"><p>正文</p></body>'.encode(),
        "text/html",
    ),
    Variant(
        "html-meta-content",
        f'<html><head><meta name="classification" content="{MARK}"></head></html>'.encode(),
        "text/html; charset=utf-8",
    ),
    Variant("html-comment", f"<html><!-- {MARK} --><p>正文</p></html>".encode(), "text/html"),
    Variant("xml-cdata", f"<doc><body><![CDATA[{TEXT}]]></body></doc>".encode(), "application/xml"),
    Variant(
        "xml-attribute", f'<doc classification="{MARK}"><p>正文</p></doc>'.encode(), "text/xml"
    ),
    Variant(
        "xml-processing-instruction",
        f'<?xml version="1.0"?><?note {MARK}?><doc/>'.encode(),
        "application/xml",
    ),
    Variant(
        "html-entities-control",
        "".join(f"&#{ord(c)};" for c in MARK).encode(),
        "text/html",
    ),
    # --- base64 and data: URLs ---
    Variant("base64-mime-76-char-lines", _mime_lines(STRADDLE).encode(), "text/plain"),
    Variant(
        "base64-mime-lines-in-json",
        json.dumps({"attachment": _mime_lines(STRADDLE)}).encode(),
        "application/json",
    ),
    Variant("base64-short-in-text", f"memo={_b64(MARK)}".encode(), "text/plain"),
    Variant("base64-short-in-json", json.dumps({"memo": _b64(MARK)}).encode(), "application/json"),
    Variant("base64-long-control", f"att={B64_LONG}".encode(), "text/plain"),
    Variant(
        "base64-short-of-gzip-in-json",
        json.dumps({"memo": _b64(_gzip(MARK.encode()))}).encode(),
        "application/json",
    ),
    Variant("base64-short-of-utf16", f"memo={_b64(MARK.encode('utf-16'))}".encode(), "text/plain"),
    Variant(
        "data-url-short-in-json",
        json.dumps({"file": f"data:text/plain;base64,{_b64(MARK)}"}).encode(),
        "application/json",
    ),
    Variant(
        "data-url-percent-in-json",
        json.dumps({"file": f"data:text/plain;charset=utf-8,{_pct(MARK)}"}).encode(),
        "application/json",
    ),
    Variant(
        "data-url-gbk-base64-in-json",
        json.dumps({"file": "data:text/plain;charset=gbk;base64," + GBK_B64}).encode(),
        "application/json",
    ),
    Variant(
        "data-url-short-in-html",
        f'<p>正文</p><a href="data:text/plain;base64,{_b64(MARK)}">附件</a>'.encode(),
        "text/html",
    ),
    Variant("form-body-labelled-text-plain", f"memo={_pct(TEXT)}".encode(), "text/plain"),
    Variant(
        "form-body-declared-control",
        f"memo={_pct(TEXT)}".encode(),
        "application/x-www-form-urlencoded",
    ),
    # --- document formats ---
    Variant("rtf-unicode-escapes", rtf_unicode(TEXT), "application/rtf"),
    Variant("rtf-ansicpg936-hex-escapes", rtf_codepage(TEXT), "text/rtf"),
    Variant(
        "eml-encoded-word-subject",
        eml(f"{MARK} 报价单", "请查收。"),
        "message/rfc822",
        unscannable_ok=True,
    ),
    Variant(
        "eml-text-attachment",
        eml("报价", attachments=[("memo.txt", "text/plain", TEXTB)]),
        "message/rfc822",
        unscannable_ok=True,
    ),
    Variant("eml-docx-attachment", EML_DOCX, "message/rfc822", unscannable_ok=True),
    Variant("pdf-annotation", pdf_hidden(annotation=TEXT), "application/pdf"),
    Variant("pdf-form-field", pdf_hidden(field=TEXT), "application/pdf"),
    Variant(
        "pdf-embedded-file",
        pdf_hidden(attachment=TEXTB, attachment_name="memo.txt"),
        "application/pdf",
        unscannable_ok=True,
    ),
    Variant(
        "zip-archive-comment",
        zip_commented({"readme.txt": FILLER}, TEXTB),
        "application/zip",
    ),
    Variant(
        "zip-member-comment",
        zip_commented({"readme.txt": FILLER}, b"", member_comment=TEXTB),
        "application/zip",
    ),
    Variant("zip-member-name-control", zip_of({f"{MARK}/a.txt": "x"}), "application/zip"),
    Variant("tar-member-control", tar_of({"notes.txt": TEXTB}), "application/x-tar"),
    Variant("tar-gz-member-control", _gzip(tar_of({"notes.txt": TEXTB})), "application/gzip"),
    # --- stacked encodings ---
    Variant(
        "stack-gzip-of-base64-of-docx",
        _gzip(_b64(docx("正文", header=MARK)).encode()),
        encoding="gzip",
    ),
    Variant(
        "stack-base64-of-gzip-in-json",
        json.dumps({"blob": _b64(_gzip(TEXTB))}).encode(),
        "application/json",
    ),
    Variant(
        "stack-form-of-base64-of-zip-of-docx",
        ("f=" + _pct(_b64(zip_of({"p.docx": docx("正文", footer=MARK)})))).encode(),
        "application/x-www-form-urlencoded",
    ),
    Variant("stack-base64-of-base64", f"x={_b64(_b64(TEXT * 2))}".encode(), "text/plain"),
    Variant(
        "stack-mime-lines-of-gzip-in-multipart",
        _mp([("f", "", "application/octet-stream", _mime_lines(_gzip(TEXTB)).encode())])[0],
        multipart([])[1],
    ),
    Variant(
        "stack-gzip-of-utf16-no-bom",
        _gzip(TEXT.encode("utf-16-le")),
        "application/octet-stream",
    ),
]

SPELLING = [
    Variant("tag-characters-between-letters", _interleave(TEXT[:6], "\U000e0020").encode()),
    Variant("tag-letters-between-letters", _interleave(TEXT[:6], "\U000e0041\U000e007f").encode()),
    Variant("variation-selector-supplement", _interleave(TEXT[:6], "\U000e0100").encode()),
    Variant("musical-format-characters", _interleave(TEXT[:6], "\U0001d173").encode()),
    Variant("shorthand-format-controls", _interleave(TEXT[:6], "\U0001bca0").encode()),
    Variant(
        "kangxi-radical-heart-in-hexin",
        "核\u2f3c商密★10年 报价单\n".encode(),
        needle="核心商密★",
        level=TRADE,
    ),
    Variant(
        "kangxi-radical-one-in-yiji", "\u2f00级商密★3年\n".encode(), needle="一级商密★", level=TRADE
    ),
    Variant(
        "kangxi-radical-two-in-erji", "\u2f06级商密★\n".encode(), needle="二级商密★", level=TRADE
    ),
    Variant("circled-ideograph-secret", "\u3299密★1年 会议纪要\n".encode(), needle="秘密★"),
    Variant(
        "vertical-presentation-brackets", "\ufe3b绝密\ufe3c 作战方案\n".encode(), needle="【绝密】"
    ),
    Variant("small-form-colon-in-field", "密级\ufe55绝密\n".encode(), needle="密级:绝密"),
    Variant("full-width-digits-control", "机密★５年\n".encode(), needle="机密★5年"),
    Variant(
        "full-width-latin-control",
        "ＴＯＰ ＳＥＣＲＥＴ\n计划".encode(),
        needle="top secret",
        level=ENGLISH,
    ),
    Variant(
        "math-bold-letters",
        "\U0001d413\U0001d40e\U0001d40f \U0001d412\U0001d404\U0001d402\U0001d411\U0001d404"
        "\U0001d413\nplan".encode(),
        needle="top secret",
        level=ENGLISH,
    ),
    Variant(
        "circled-latin-letters",
        "\u24c9\u24c4\u24c5 \u24c8\u24ba\u24b8\u24c7\u24ba\u24c9\nplan".encode(),
        needle="top secret",
        level=ENGLISH,
    ),
    Variant(
        "cyrillic-look-alikes",
        "T\u041eP S\u0415CRET\nplan".encode(),
        needle="top secret",
        level=ENGLISH,
    ),
    Variant("no-break-space", "TOP\u00a0SECRET\nplan".encode(), needle="top secret", level=ENGLISH),
    Variant("traditional-control", "機密★5年\n".encode(), needle="機密★5年"),
    Variant("bmp-variation-selector-control", _interleave(MARK, "\ufe0f").encode()),
    Variant("combining-grapheme-joiner-control", _interleave(MARK, "\u034f").encode()),
    Variant("word-joiner-control", _interleave(MARK, "\u2060").encode()),
    Variant("tortoise-brackets-control", "〔绝密〕 方案\n".encode(), needle="〔绝密〕"),
]

MARK_PCT = _pct(MARK)
BIG_HEADER = "a" * 17 * 1024 + " " + MARK
BASIC = base64.b64encode(f"zhang:{MARK}".encode()).decode()
CLEAN = ("普通的会议纪要，天气晴。\n" * 4).encode()
MP_NAME = _mp([(MARK, "", "text/plain", b"hello")])
MP_FILENAME = _mp([("f", f"{MARK}.txt", "text/plain", b"hello")])
MP_FILENAME_STAR = (
    (
        b"--b1\r\nContent-Disposition: form-data; name=\"f\"; filename*=UTF-8''"
        + _pct(f"{MARK}.txt").encode()
        + b"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n"
    ),
    "multipart/form-data; boundary=b1",
)
MP_FILENAME_WORD = (
    (
        b'--b2\r\nContent-Disposition: form-data; name="f"; filename="=?UTF-8?B?'
        + _b64(f"{MARK}.txt").encode()
        + b'?="\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b2--\r\n'
    ),
    "multipart/form-data; boundary=b2",
)
MP_PART_HEADER = _mp([("f", "", "text/plain", b"hello")], f"X-Note: {MARK}")
MP_PART_CTYPE_NAME = (
    (
        b'--b3\r\nContent-Disposition: form-data; name="f"\r\n'
        b'Content-Type: text/plain; name="'
        + f"{MARK}.txt".encode()
        + b'"\r\n\r\nhello\r\n--b3--\r\n'
    ),
    "multipart/form-data; boundary=b3",
)

CHANNEL = [
    # --- the query string (also: the row's query column must hold it redacted) ---
    Variant("query-raw-utf8", CLEAN, target=f"/q?memo={MARK}"),
    Variant("query-percent-encoded", CLEAN, target=f"/q?memo={MARK_PCT}"),
    Variant("query-double-encoded", CLEAN, target=f"/q?memo={_pct(MARK_PCT)}"),
    Variant(
        "query-plus-for-spaces",
        CLEAN,
        target="/q?c=classification:+top+secret&x=1",
        needle="classification: top secret",
        level=ENGLISH,
    ),
    Variant("query-percent-23-fragment-like", CLEAN, target=f"/q?a=1%23{MARK_PCT}"),
    Variant("query-get-without-body", method="GET", target=f"/search?q={MARK_PCT}"),
    Variant(
        "query-gbk-percent-encoded",
        CLEAN,
        target=f"/q?wd={urllib.parse.quote(MARK, encoding='gbk')}",
    ),
    Variant(
        "query-percent-u-iis",
        CLEAN,
        target="/q?memo=" + "".join(c if c.isascii() else f"%u{ord(c):04X}" for c in MARK),
    ),
    Variant("query-base64-value", CLEAN, target=f"/q?d={urllib.parse.quote(_b64(MARK))}"),
    Variant("query-http2", CLEAN, target=f"/q?memo={MARK_PCT}", transport="h2"),
    # --- the path ---
    Variant("path-percent-encoded-segment", CLEAN, target=f"/files/{MARK_PCT}/report.docx"),
    Variant("path-raw-utf8-segment", CLEAN, target=f"/files/{MARK}/report.docx"),
    Variant("path-double-encoded-segment", CLEAN, target=f"/files/{_pct(MARK_PCT)}"),
    Variant("path-matrix-parameter", CLEAN, target=f"/files;memo={MARK_PCT}/report"),
    Variant("path-method-put-file-name", CLEAN, method="PUT", target=f"/dav/{MARK_PCT}.txt"),
    # --- request headers ---
    Variant("header-custom-raw-utf8", CLEAN, headers=(("X-Memo", MARK),)),
    Variant("header-custom-percent-encoded", CLEAN, headers=(("X-Memo", MARK_PCT),)),
    Variant(
        "header-custom-rfc2047-encoded-word",
        CLEAN,
        headers=(("X-Subject", f"=?UTF-8?B?{_b64(MARK)}?="),),
    ),
    Variant(
        "header-referer", CLEAN, headers=(("Referer", f"http://intra.example/d?t={MARK_PCT}"),)
    ),
    Variant("header-user-agent", CLEAN, headers=(("User-Agent", f"Mozilla/5.0 ({MARK})"),)),
    Variant("header-17kb-value", CLEAN, headers=(("X-Blob", BIG_HEADER),)),
    Variant("header-authorization-basic", CLEAN, headers=(("Authorization", f"Basic {BASIC}"),)),
    Variant(
        "header-content-disposition-filename",
        CLEAN,
        method="PUT",
        headers=(("Content-Disposition", f"attachment; filename*=UTF-8''{MARK_PCT}.txt"),),
    ),
    Variant("header-file-name-base64", CLEAN, headers=(("X-File-Name", _b64(f"{MARK}.txt")),)),
    Variant("header-http2-custom", CLEAN, headers=(("x-memo", MARK),), transport="h2"),
    Variant(
        "header-custom-gbk-bytes",
        CLEAN,
        headers=(("X-Memo", MARK.encode("gbk")),),
    ),
    Variant(
        "header-json-escapes",
        CLEAN,
        headers=(("X-Meta", json.dumps({"title": MARK})),),
    ),
    # --- cookies ---
    Variant("cookie-one", CLEAN, headers=(("Cookie", f"sid=1; memo={MARK_PCT}"),)),
    Variant("cookie-raw-utf8", CLEAN, headers=(("Cookie", f"memo={MARK}"),)),
    Variant(
        "cookie-many-headers",
        CLEAN,
        headers=tuple(
            ("Cookie", f"c{i}={MARK_PCT if i == 8 else 'v' + str(i)}") for i in range(12)
        ),
    ),
    # --- trailers (the body path scans them now) ---
    Variant(
        "trailer-chunked-percent-encoded",
        CLEAN,
        transport="chunked",
        trailers=(("X-Memo", MARK_PCT),),
    ),
    Variant(
        "trailer-chunked-base64",
        CLEAN,
        transport="chunked",
        trailers=(("X-Digest", _b64(MARK)),),
    ),
    Variant(
        "trailer-chunked-third-of-several",
        CLEAN,
        transport="chunked",
        trailers=(("X-A", "1"), ("X-B", "2"), ("X-Memo", MARK), ("X-C", "3")),
    ),
    Variant("trailer-http2-to-http2", CLEAN, transport="h2-h2", trailers=(("x-memo", MARK),)),
    Variant(
        "trailer-http2-percent-encoded", CLEAN, transport="h2-h2", trailers=(("x-memo", MARK_PCT),)
    ),
    # --- multipart part headers ---
    Variant("multipart-part-name", *MP_NAME),
    Variant("multipart-filename-control", *MP_FILENAME),
    Variant("multipart-filename-star-rfc2231", *MP_FILENAME_STAR),
    Variant("multipart-filename-encoded-word", *MP_FILENAME_WORD),
    Variant("multipart-custom-part-header", *MP_PART_HEADER),
    Variant("multipart-part-content-type-name", *MP_PART_CTYPE_NAME),
    # --- WebSocket data messages (control frames: see the module docstring) ---
    Variant(
        "websocket-fragmented-text",
        transport="ws",
        frames=(("text", "机密".encode(), False), ("text", "★5年 会议纪要".encode(), True)),
    ),
    Variant("websocket-binary-gzip", transport="ws", frames=(("binary", _gzip(TEXTB), True),)),
    Variant(
        "websocket-text-base64-short",
        transport="ws",
        frames=(("text", json.dumps({"m": _b64(MARK)}).encode(), True),),
    ),
]


def _grade(vid: str, text: str, needle: str) -> Variant:
    return Variant(vid, (text + FILLER).encode(), needle=needle, level=TRADE)


GRADE = [
    _grade("grade-line-start-then-title", "一级商密 关于华东区域渠道返利的报价方案\n", "一级商密"),
    _grade("grade-hexin-line-start-then-title", "核心商密 二〇二六年度并购计划\n", "核心商密"),
    _grade("grade-putong-line-start-then-title", "普通商密 供应商名单（第三季度）\n", "普通商密"),
    _grade("grade-full-width-parentheses-alone", "（一级商密）\n", "一级商密"),
    _grade("grade-full-width-parentheses-then-title", "（二级商密）供应商名单\n", "二级商密"),
    _grade("grade-half-width-parentheses-then-title", "(三级商密) 价格表\n", "三级商密"),
    _grade("grade-colon-alone", "普通商密：\n", "普通商密"),
    _grade("grade-colon-then-title", "核心商密：2026年度预算\n", "核心商密"),
    _grade("grade-period-baomiqixian-5-years", "一级商密 保密期限：5年\n", "一级商密"),
    _grade("grade-period-star-10-years", "二级商密★10年\n", "二级商密"),
    _grade("grade-period-changqi", "核心商密 长期\n", "核心商密"),
    _grade("grade-period-in-parentheses", "三级商密（保密期限：3年）\n", "三级商密"),
    _grade("grade-period-baomiqixian-changqi", "核心商密 保密期限：长期\n", "核心商密"),
    _grade("grade-in-a-miji-field", "密级：核心商密\n", "核心商密"),
    _grade("grade-reversed-form", "商密 一级\n", "商密 一级"),
    Variant(
        "grade-xlsx-table-cell",
        xlsx(["项目", "一级商密", "负责人"]),
        DOCX.replace("wordprocessingml.document", "spreadsheetml.sheet"),
        needle="一级商密",
        level=TRADE,
    ),
    Variant(
        "grade-xlsx-cell-with-period",
        xlsx(["密级", "核心商密 保密期限：10年"]),
        "application/octet-stream",
        needle="核心商密",
        level=TRADE,
    ),
    Variant(
        "grade-docx-header-with-period",
        docx("正文" * 20, header="二级商密 保密期限：3年"),
        DOCX,
        needle="二级商密",
        level=TRADE,
    ),
]

LAW = (
    "《中华人民共和国反不正当竞争法》第九条 经营者不得实施下列侵犯商业秘密的行为。\n"
    "本法所称的商业秘密，是指不为公众所知悉、具有商业价值并经权利人采取相应保密措施的技术信息、"
    "经营信息等商业信息。\n最高人民法院关于审理侵犯商业秘密民事案件适用法律若干问题的规定。\n"
)
TEXTBOOK = (
    "第三章 信息安全基础\n信息安全的三个基本目标是机密性、完整性和可用性（CIA）。机密性指信息不被"
    "未授权者获取；加密是保障机密性的主要手段。\n习题：试述机密性与完整性的区别。\n"
)
FILMS = (
    "本周影讯：经典谍战片《绝密飞行》《机密任务》重映，儿童剧《秘密花园》周末加演。\n"
    "We watched Top Secret! (1984) and Confidential Agent last night; the plot is top secret.\n"
)
FOOTER_EN = (
    "Best regards,\nZhang Wei\n--\nThis e-mail and any attachments may contain confidential "
    "information and are intended solely for the addressee. If you are not the intended "
    "recipient, please notify the sender and delete it.\n"
)
FOOTER_CN = (
    "此致\n敬礼\n——\n本邮件及其附件可能包含保密信息，仅供指定收件人使用。如您误收本邮件，请通知发件人"
    "并删除，谢谢。\n"
)
CONFIDENTIALITY = (
    "Regards,\nLi Na\n\nCONFIDENTIALITY NOTICE: This e-mail is intended only for the person to "
    "whom it is addressed. If you received it in error, please delete it.\n"
)


def _benign(vid: str, body: bytes, expect: str = "allow", ctype: str = "", **kw: object) -> Variant:
    return Variant(vid, body, ctype or "text/plain; charset=utf-8", needle="", expect=expect, **kw)  # type: ignore[arg-type]


BENIGN = [
    _benign("benign-news", NEWS.encode()),
    _benign("benign-law-articles-shangye-mimi", LAW.encode()),
    _benign("benign-textbook-jimixing", TEXTBOOK.encode()),
    _benign("benign-film-titles", FILMS.encode()),
    _benign("benign-email-footer-en", FOOTER_EN.encode()),
    _benign("benign-email-footer-cn", FOOTER_CN.encode()),
    _benign("benign-bare-jimi-in-prose", "这件事很机密，别外传。绝密档案首次公开展出。\n".encode()),
    _benign("benign-news-gbk", NEWS.encode("gbk"), ctype="text/plain; charset=gbk"),
    _benign("benign-news-docx", docx(NEWS), ctype=DOCX),
    _benign(
        "benign-law-gzip-json",
        _gzip(json.dumps({"t": LAW}).encode()),
        encoding="gzip",
        ctype="application/json",
    ),
    _benign("benign-email-footer-confidentiality-notice", CONFIDENTIALITY.encode()),
    _benign(
        "benign-docx-as-mime-lines-in-json",
        json.dumps({"name": "news.docx", "data": _mime_lines(docx(NEWS))}).encode(),
        ctype="application/json",
    ),
    _benign(
        "benign-eml-with-docx-attachment",
        eml("周报", "见附件。", [("news.docx", DOCX, docx(NEWS))]),
        ctype="message/rfc822",
    ),
    _benign(
        "alert-grade-inside-a-sentence",
        "根据公司规定，一级商密文件须加密存储，不得通过个人邮箱发送。\n".encode(),
        expect="alert",
    ),
    _benign("alert-legal-article-with-grades", LEGAL_ARTICLE.encode(), expect="alert"),
    _benign(
        "alert-grade-inside-a-sentence-in-docx",
        docx("培训材料：核心商密与普通商密的区别在于泄露后果的严重程度。"),
        expect="alert",
        ctype=DOCX,
    ),
]

ALL = DECODING + SPELLING + CHANNEL + GRADE + BENIGN
BY_ID = {v.id: v for v in ALL}
assert len(BY_ID) == len(ALL), "variant ids must be unique"


# What leaks with the scanner this was last run against: the xfail(strict=True) reasons, by
# id ("whole": the request arrived at the upstream byte for byte and its row says allow).
# When this suite was first run (a23a395 plus the every-channel scan of 61eb920) 95 more
# failed: 62 class-1 decodings, 15 class-2 spellings, 3 class-3 channels (multipart part
# name= and part headers, a short base64 WebSocket message), 12 class-4 grade forms and 3
# class-5 false alerts/blocks; the scanner changes made while it was written fixed them, and
# the last 7 (class 3: a GBK-percent-encoded query, %uXXXX escapes, raw GBK bytes in a header,
# percent-encoded and base64 trailers, a raw UTF-8 request line kept in the error column)
# were fixed after it.
LEAKS: dict[str, str] = {}  # none at the moment; see the history above


def params(variants: list[Variant]) -> list[object]:
    return [
        pytest.param(
            v.id,
            id=v.id,
            marks=[pytest.mark.xfail(strict=True, reason=LEAKS[v.id])] if v.id in LEAKS else [],
        )
        for v in variants
    ]


# === sending ===================================================================================


def _encode_headers(headers: tuple[tuple[str, str | bytes], ...]) -> bytes:
    return b"".join(_header_line(k, v) + b"\r\n" for k, v in headers)


def send_h1(gw: GatewayProcess, rec: Recorder, v: Variant) -> int:
    authority = f"127.0.0.1:{rec.port}"
    head = f"{v.method} http://{authority}{v.target} HTTP/1.1\r\nHost: {authority}\r\n".encode()
    if v.content_type and (v.body or v.method != "GET"):
        head += f"Content-Type: {v.content_type}\r\n".encode()
    if v.encoding:
        head += f"Content-Encoding: {v.encoding}\r\n".encode()
    head += _encode_headers(v.headers)
    if v.transport == "chunked":
        trailers = _encode_headers(v.trailers)
        names = ", ".join(k for k, _ in v.trailers)
        head += f"Transfer-Encoding: chunked\r\nTrailer: {names}\r\n\r\n".encode()
        payload = b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(v.body), v.body, trailers)
    else:
        if v.body or v.method != "GET":
            head += f"Content-Length: {len(v.body)}\r\n".encode()
        payload = v.body
        head += b"\r\n"
    with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=TIMEOUT) as sock:
        sock.sendall(head + payload)
        return read_response(sock)[0]


def send_h2(gw: GatewayProcess, rec: Recorder, v: Variant) -> int:
    headers = [
        (":method", v.method),
        (":scheme", "https"),
        (":authority", f"127.0.0.1:{rec.port}"),
        (":path", v.target),
        ("content-type", v.content_type),
        *((k.lower(), str(val)) for k, val in v.headers),
    ]
    sock = tunnel(gw, rec.port, tls=True, alpn=("h2", "http/1.1"))
    with sock:
        client = H2Client(sock)
        status, _ = client.request(
            headers, [v.body] if v.body else [], trailers=list(v.trailers) or None
        )
    return status


def send_ws(gw: GatewayProcess, rec: Recorder, v: Variant) -> int:
    from wsproto.events import BytesMessage, TextMessage

    events = [
        TextMessage(data=p.decode(), message_finished=done)
        if kind == "text"
        else BytesMessage(data=p, message_finished=done)
        for kind, p, done in v.frames
    ]
    ws_exchange(gw, rec, events)
    return 101


@dataclass
class Outcome:
    rec: Recorder
    status: int = 0
    error: str = ""
    rows: list[dict] = field(default_factory=list)


def _send(gw: GatewayProcess, v: Variant, out: Outcome) -> None:
    try:
        if v.transport in ("h2", "h2-h2"):
            out.status = send_h2(gw, out.rec, v)
        elif v.transport == "ws":
            out.status = send_ws(gw, out.rec, v)
        else:
            out.status = send_h1(gw, out.rec, v)
    except Exception as e:  # what the client saw does not matter; the upstream does
        out.error = f"{type(e).__name__}: {e}"


# === fixtures ==================================================================================


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("evasion-ca"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory, ca):
    base: Path = tmp_path_factory.mktemp("gw-evasion")
    bundle = base / "upstream-trust.pem"
    bundle.write_bytes(ca.pem.read_bytes())
    g = GatewayProcess(base / "data", policy_copy(base), bundle).start()
    yield g
    g.stop()


def _wait_quiet(recorders: list[Recorder], quiet: float = 0.5, timeout: float = 10) -> None:
    """Until no recorder has received a byte for ``quiet`` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = max((c.last_byte for r in recorders for c in list(r.connections)), default=0.0)
        if time.monotonic() - last >= quiet:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def campaign(gw, ca):
    """Every variant sent once (in parallel, each to its own recorder), then the rows."""
    outcomes: dict[str, Outcome] = {}
    for v in ALL:
        if v.transport == "ws":
            rec = Recorder("ws")
        elif v.transport in ("h2", "h2-h2"):
            alpn = ("h2",) if v.transport == "h2-h2" else ("http/1.1",)
            rec = Recorder("http", tls=ca, alpn=alpn)
        else:
            rec = Recorder("http")
        outcomes[v.id] = Outcome(rec.start())
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            for future in [pool.submit(_send, gw, v, outcomes[v.id]) for v in ALL]:
                future.result(timeout=60)
        _wait_quiet([o.rec for o in outcomes.values()])
        ports = {o.rec.port: vid for vid, o in outcomes.items()}

        def complete(rows: list[dict]) -> bool:
            have = {r["port"] for r in rows if r["kind"] != "connect"}
            return all(o.rec.port in have for o in outcomes.values())

        for row in gw.wait_rows(complete, timeout=30):
            if row["port"] in ports and row["kind"] != "connect":
                outcomes[ports[row["port"]]].rows.append(row)
        yield outcomes
    finally:
        for o in outcomes.values():
            o.rec.stop()


# === checks ====================================================================================


def arrived_components(rec: Recorder) -> list[tuple[str, bytes]]:
    """(where, bytes) of everything the upstream received: raw bytes per connection, and per
    request its target, each header, body and trailer; WebSocket payloads."""
    out: list[tuple[str, bytes]] = []
    for i, raw in enumerate(rec.per_connection()):
        out.append((f"raw bytes of connection {i}", raw))
    for req in rec.requests:
        enc = "utf-8" if req.protocol == "HTTP/2" else "latin-1"

        def b(s: str, enc: str = enc) -> bytes:
            return s.encode(enc, "surrogateescape" if enc == "utf-8" else "replace")

        out.append((f"target {req.target[:80]!r}", b(req.target)))
        out += [(f"header {k}", b(f"{k}: {v}")) for k, v in req.headers]
        out.append((f"body ({len(req.body)} B)", bytes(req.body)))
        out += [(f"trailer {k}", b(f"{k}: {v}")) for k, v in req.trailers]
    out += [(f"websocket {f.kind} frame", f.data) for f in rec.frames]
    out.append(("websocket payloads joined", b"".join(f.data for f in rec.frames)))
    return out


def expect_marker_never_arrived(f: Findings, v: Variant, o: Outcome) -> None:
    for where, data in arrived_components(o.rec):
        reading = find_in(v.needle, data)
        if reading is not None:
            at = human(reading).find(human(v.needle))
            f.check(
                False,
                f"the upstream can read {v.needle!r} in {where}: "
                f"…{human(reading)[max(0, at - 40) : at + 30]!r}…",
            )
            return


def _row_values(row: dict) -> Iterator[tuple[str, str]]:
    for key, value in row.items():
        for item in value if isinstance(value, list) else [value]:
            yield key, str(item)


def expect_row_clean_of_marker(f: Findings, v: Variant, row: dict) -> None:
    for key, value in _row_values(row):
        reading = find_in(v.needle, value.encode("utf-8", "surrogateescape"))
        if reading is not None:
            what = "the query column is not redacted" if key == "query" else f"column {key}"
            f.check(False, f"{what} holds the marker: {value[:120]!r}")


def summary(o: Outcome) -> str:
    reqs = [
        f"{r.protocol} {r.method} {r.target[:60]!r} body={len(r.body)}B complete={r.complete}"
        for r in o.rec.requests
    ]
    return f"client status {o.status} {o.error}; upstream requests {reqs}"


def row_summary(row: dict) -> str:
    keys = ("kind", "decision", "reason_kind", "rule_id", "marker_ids", "marker_levels", "error")
    return str({k: row.get(k) for k in keys})


def expect_block_row(f: Findings, v: Variant, o: Outcome) -> None:
    rows = [r for r in o.rows if r["kind"] in ("http", "websocket")]
    for r in rows:  # whatever the row says, it never keeps the marker
        expect_row_clean_of_marker(f, v, r)
    if not f.check(rows, f"no row for the request; {summary(o)}"):
        return
    blocked = [r for r in rows if r["decision"] == "block"]
    if not f.check(blocked, f"the row does not say block: {[row_summary(r) for r in rows]}"):
        return
    row = blocked[0]
    f.check(row["reason_kind"] == "marker", f"row reason: {row_summary(row)}")
    by_marker = v.level in row["marker_levels"] and row["marker_ids"]
    unscannable = v.unscannable_ok and row["rule_id"] == "scan.unscannable"
    f.check(by_marker or unscannable, f"no {v.level} marker in the row: {row_summary(row)}")


def check_blocked(vid: str, campaign: dict[str, Outcome]) -> None:
    v, o = BY_ID[vid], campaign[vid]
    f = Findings()
    expect_marker_never_arrived(f, v, o)
    expect_block_row(f, v, o)
    f.verify()


# === tests =====================================================================================


@pytest.mark.parametrize("vid", [v.id for v in ALL if v.expect == "block"])
def test_every_variant_carries_its_marker(vid):
    """In process: the recorder-side reading finds the marker in what the variant sends (a
    variant that hides it from the test too would pass vacuously)."""
    v = BY_ID[vid]
    assert any(find_in(v.needle, part) for part in v.sent_components()), vid


@pytest.mark.parametrize("vid", params(DECODING))
def test_decoding_evasion(campaign, vid):
    check_blocked(vid, campaign)


@pytest.mark.parametrize("vid", params(SPELLING))
def test_spelling_evasion(campaign, vid):
    check_blocked(vid, campaign)


@pytest.mark.parametrize("vid", params(CHANNEL))
def test_channel_outside_the_body(campaign, vid):
    check_blocked(vid, campaign)


@pytest.mark.parametrize("vid", params(GRADE))
def test_trade_secret_grade_label_blocks(campaign, vid):
    check_blocked(vid, campaign)


@pytest.mark.parametrize("vid", params(BENIGN))
def test_benign_text_arrives_byte_for_byte(campaign, vid):
    v, o = BY_ID[vid], campaign[vid]
    f = Findings()
    reqs = [r for r in o.rec.requests if r.complete]
    if f.check(len(reqs) == 1, f"not one complete request upstream: {summary(o)}"):
        f.check(bytes(reqs[0].body) == v.body, f"the body changed: {summary(o)}")
    rows = [r for r in o.rows if r["kind"] == "http"]
    if f.check(len(rows) == 1, f"{len(rows)} rows"):
        row = rows[0]
        f.check(row["decision"] == v.expect, f"row says {row_summary(row)}, want {v.expect}")
        if v.expect == "alert":
            f.check(row["reason_kind"] == "marker", f"row reason: {row_summary(row)}")
    f.verify()
