"""Decode: undoes everything that hides text in a request body, yielding the texts to scan.

What a body is comes from its bytes, never from a label (Content-Type, file name): a label is
at most a hint for a charset or a multipart boundary. Every value a receiving server could see
is yielded:

* Content-Encoding (gzip, deflate, br, zstd, stacked; every gzip member and zstd frame, the
  bytes after the last) and bzip2/xz/.lzma/gzip/zstd bodies by magic (``decompress``);
* multipart (every part, each part's headers, preamble and epilogue), message/rfc822 and .eml
  (headers with RFC 2047 encoded words, every part, attachments), url-encoded forms;
* JSON (every string and key, duplicate keys too, JSON lines), JavaScript-style escapes, HTML
  entities and percent-escapes in any text;
* XML/HTML: the text with tags removed (a marker split across runs joins), attribute values,
  comments, CDATA and processing instructions;
* base64 (lines joined, as MIME wraps them; long blocks as any content, short tokens when they
  are text) and data: URLs (base64 or percent-encoded);
* zip (members, names in legacy code pages, comments) and the formats built on it (Office,
  ODF), tar, PDF (page text, metadata, annotations, form fields, every string, embedded
  files), RTF (``rtf``), media only when the bytes are media (``media``), and text in any
  charset (``charsets``).

A ``Budget`` bounds what one body may cost: expanded bytes, nesting depth, parts and seconds.
Crossing it raises ``Unscannable`` with the reason; the caller decides the verdict.

Not read: base64 shorter than 12 characters (``Budget.base64_short``; 9 bytes: 绝密★ in UTF-8,
机密★5年 in GBK); the pixels and samples of real media (``media``); text inside a binary
other than its UTF-8 runs (UTF-16 or GBK text in an OLE2 .doc or behind binary junk); archives
and compressed formats this module cannot open are unscannable instead (``decompress``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import io
import json
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from email import policy as email_policy
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from html import escape, unescape

from .budget import Budget, MiB, Unscannable
from .charsets import (
    BINARY_RUNS,
    SAMPLE,
    UTF8_RUNS,
    all_plausible,
    binary_runs,
    decode_as,
    looks_binary,
    readings,
    texts_of,
)
from .decompress import compression_of, decompress, undo_content_encoding
from .media import parse_media
from .rtf import looks_like_rtf, rtf_texts

__all__ = [
    "Budget",
    "MiB",
    "Unscannable",
    "Walker",
    "extract_texts",
    "form_fields",
    "looks_binary",
    "markup_text",
    "texts_of",
    "undo_content_encoding",
    "unquote_plus",
]


def _container(head: bytes) -> bool:
    """Bytes that start a container or compressed stream (not text)."""
    return head.startswith((b"PK\x03\x04", b"%PDF-", b"{\\rtf")) or bool(compression_of(head))


def _param(content_type: str, name: str) -> str:
    m = re.search(rf";\s*{name}\s*=\s*\"?([^\";]+)", content_type, re.IGNORECASE)
    return m.group(1).strip() if m else ""


# --- forms -----------------------------------------------------------------------------------

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


def form_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    """A url-encoded form's (name, value) bytes, percent-escapes undone."""
    pairs = [field.partition(b"=") for field in data.split(b"&") if field]
    return [(unquote_plus(k), unquote_plus(v)) for k, _, v in pairs]


def form_fields(
    data: bytes, charset: str = "", raw: list[tuple[bytes, bytes]] | None = None
) -> list[list[tuple[str, str]]]:
    """A url-encoded form's fields, once per reading of its percent-escaped bytes (the form's
    charset is a hint like any other: see ``charsets``)."""
    raw = form_pairs(data) if raw is None else raw
    joined = b"\n".join(k + b"\n" + v for k, v in raw)
    out = []
    for codec, _, _ in readings(joined, charset):
        if codec in (UTF8_RUNS, BINARY_RUNS):
            codec = "utf-8"
        out.append([(k.decode(codec, "replace"), v.decode(codec, "replace")) for k, v in raw])
    return out


# --- markup ----------------------------------------------------------------------------------

_BLOCK_ENDS = (
    r"</(?:w:p|a:p|text:p|text:h|p|div|li|tr|h\d|si|title)\s*>|<(?:w:br|br|w:tab|text:line-break)"
    r"\b[^>]*>"
)
_BLOCK_END = re.compile(_BLOCK_ENDS)  # case-sensitive: twice as fast, and Office XML is lowercase
_BLOCK_END_ANY_CASE = re.compile(_BLOCK_ENDS, re.IGNORECASE)
_UPPER_TAG = re.compile(r"</?[A-Z]")
# A tag starts with a letter, / ! or ?: "a < b" is text, as a browser reads it.
_TAG = re.compile(r"<[A-Za-z/!?][^>]*>")
_ATTRIBUTES = re.compile(r"<[A-Za-z][^\s/>]*\s([^>]+)>")
_COMMENT = re.compile(r"<!--(.*?)-->", re.DOTALL)
_CDATA = re.compile(r"<!\[CDATA\[(.*?)\]\]>", re.DOTALL)
_PI = re.compile(r"<\?(.*?)\?>", re.DOTALL)
_TAGGY = re.compile(r"<[A-Za-z/!?][^<>]{0,1024}>")


def markup_parts(text: str) -> tuple[str, str]:
    """(the text a reader sees, what the markup carries besides). The first: block ends become
    line breaks (for line-start markers), comments and tags go, CDATA stays as text, entities
    are resolved, so a marker split across runs (<w:t>机</w:t><w:t>密</w:t>) joins. The second:
    attribute values (one a line), comments and processing instructions."""
    extras: list[str] = []
    if "<!--" in text:
        extras += _COMMENT.findall(text)
        text = _COMMENT.sub("", text)
    if "<![" in text:  # escaped so that a "<" inside is not taken for a tag below
        text = _CDATA.sub(lambda m: escape(m.group(1), quote=False), text)
    if "<?" in text:
        extras += _PI.findall(text)
    if "=" in text:
        # Each attribute value on a line of its own (for line-start markers): quotes and =
        # break lines (str.replace: translate with a table is 50 times slower).
        found = "\n".join(_ATTRIBUTES.findall(text))
        extras.append(found.replace('"', "\n").replace("'", "\n").replace("=", "=\n"))
    block_end = _BLOCK_END_ANY_CASE if _UPPER_TAG.search(text) else _BLOCK_END  # <P>, <BR>
    flow = unescape(_TAG.sub("", block_end.sub("\n", text)))
    return flow, unescape("\n".join(extras)) if extras else ""


def markup_text(text: str) -> str:
    """Everything a reader can find in XML/HTML, as one text."""
    flow, extras = markup_parts(text)
    return f"{flow}\n{extras}" if extras else flow


# --- escapes inside a text -------------------------------------------------------------------

_JS_ESCAPE = re.compile(
    r"\\u\{([0-9a-fA-F]{1,6})\}|\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|\\([nrtbf\"'\\/])"
)
# Run patterns start with a literal character: sre then skips to it at memchr speed (a leading
# group of alternatives makes it try every position, 20 times slower).
_JS_ONE = r"\\(?:u\{[0-9a-fA-F]{1,6}\}|u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[nrtbf\"'\\/])"
_JS_RUNS = re.compile(f"{_JS_ONE}(?:{_JS_ONE})*")
_JS_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}
_HEX_BYTES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")
_ENTITY_ONE = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});?"
_ENTITY_RUNS = re.compile(f"{_ENTITY_ONE}(?:{_ENTITY_ONE})*")
_PCT_ONE = r"%(?:[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4})"
_PCT_RUNS = re.compile(f"{_PCT_ONE}(?:{_PCT_ONE})*")
# Escapes closer than this are one stretch (base64 sent %-escaped has a %2B or %2F every 32
# characters or so); each stretch is undone with this much of its line around it.
_GAP = 1024
_CONTEXT = 256  # at least this much around a stretch, then on to the next whitespace
_REACH = 64 * 1024  # at most this much
_SPACE_CHAR = re.compile(r"\s")
_LAST_SPACE = re.compile(r".*\s", re.DOTALL)  # match(), greedy: to after the last whitespace
_PCT_U = re.compile(r"%u([0-9A-Fa-f]{4})")


def _surrogates_joined(text: str) -> str:
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _js_unescaped(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        if (simple := m.group(4)) is not None:
            return _JS_SIMPLE.get(simple, simple)
        code = int(m.group(1) or m.group(2) or m.group(3), 16)
        return chr(code) if code <= 0x10FFFF else "\ufffd"

    return _surrogates_joined(_JS_ESCAPE.sub(one, text))


def _pct_unescaped(text: str) -> str:
    raw = _PCT_U.sub(lambda m: chr(int(m.group(1), 16)), text)  # %uXXXX (IIS, escape())
    return "\n".join(texts_of(unquote_plus(raw.encode("utf-8", "surrogatepass"))))


def _stretches(text: str, runs: re.Pattern[str], undo: Callable[[str], str]) -> str | None:
    """The stretches of ``text`` that hold ``runs`` of escapes, each from the whitespace before
    it to the whitespace after it (so no word or base64 token is cut; at most ``_REACH`` either
    side), undone and joined by line breaks; None if undoing changes nothing. A text that is
    escapes all through is undone whole; one with a few escapes costs the few lines they are
    on, not another copy of the text."""
    spans: list[list[int]] = []
    for m in runs.finditer(text):
        start, end = m.span()
        if spans and start - spans[-1][1] <= _GAP:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    pieces = []
    for start, end in spans:
        before = _LAST_SPACE.match(text, max(0, start - _REACH), max(0, start - _CONTEXT))
        lo = before.end() if before else max(0, start - _REACH)
        after = _SPACE_CHAR.search(text, min(len(text), end + _CONTEXT), end + _REACH)
        hi = after.start() if after else min(len(text), end + _REACH)
        piece = text[lo:hi]
        undone = undo(piece)
        if undone != piece:
            pieces.append(undone)
    return "\n".join(pieces) if pieces else None


def _hex_bytes_unescaped(text: str) -> str:
    """\\xe6\\x9c\\xba as bytes (Python and C string literals, logs), not code points."""

    def run(m: re.Match[str]) -> str:
        raw = bytes.fromhex(m.group().replace("\\x", ""))
        return texts_of(raw)[0] if raw else ""

    return _HEX_BYTES.sub(run, text)


# --- base64 and data: URLs -------------------------------------------------------------------

# Runs of base64 characters; lines are joined (MIME wraps at 76, PEM at 64) when each line
# break is followed by more base64. (A lookahead that skips words inside the pattern costs
# more than the check in Python below: runs of 12 or more are rare in prose.)
_B64_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{12,}(?:(?:\r\n|\r|\n)[A-Za-z0-9+/_-]{2,})*={0,2}")
# Chinese text is searched for base64 in its ASCII bytes first (a fifth of it, in C), then
# whole only if a run was found there.
_B64_PROBE = re.compile(rb"[A-Za-z0-9+/_-]{12}")
_LINE_BREAKS = str.maketrans("", "", "\r\n")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}|\\(?:u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[nrtbf\"'\\/])")
_DATA_URL_REST = r"([\w.+-]*/?[\w.+-]*(?:;[\w.+-]+=[^;,\s\"'<>]*)*)(;(?i:base64))?,"
_DATA_URL = re.compile("data:" + _DATA_URL_REST)  # a literal start: found at memchr speed
_DATA_URL_ANY_CASE = re.compile("(?i:data):" + _DATA_URL_REST)
_DATA_PAYLOAD = re.compile(r"[^\s\"'<>()\\]*")


_URLSAFE = str.maketrans("-_", "+/")


def _b64(block: str) -> bytes | None:
    """Standard or URL-safe base64 (not both: "a/b-c" is a path), padding optional."""
    block = block.rstrip("=")  # padding is optional, and may have been cut
    if "-" in block or "_" in block:
        if "+" in block or "/" in block:
            return None
        dashes = block.count("-") + block.count("_")
        if dashes * 4 > len(block):
            return None  # a rule (-----) or snake_case words: URL-safe base64 has 1 in 32
        block = block.translate(_URLSAFE)
    try:
        return base64.b64decode(block + "=" * (-len(block) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _a_word(token: str) -> bool:
    """Letters, all lowercase after the first: a word ("internationalization"), not base64.
    No marker's base64 is such a run, in UTF-8 or GBK, in any letter case or alignment
    (tests/unit/test_decode.py); all-capital runs are decoded ("aTOP SECRET" is YVRPUCBT...)."""
    return token.isalpha() and token[1:].islower()


_PRINTABLE_ASCII = bytes(range(0x20, 0x7F)) + b"\t\n\r"
_EUC_BYTES = _PRINTABLE_ASCII + bytes(range(0xA1, 0xFF))  # GB2312/EUC-CN: both bytes ≥ 0xA1


def _short_texts(raw: bytes) -> list[str]:
    """The texts a short base64 token's bytes read as, if they are text: UTF-8, else GB2312
    (common simplified Chinese), Big5 or UTF-16 — every character a plausible one. Random
    bytes (the base64 of nothing, a file name that looks like base64) seldom pass."""
    if raw.isascii():
        return [raw.decode()] if not raw.translate(None, _PRINTABLE_ASCII) else []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return [text] if all_plausible(text) else []
    found = []
    if not raw.translate(None, _EUC_BYTES) and (text := _strict(raw, "gb18030")):
        found.append(text)
    for codec in ("big5", "utf-16-le", "utf-16-be"):
        if (text := _strict(raw, codec)) and all_plausible(text):
            found.append(text)
    return found


def _strict(raw: bytes, codec: str) -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        return ""


_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf")


# --- JSON ------------------------------------------------------------------------------------


def _pairs(pairs: list[tuple[str, object]]) -> list[tuple[str, object]]:
    return pairs  # every (key, value), duplicates too: a server may keep either


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)
_SPACE = re.compile(r"[\s\x1e]*")  # whitespace and RS (application/json-seq) between texts


def json_values(text: str) -> tuple[list[object], bool]:
    """The JSON texts in ``text`` (one, or a sequence: JSON lines), and whether that was all
    of it."""
    values: list[object] = []
    pos = _SPACE.match(text).end()  # type: ignore[union-attr]
    try:
        while pos < len(text):
            value, pos = _DECODER.raw_decode(text, pos)
            values.append(value)
            pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
    except (ValueError, RecursionError):
        return values, False
    return values, True


# --- email -----------------------------------------------------------------------------------

_MAIL_HEADER = re.compile(
    rb"(?:[!-9;-~]{1,76}:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*){2,}?\r?\n", re.DOTALL
)
_MAIL_NAMES = re.compile(
    rb"^(?:from|to|cc|subject|date|message-id|mime-version|received|return-path|reply-to|"
    rb"x-mailer|delivered-to):",
    re.IGNORECASE | re.MULTILINE,
)


def looks_like_email(data: bytes) -> bool:
    head = data[:16384]
    m = _MAIL_HEADER.match(head)
    return bool(m) and len(_MAIL_NAMES.findall(m.group())) >= 2


def _parsed_texts(text: str) -> list[str]:
    """A string from the email parser, whose 8-bit bytes (UTF-8, GBK...) it kept as lone
    surrogates: every reading of those bytes."""
    if text.isascii():
        return [text]
    return texts_of(text.encode("utf-8", "surrogateescape"))


def _header_texts(msg: Message) -> str:
    lines = []
    for name, value in msg.raw_items():
        value = str(value)
        lines += (f"{name}: {t}" for t in _parsed_texts(value))
        if "=?" in value:
            # a malformed encoded word: the raw value (above) is scanned
            with contextlib.suppress(ValueError, LookupError, UnicodeError, MessageError):
                lines.append(f"{name}: {make_header(decode_header(value))}")
    return "\n".join(lines)


_FORM_LIKE = re.compile(r"[^\s=&]{1,256}=[^\s&]*(?:&[^\s=&]{1,256}=[^\s&]*)+\s*")
_MULTIPART_START = re.compile(rb"--([^\r\n]{1,200}?)[ \t]*\r?\n(?=[A-Za-z-]+:)")


# --- the walk --------------------------------------------------------------------------------


class Walker:
    def __init__(self, budget: Budget, ascii_run: int = 3):
        self.budget = budget
        self.ascii_run = ascii_run  # a binary's ASCII runs shorter than this are noise

    def body(self, data: bytes, content_type: str, content_encoding: str) -> Iterator[str]:
        leftovers: list[bytes] = []
        data = undo_content_encoding(data, content_encoding, self.budget, leftovers)
        yield from self.blob(data, content_type, 0)
        for rest in leftovers:
            yield from self.blob(rest, "", 1)

    def blob(self, data: bytes, content_type: str, depth: int, name: str = "") -> Iterator[str]:
        """Whatever ``data`` is, by its bytes; ``content_type`` only lends a charset and a
        multipart boundary."""
        self.budget.part(depth)
        if name:
            yield from self.value(name, depth, embedded=False)  # "机密★合同.docx"
        if not data:
            return
        mime = content_type.split(";", 1)[0].strip().lower()
        head = data[:32]
        opened_zip = False
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
            opened_zip = True
            yield from self.archive(data, depth)
        elif b"%PDF-" in data[:1024]:  # readers accept anything before the header
            yield from self.pdf(data, depth)
        elif kind := compression_of(data[:4096]):  # ARJ's header CRC needs up to 2.6 KB
            leftovers: list[bytes] = []
            inner = decompress(kind, data, self.budget, leftovers)
            yield from self.blob(inner, "", depth + 1)
            for rest in leftovers:
                yield from self.blob(rest, "", depth + 1)
        elif (media := parse_media(data, self.budget)) is not None:
            for payload in media.carried:
                yield from self.blob(payload, "", depth + 1)
            if media.end < len(data):
                yield from self.blob(data[media.end :], "", depth + 1)
        elif looks_like_rtf(data):
            yield from self.rtf(data, depth)
        elif len(data) > 262 and data[257:262] == b"ustar":
            yield from self.tar(data, depth)
        elif mime.startswith("multipart/"):
            yield from self.multipart(data, content_type, depth)
        elif (start := _MULTIPART_START.match(data)) and b"\n--" + start.group(1) in data:
            boundary = start.group(1).decode("latin-1")
            yield from self.multipart(data, f'multipart/mixed; boundary="{boundary}"', depth)
        elif mime in ("message/rfc822", "message/global") or looks_like_email(data):
            yield from self.email(data, depth)
        elif mime == "application/x-www-form-urlencoded":
            yield from self.form(data, _param(content_type, "charset"), depth)
        else:
            for codec, skip, text in readings(data, _param(content_type, "charset")):
                if codec == BINARY_RUNS:
                    text = binary_runs(data, self.ascii_run)
                text = decode_as(data, codec, skip) if text is None else text
                if codec == BINARY_RUNS:
                    # A binary's text runs: no markup or escapes to undo in noise, and short
                    # base64-looking runs are everywhere in it; long base64 is still decoded.
                    yield text
                    yield from self.embedded(text, depth, short=False)
                else:
                    yield from self.text(text, mime, depth)
        if not opened_zip and b"PK\x05\x06" in data[-65557:]:
            # A zip appended to anything: unzip reads it from the end record at the end.
            try:
                yield from self.archive(data, depth)
            except Unscannable as e:
                if "broken zip" not in str(e):
                    raise  # over the budget; a false end record is just bytes

    def form(self, data: bytes, charset: str, depth: int) -> Iterator[str]:
        raw = form_pairs(data)
        if looks_binary(data[:SAMPLE]):
            # A file sent raw under the form label (curl --data-binary does that): a form's
            # own bytes are printable ASCII, so its "fields" are pieces of the file cut at
            # every "&". The file is read as a whole, its pieces as the server's texts below.
            yield from self.blob(data, "", depth + 1)
        else:
            for _, value in raw:
                if looks_binary(value[:SAMPLE]) or _container(value[:32]):
                    yield from self.blob(value, "", depth + 1)  # a file sent %-escaped
        for pairs in form_fields(data, charset, raw):
            for key, value in pairs:
                yield from self.text(key, "", depth)
                yield from self.text(value, "", depth)  # values carry JSON, HTML, base64

    def text(self, text: str, mime: str, depth: int, escapes: int = 2) -> Iterator[str]:
        start = _SPACE.match(text).end()  # type: ignore[union-attr]
        first = text[start : start + 1]
        if first in ("{", "["):  # JSON by its look, whatever the label says
            values, complete = json_values(text)
            yield from self.json_strings(values, depth)
            if complete and values:
                return
        if first == "<" or "xml" in mime or "html" in mime:
            yield from self.markup(text, depth, escapes)
            return
        yield from self.value(text, depth, escapes=escapes)
        if escapes == 2 and "=" in text and "&" in text and _FORM_LIKE.fullmatch(text, start):
            # A url-encoded form that lost its label (in base64, a zip, a JSON string): its
            # fields as a server reads them, each value a text of its own (JSON, base64...).
            # Only a text as it came: one already unescaped is no form any more ("+" is "+").
            self.budget.nest(depth + 1)
            yield from self.form(text[start:].encode("utf-8", "surrogatepass"), "", depth + 1)
        if "<" in text and (fragments := _stretches(text, _TAGGY, markup_text)) is not None:
            yield fragments  # HTML in "plain" text: where its tags are, as a browser shows it

    def markup(self, text: str, depth: int, escapes: int = 2) -> Iterator[str]:
        # Base64 and data: URLs are looked for in the text and the attribute values, not the
        # raw markup: together they hold every character but the tags', and cost less.
        flow, extras = markup_parts(text)
        yield from self.value(flow, depth, escapes=escapes)
        if extras:
            yield from self.value(extras, depth, escapes=escapes)

    def value(
        self, text: str, depth: int, embedded: bool = True, escapes: int = 2
    ) -> Iterator[str]:
        """A piece of text, what its escapes stand for (walked as texts of their own, up to
        ``escapes`` levels of escaping: an escaped form or JSON holds base64 too), and what is
        encoded inside it."""
        yield text
        if escapes:
            for unescaped in self.unescaped(text):
                if unescaped == text:
                    continue  # "&memo=" looked like an entity, "%zz" an escape: nothing new
                self.budget.charge(len(unescaped))
                yield from self.text(unescaped, "", depth, escapes - 1)
        if embedded:
            yield from self.embedded(text, depth)

    @staticmethod
    def unescaped(text: str) -> Iterator[str]:
        """Where ``text`` has JavaScript/C escapes, HTML entities or percent-escapes: those
        stretches (with their lines) undone."""
        if "\\" in text:
            if (found := _stretches(text, _JS_RUNS, _js_unescaped)) is not None:
                yield found
            if "\\x" in text and (found := _stretches(text, _HEX_BYTES, _hex_bytes_unescaped)):
                yield found
        if "&" in text and (found := _stretches(text, _ENTITY_RUNS, unescape)) is not None:
            yield found
        if "%" in text and (found := _stretches(text, _PCT_RUNS, _pct_unescaped)) is not None:
            yield found

    def embedded(self, text: str, depth: int, short: bool = True) -> Iterator[str]:
        """Base64 and data: URLs inside a text, decoded and walked; base64 shorter than
        ``budget.base64_min`` only when ``short``, and only when it is text."""
        if len(text) < self.budget.base64_short:
            return
        if "ata:" in text or "ATA:" in text:  # DATA: and Data: are data: URLs too
            yield from self.data_urls(text, depth)
        if not text.isascii() and not _B64_PROBE.search(text.encode("ascii", "ignore")):
            return  # no run of 12 even with the non-ASCII taken out: none in the text
        shorts: list[str] = []
        for m in _B64_TOKEN.finditer(text):
            start = m.start()
            if _ESCAPE.match(text, m.end()) or (
                start and text[start - 1] in "%\\" and _ESCAPE.match(text, start - 1)
            ):
                continue  # a piece between escapes: the unescaped text holds the whole token
            token = m.group()
            if "\n" in token or "\r" in token:
                token = token.translate(_LINE_BREAKS)
            if len(token) <= 4096 and len(set(token)) < 6:
                continue  # a rule of dashes or underscores, "AAAA...": no text in it
            if len(token) >= self.budget.base64_min:
                raw = _b64(token)
                if raw is not None:
                    self.budget.charge(len(raw))
                    yield from self.blob(raw, "", depth + 1)
            elif short and not _a_word(token) and (raw := _b64(token)) is not None:
                # Short: a compressed stream, an archive or BOM-marked text is walked; else
                # the texts it reads as, and the base64 in those (base64 of base64) below.
                if _container(raw[:32]) or raw.startswith(_BOMS):
                    yield from self.blob(raw, "", depth + 1)
                else:
                    shorts += _short_texts(raw)
        if shorts:  # one text for all of them: the scanner is called once, not per token
            self.budget.nest(depth + 1)
            joined = "\n".join(shorts)
            yield joined
            yield from self.embedded(joined, depth + 1)

    def data_urls(self, text: str, depth: int) -> Iterator[str]:
        pattern = _DATA_URL if "data:" in text else _DATA_URL_ANY_CASE
        for m in pattern.finditer(text):
            payload = _DATA_PAYLOAD.match(text, m.end()).group()  # type: ignore[union-attr]
            if m.group(2):  # base64, perhaps wrapped
                raw = _b64(re.sub(r"[^A-Za-z0-9+/_=-]", "", payload).rstrip("="))
            else:
                raw = unquote_plus(payload.encode("utf-8", "surrogatepass"))
            if raw:
                self.budget.charge(len(raw))
                yield from self.blob(raw, m.group(1), depth + 1)

    def json_strings(self, values: Iterable[object], depth: int) -> Iterator[str]:
        stack = list(values)
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                yield from (
                    self.text(item, "", depth + 1)
                    if item[:1] in ("{", "[", "<")
                    else self.value(item, depth)
                )
            elif isinstance(item, (list, tuple)):
                stack.extend(item)

    def multipart(self, data: bytes, content_type: str, depth: int) -> Iterator[str]:
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = BytesParser(policy=email_policy.HTTP).parsebytes(head + data)
        if not message.is_multipart():
            raise Unscannable("broken multipart body")
        yield from self.message(message, depth, own_headers=False)

    def email(self, data: bytes, depth: int) -> Iterator[str]:
        yield from self.message(BytesParser(policy=email_policy.HTTP).parsebytes(data), depth)

    def message(self, message: Message, depth: int, own_headers: bool = True) -> Iterator[str]:
        """Every part of a MIME message: headers (field names, file names, encoded words),
        preamble and epilogue, and each leaf's content, decoded, as a blob of its own."""
        for part in message.walk():
            if part is not message or own_headers:
                yield from self.value(_header_texts(part), depth, embedded=False)
            if part.is_multipart():
                for extra in (part.preamble, part.epilogue):
                    if extra and extra.strip():
                        for text in _parsed_texts(extra):
                            yield from self.value(text, depth)
                continue
            try:
                payload = part.get_payload(decode=True) or b""
                name = part.get_filename() or ""
                raw = part.get_payload(decode=False) if part.defects else ""
            except (ValueError, LookupError, TypeError, MessageError) as e:
                # The email package gives up on some malformed parts (a NUL in a charset)
                raise Unscannable(f"unreadable MIME part: {e}") from None
            self.budget.charge(len(payload))
            yield from self.blob(payload, str(part.get("Content-Type", "")), depth + 1, name)
            if isinstance(raw, str) and raw.strip():  # a transfer encoding that did not decode
                for text in _parsed_texts(raw):
                    yield from self.value(text, depth + 1)

    def archive(self, data: bytes, depth: int) -> Iterator[str]:
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError, OSError) as e:
            raise Unscannable(f"broken zip archive: {e}") from None
        with zf:
            if zf.comment:
                for text in texts_of(zf.comment):
                    yield from self.value(text, depth)
            for info in zf.infolist():
                yield from self.value("\n".join(_zip_names(info)), depth, embedded=False)
                if info.comment:
                    for text in texts_of(info.comment):
                        yield from self.value(text, depth)
                if info.filename.endswith("/"):  # a directory (is_dir() fails on an empty name)
                    continue
                if info.flag_bits & 0x1:
                    raise Unscannable(f"encrypted archive member {info.filename!r}")
                room = self.budget.room
                if info.file_size > room:
                    raise self.budget.too_big()
                try:
                    with zf.open(info) as member:
                        content = member.read(room + 1)
                except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
                    raise Unscannable(f"unreadable archive member: {e}") from None
                except (EOFError, OSError, ValueError) as e:  # bz2/lzma members, truncated
                    raise Unscannable(f"unreadable archive member: {e}") from None
                self.budget.charge(len(content))
                yield from self.blob(content, "", depth + 1)  # typed by content, not its name

    def tar(self, data: bytes, depth: int) -> Iterator[str]:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
                for member in tf:
                    self.budget.tick()
                    names = [member.name, member.linkname, *member.pax_headers.values()]
                    yield from self.value("\n".join(n for n in names if n), depth)
                    if not member.isfile():
                        continue
                    if member.size > self.budget.room:
                        raise self.budget.too_big()
                    extracted = tf.extractfile(member)
                    content = extracted.read() if extracted else b""
                    self.budget.charge(len(content))
                    yield from self.blob(content, "", depth + 1)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise Unscannable(f"broken tar archive: {e}") from None

    def rtf(self, data: bytes, depth: int) -> Iterator[str]:
        texts, objects = rtf_texts(data)
        for text in texts:
            self.budget.charge(len(text))
            yield from self.value(text, depth)
        for obj in objects:
            yield from self.blob(obj, "", depth + 1)

    def pdf(self, data: bytes, depth: int) -> Iterator[str]:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError, PdfStreamError

        try:
            reader = PdfReader(io.BytesIO(data[data.find(b"%PDF-") :]))
            if reader.is_encrypted and not reader.decrypt(""):
                raise Unscannable("encrypted PDF")
            for page in reader.pages:
                self.budget.part(depth)
                text = page.extract_text() or ""
                self.budget.charge(len(text))
                yield text
            info = reader.metadata
            if info:
                yield "\n".join(str(v) for v in info.values())
            strings, files = _pdf_objects(reader, self.budget)
        except Unscannable:
            raise
        except (PdfReadError, PdfStreamError, ValueError, KeyError, TypeError) as e:
            raise Unscannable(f"unreadable PDF: {e}") from None
        except Exception as e:  # pypdf raises many kinds of error on a malformed file
            raise Unscannable(f"unreadable PDF: {e!r}") from None
        if strings:
            yield from self.value("\n".join(strings), depth)
        for content in files:
            yield from self.blob(content, "", depth + 1)


def _zip_names(info: zipfile.ZipInfo) -> list[str]:
    """A member's name as every unzip may show it: UTF-8 when flagged, else the bytes in each
    legacy code page (zipfile reads them as cp437; Chinese Windows wrote GBK); and the
    Info-ZIP Unicode Path extra field."""
    names = [info.filename]
    if not info.flag_bits & 0x800:
        try:
            raw = info.orig_filename.encode("cp437")
        except UnicodeEncodeError:
            raw = b""
        if raw and not raw.isascii():
            names += texts_of(raw)
    extra = info.extra
    while len(extra) >= 4:
        kind, size = int.from_bytes(extra[:2], "little"), int.from_bytes(extra[2:4], "little")
        if kind in (0x7075, 0x6375) and size > 5:  # Unicode path / comment: version, CRC, text
            names.append(extra[9 : 4 + size].decode("utf-8", "replace"))
        extra = extra[4 + size :]
    return names


_PDF_STREAM_TYPES = frozenset({"/EmbeddedFile", "/Metadata", "/XML"})


def _pdf_objects(reader: object, budget: Budget) -> tuple[list[str], list[bytes]]:
    """Every text string in the document (annotations, form fields, bookmarks, names...) and
    the data of its embedded files and XML streams, by walking the object graph."""
    from pypdf.generic import (
        ArrayObject,
        ByteStringObject,
        DictionaryObject,
        IndirectObject,
        StreamObject,
        TextStringObject,
    )

    strings: list[str] = []
    files: list[bytes] = []
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[object, bool]] = [(reader.trailer, False)]  # type: ignore[attr-defined]
    steps = 0
    while stack:
        obj, wanted = stack.pop()
        if isinstance(obj, IndirectObject):
            key = (obj.idnum, obj.generation)
            if key in seen:
                continue
            seen.add(key)
            obj = obj.get_object()
        steps += 1
        if steps % 256 == 0:
            budget.tick()
        if isinstance(obj, TextStringObject):
            strings.append(str(obj))
        elif isinstance(obj, ByteStringObject):
            strings += texts_of(bytes(obj))
        elif isinstance(obj, DictionaryObject):
            if isinstance(obj, StreamObject) and (
                wanted
                or obj.get("/Type") in _PDF_STREAM_TYPES
                or obj.get("/Subtype") in _PDF_STREAM_TYPES
            ):
                content = obj.get_data()
                budget.charge(len(content))
                files.append(content)
            for k, v in obj.items():
                if k in ("/Parent", "/P"):
                    continue  # back links: reached anyway
                # /EF holds embedded files' streams, /JS JavaScript
                stack.append((v, k in ("/JS",)))
                if k == "/EF" and isinstance(v.get_object(), DictionaryObject):
                    stack += ((f, True) for f in v.get_object().values())
        elif isinstance(obj, ArrayObject):
            stack += ((v, False) for v in obj)
    budget.charge(sum(map(len, strings)))
    return strings, files


def extract_texts(
    data: bytes, content_type: str = "", content_encoding: str = "", budget: Budget | None = None
) -> Iterator[str]:
    """Every text inside a request body. Raises Unscannable when the budget is exceeded."""
    return Walker(budget or Budget()).body(data, content_type, content_encoding)
