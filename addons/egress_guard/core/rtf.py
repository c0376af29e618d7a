"""RTF: the text of a Rich Text Format document as a word processor shows it.

Control words go, groups are followed for their state, \\par and friends become line breaks
(markers are matched at line starts). \\uN escapes are UTF-16 code units (signed) followed by
\\ucN fallback characters that are skipped; \\'hh escapes are bytes in the code page in force:
the current font's \\fcharset (Word writes Chinese as GB2312 bytes under \\ansicpg1252 that
way), else the document's \\ansicpgN, else Windows-1252. Because a document can lie about its
code pages, byte runs are also read in each CJK code page when they hold bytes above 0x7F.

Binary destinations (\\pict, \\bin and the like) are not text and are left out; \\objdata (an
embedded OLE object, hex) is returned as bytes for the caller to walk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(
    rb"\\([a-zA-Z]{1,32})(-?\d{1,10})? ?|\\'([0-9a-fA-F]{2})|\\(.)|([{}])|([^\\{}\r\n]+)|[\r\n]+",
    re.DOTALL,
)
_FCHARSET_CODEPAGE = {
    0: "cp1252", 77: "mac_roman", 128: "cp932", 129: "cp949", 130: "johab", 134: "gbk",
    136: "cp950", 161: "cp1253", 162: "cp1254", 163: "cp1258", 177: "cp1255", 178: "cp1256",
    186: "cp1257", 204: "cp1251", 222: "cp874", 238: "cp1250",
}  # fmt: skip
_CJK = ("gb18030", "cp950", "cp932", "cp949")
_BREAKS = frozenset({b"par", b"line", b"sect", b"page", b"row", b"cell", b"nestcell", b"lbr"})
_SKIPPED = frozenset(
    {b"pict", b"themedata", b"colorschememapping", b"datastore", b"blipuid", b"bliptag"}
)
# Groups that are not body text (font table, document info, headers, fields...): their text
# goes on lines of its own, so that it neither joins the body's first line nor hides a label.
_DESTINATIONS = frozenset(
    b"fonttbl colortbl stylesheet info title subject author operator keywords comment doccomm "
    b"company category manager hlinkbase header headerl headerr headerf footer footerl footerr "
    b"footerf footnote annotation atnid atnauthor field fldinst fldrslt listtable "
    b"listoverridetable rsidtbl generator xmlnstbl pgdsctbl latentstyles revtbl".split()
)
_SPECIALS = {
    b"tab": "\t", b"emdash": "—", b"endash": "–", b"bullet": "•", b"lquote": "‘",
    b"rquote": "’", b"ldblquote": "“", b"rdblquote": "”", b"emspace": " ", b"enspace": " ",
    b"~": " ", b"_": "-",
}  # fmt: skip


@dataclass
class _State:
    uc: int = 1  # fallback characters after \uN
    codepage: str = ""  # of the current font, "" for the document's
    skip: bool = False  # inside a binary destination
    objdata: bool = False
    destination: bool = False  # a group whose text is not body text


def looks_like_rtf(data: bytes) -> bool:
    return data.lstrip()[:5] == b"{\\rtf"


def rtf_texts(data: bytes) -> tuple[list[str], list[bytes]]:
    """The document's text (one reading per plausible code page) and its embedded objects."""
    pieces: list[str | tuple[bytes, str]] = []  # text, or (bytes, code page they are in)
    objects: list[bytes] = []
    font_codepage: dict[int, str] = {}
    document = "cp1252"
    state = _State()
    stack: list[_State] = []
    pending_font = -1  # \fN seen in the font table, waiting for its \fcharset
    in_fonttbl = 0
    fallback = 0  # characters still to skip after \uN
    raw = bytearray()  # \'hh bytes of the current run
    hex_digits = bytearray()
    run_codepage = ""
    group_start = False  # the token before was "{": a destination word may follow

    def flush() -> None:
        nonlocal raw
        if raw:
            pieces.append((bytes(raw), run_codepage or document))
            raw = bytearray()

    pos = 0
    while (m := _TOKEN.search(data, pos)) is not None:
        pos = m.end()
        word, arg, hexbyte, symbol, brace, text = m.groups()
        starts_group, group_start = group_start, False
        if brace is not None:
            flush()
            if brace == b"{":
                stack.append(state)
                state = _State(state.uc, state.codepage, state.skip, state.objdata)
                group_start = True
            else:
                if state.objdata and not (stack and stack[-1].objdata) and hex_digits:
                    objects.append(bytes.fromhex(hex_digits[: len(hex_digits) & ~1].decode()))
                    hex_digits = bytearray()
                if state.destination:
                    pieces.append("\n")
                state = stack.pop() if stack else _State()
                if in_fonttbl and len(stack) < in_fonttbl:
                    in_fonttbl = 0
            continue
        if starts_group and (symbol == b"*" or word in _DESTINATIONS):
            state.destination = True
            pieces.append("\n")
        if state.skip:
            continue
        if state.objdata:
            if text:
                hex_digits += re.sub(rb"[^0-9a-fA-F]", b"", text)
            continue
        if hexbyte is not None:
            if fallback:
                fallback -= 1
                continue
            if raw and run_codepage != state.codepage:
                flush()
            run_codepage = state.codepage
            raw.append(int(hexbyte, 16))
            continue
        if text is not None:
            if fallback:
                skipped = min(fallback, len(text))
                fallback -= skipped
                text = text[skipped:]
            if not text:
                continue
            if raw or not text.isascii():
                # Bytes in the code page: a DBCS character's trail byte is often written as
                # the ASCII letter it is (\'b6i), and 8-bit bytes are sometimes written raw.
                if raw and run_codepage != state.codepage:
                    flush()
                run_codepage = state.codepage
                raw += text
                continue
            pieces.append(text.decode("ascii"))
            continue
        if symbol is not None:
            flush()
            if symbol in b"\\{}":
                pieces.append(symbol.decode())
            elif symbol == b"*":
                pass
            elif symbol in (b"~", b"_"):
                pieces.append(_SPECIALS[symbol])
            elif symbol in b"\r\n":
                pieces.append("\n")  # a backslash before a line end is \par
            continue
        if word is None:  # a line break in the source: not text
            continue
        flush()
        n = int(arg) if arg else None
        if word == b"u" and n is not None:
            pieces.append(chr(n % 65536))
            fallback = state.uc
        elif word == b"uc" and n is not None:
            state.uc = max(n, 0)
        elif word == b"ansicpg" and n:
            document = f"cp{n}"
        elif word == b"fonttbl":
            in_fonttbl = len(stack)
        elif word == b"f" and n is not None:
            if in_fonttbl:
                pending_font = n
            else:
                state.codepage = font_codepage.get(n, "")
        elif word == b"fcharset" and n is not None and in_fonttbl and pending_font >= 0:
            font_codepage[pending_font] = _FCHARSET_CODEPAGE.get(n, "")
        elif word == b"cpg" and n and in_fonttbl and pending_font >= 0:
            font_codepage[pending_font] = f"cp{n}"
        elif word in _BREAKS:
            pieces.append("\n")
        elif word in _SPECIALS:
            pieces.append(_SPECIALS[word])
        elif word in _SKIPPED:
            state.skip = True
        elif word == b"bin" and n and n > 0:
            pos += n  # n bytes of binary data, braces and backslashes included
        elif word == b"objdata":
            state.objdata = True
    flush()
    if hex_digits:
        objects.append(bytes.fromhex(hex_digits[: len(hex_digits) & ~1].decode()))

    def render(override: str) -> str:
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
            else:
                out.append(_decode(piece[0], override or piece[1]))
        # \uN escapes are UTF-16 code units: join surrogate pairs
        return "".join(out).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    texts = [render("")]
    if any(not isinstance(p, str) and max(p[0]) > 0x7F for p in pieces):
        texts += [render(codepage) for codepage in _CJK]
    return texts, objects


def _decode(raw: bytes, codepage: str) -> str:
    try:
        return raw.decode(codepage, "replace")
    except LookupError:
        return raw.decode("cp1252", "replace")
