"""Media: tells real pictures and video from bytes that only start like them.

A body is media only when its bytes parse as that format to the format's own end: PNG (every
chunk's CRC, IHDR first, up to IEND), JPEG (segments up to SOS, entropy-coded data, up to EOI),
GIF (blocks up to the trailer), ISO-BMFF (MP4/MOV/HEIC: boxes that tile the file) and RIFF
(WAV/AVI/WebP). A Content-Type or a file name never makes bytes media.

What parses is skipped as pixels and samples, except what such files carry as text or as
anything a reader could take out: PNG text chunks (tEXt, zTXt, iTXt) and chunks that are not
image data, JPEG APPn segments (Exif, XMP, IPTC) and comments, GIF comments and application
extensions, BMFF boxes other than media data, RIFF chunks other than samples. Those are handed
back as ``carried`` payloads for the caller to walk, and the bytes after the end of the media
as ``rest``. The compressed payload of a real picture (IDAT, entropy-coded scans, mdat) is not
read: that is the one thing believed.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from .budget import Budget
from .decompress import inflate


@dataclass
class Media:
    kind: str
    end: int  # where the media ends; what follows is ``rest``
    carried: list[bytes] = field(default_factory=list)


def parse_media(data: bytes, budget: Budget) -> Media | None:
    """The media these bytes are, or None: not media, or not media to its end."""
    head = data[:12]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data, budget)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(data)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(data)
    if head[4:8] == b"ftyp":
        return _bmff(data)
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI ", b"WEBP"):
        return _riff(data)
    return None


def _be32(data: bytes | memoryview, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


# --- PNG --------------------------------------------------------------------------------------

# Chunks that hold pixels, palette or colour data: nothing a reader takes out as text.
_PNG_IMAGE = frozenset(
    b"IHDR PLTE IDAT tRNS cHRM gAMA sBIT sRGB bKGD hIST pHYs sPLT tIME acTL fcTL fdAT cICP "
    b"mDCv cLLi".split()
)


def _png(data: bytes, budget: Budget) -> Media | None:
    view = memoryview(data)
    media = Media("png", 0)
    pos = 8
    while pos + 12 <= len(data):
        length = _be32(view, pos)
        kind = bytes(view[pos + 4 : pos + 8])
        end = pos + 12 + length
        if end > len(data) or not kind.isalpha():
            return None
        if zlib.crc32(view[pos + 4 : end - 4]) != _be32(view, end - 4):
            return None
        if (pos == 8) != (kind == b"IHDR"):
            return None
        payload = data[pos + 8 : end - 4]
        if kind == b"IEND":
            media.end = end
            return media
        if kind == b"tEXt":
            media.carried.append(payload.replace(b"\x00", b"\n", 1))
        elif kind == b"zTXt":
            keyword, _, rest = payload.partition(b"\x00")
            media.carried.append(keyword + b"\n" + _inflated(rest[1:], budget))
        elif kind == b"iTXt":
            keyword, _, rest = payload.partition(b"\x00")
            compressed = rest[:1] == b"\x01"
            language, _, rest = rest[2:].partition(b"\x00")
            translated, _, text = rest.partition(b"\x00")
            if compressed:
                text = _inflated(text, budget)
            media.carried.append(b"\n".join((keyword, language, translated, text)))
        elif kind == b"iCCP":
            media.carried.append(payload.partition(b"\x00")[0])  # the profile's name
        elif kind not in _PNG_IMAGE:
            media.carried.append(payload)  # eXIf, private and unknown chunks: whatever they hold
        pos = end
    return None


def _inflated(data: bytes, budget: Budget) -> bytes:
    leftovers: list[bytes] = []
    try:
        out = inflate(data, zlib.MAX_WBITS, budget, leftovers)
    except zlib.error:
        return data  # not zlib after all: the bytes as they are
    return b"\n".join([out, *leftovers])


# --- JPEG -------------------------------------------------------------------------------------

# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; anything
# else starts the next marker.
_JPEG_MARKER = re.compile(rb"\xff(?![\x00\xd0-\xd7])")


def _jpeg(data: bytes) -> Media | None:
    media = Media("jpeg", 0)
    n = len(data)
    pos = 2
    while pos < n:
        if data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            media.end = pos
            return media
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # markers without a length
        if marker in (0x00, 0xD8) or pos + 2 > n:
            return None
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > n:
            return None
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn (Exif, XMP, IPTC...), COM
            media.carried.append(data[pos + 2 : pos + length])
        pos += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                return None
            pos = m.start()
    return None


# --- GIF --------------------------------------------------------------------------------------


def _sub_blocks(data: bytes, pos: int, keep: bool) -> tuple[bytes, int] | None:
    out = []
    n = len(data)
    while pos < n:
        size = data[pos]
        pos += 1
        if size == 0:
            return b"".join(out), pos
        if pos + size > n:
            return None
        if keep:
            out.append(data[pos : pos + size])
        pos += size
    return None


def _gif(data: bytes) -> Media | None:
    n = len(data)
    if n < 13:
        return None
    media = Media("gif", 0)
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < n:
        block = data[pos]
        if block == 0x3B:  # trailer
            media.end = pos + 1
            return media
        if block == 0x21:  # extension: comment, plain text, application (XMP) carried
            if pos + 2 > n:
                return None
            label = data[pos + 1]
            found = _sub_blocks(data, pos + 2, keep=label in (0xFE, 0x01, 0xFF))
            if found is None:
                return None
            payload, pos = found
            if payload:
                media.carried.append(payload)
        elif block == 0x2C:  # image: descriptor, local colour table, LZW data
            if pos + 11 > n:
                return None
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
            found = _sub_blocks(data, pos, keep=False)
            if found is None:
                return None
            pos = found[1]
        else:
            return None
    return None


# --- ISO base media (MP4, MOV, 3GP, HEIC, AVIF) and RIFF (WAV, AVI, WebP) ----------------------


def _bmff(data: bytes) -> Media | None:
    """Top-level boxes must tile the file exactly; every box but the media data is carried
    (metadata: udta, meta, uuid, free...), as one payload."""
    media = Media("bmff", 0)
    carried = []
    pos, n = 0, len(data)
    while pos < n:
        if pos + 8 > n:
            return None
        size, kind = _be32(data, pos), data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            if pos + 16 > n:
                return None
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = n - pos  # the last box, to the end of the file
        if size < header or pos + size > n or not kind.isascii():
            return None
        if kind != b"mdat":
            carried.append(data[pos + header : pos + size])
        pos += size
    media.end = n
    media.carried.append(b"\n".join(carried))
    return media


_RIFF_SAMPLES = frozenset({b"data", b"fmt ", b"idx1", b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANMF"})


def _riff(data: bytes) -> Media | None:
    size = int.from_bytes(data[4:8], "little")
    end = 8 + size
    if end > len(data) or size < 4:
        return None
    media = Media("riff", end)
    pos = 12
    while pos < end:
        if pos + 8 > end:
            return None
        kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        stop = pos + 8 + length
        if stop > end:
            return None
        if kind == b"LIST" and data[pos + 8 : pos + 12] == b"movi":
            pass  # AVI frames
        elif kind not in _RIFF_SAMPLES:
            media.carried.append(data[pos + 8 : stop])  # INFO lists, XMP, EXIF, unknown
        pos = stop + (length & 1)  # chunks are padded to an even length
    return media
