"""Decompress: undoes compression within a ``Budget`` — Content-Encoding (gzip, deflate, br,
zstd, stacked) and compressed bodies or archive members known by their magic bytes (gzip,
bzip2, xz, .lzma, zstd).

Every member, stream or frame is decompressed, not only the first: concatenated gzip members,
bzip2 and xz streams and zstd frames are all read, and bytes after the last one are handed back
as *leftovers* for the caller to scan (a server may read them; nothing is silently dropped).
Output is produced in bounded steps, so a bomb costs at most the budget's bytes of memory. A
compressed format that cannot be opened here is ``Unscannable``, never skipped.
"""

from __future__ import annotations

import bz2
import lzma
import re
import zlib
from collections.abc import Callable
from typing import Protocol

import brotli
import zstandard

from .budget import Budget, Unscannable

STEP = 1024 * 1024  # output per decompression call: memory stays bounded whatever the ratio
_ZSTD_IN = 256  # zstd input per call: a 4-byte RLE block is 128 KiB, so ≤ 8 MiB out per step


class _Out:
    """Output chunks, joined once at the end (a bytearray grown by 1 MiB steps copies)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def __bool__(self) -> bool:
        return self.size > 0


def _grow(out: _Out, chunk: bytes, budget: Budget) -> None:
    out.chunks.append(chunk)
    out.size += len(chunk)
    if out.size > budget.room:
        raise budget.too_big()
    budget.tick()


def _done(out: _Out, budget: Budget) -> bytes:
    budget.charge(out.size)
    return out.chunks[0] if len(out.chunks) == 1 else b"".join(out.chunks)


def _keep(rest: bytes, leftovers: list[bytes]) -> None:
    # Zero padding after a stream is what tape-block writers add: nothing to read in it.
    if rest.strip(b"\x00"):
        leftovers.append(rest)


def inflate(data: bytes, wbits: int, budget: Budget, leftovers: list[bytes]) -> bytes:
    """zlib, gzip (every member) or raw deflate; what follows the last member → leftovers."""
    out = _Out()
    rest = data
    while rest:
        d = zlib.decompressobj(wbits)
        pending = rest
        while True:
            chunk = d.decompress(pending, STEP)
            _grow(out, chunk, budget)
            pending = d.unconsumed_tail
            if d.eof or (not pending and len(chunk) < STEP):
                break
        if not d.eof:
            break  # truncated: what came out is scanned
        rest = d.unused_data
        if wbits > zlib.MAX_WBITS and rest[:2] == b"\x1f\x8b":
            continue  # the next gzip member
        if wbits == zlib.MAX_WBITS and rest[:1] == b"\x78" and _zlib_header(rest):
            continue  # the next zlib stream
        _keep(rest, leftovers)
        break
    return _done(out, budget)


def _zlib_header(data: bytes) -> bool:
    return len(data) >= 2 and (data[0] << 8 | data[1]) % 31 == 0


class _Streamer(Protocol):
    eof: bool
    needs_input: bool
    unused_data: bytes

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def _streams(
    data: bytes,
    make: Callable[[], _Streamer],
    magic: tuple[bytes, ...],
    what: str,
    budget: Budget,
    leftovers: list[bytes],
) -> bytes:
    """bzip2 / xz / lzma: each concatenated stream in turn, in bounded steps."""
    out = _Out()
    rest = data
    errors = (OSError, EOFError, ValueError, lzma.LZMAError)
    while rest:
        d = make()
        try:
            chunk = d.decompress(rest, STEP)
            while True:
                _grow(out, chunk, budget)
                if d.eof or d.needs_input:
                    break
                chunk = d.decompress(b"", STEP)
        except errors as e:
            raise Unscannable(f"broken {what} stream: {e}") from None
        if not d.eof:
            if not out:
                raise Unscannable(f"broken {what} stream: ends before any data")
            break  # truncated: what came out is scanned
        rest = d.unused_data
        if what == "xz":
            rest = rest.lstrip(b"\x00")  # stream padding between xz streams
        if not rest.startswith(magic):
            _keep(rest, leftovers)
            break
    return _done(out, budget)


def _zstd(data: bytes, budget: Budget, leftovers: list[bytes]) -> bytes:
    """Every zstd frame (skippable ones included), in bounded steps."""
    out = _Out()
    rest = data
    dctx = zstandard.ZstdDecompressor()
    while rest:
        d = dctx.decompressobj()
        i = 0
        try:
            while i < len(rest) and not d.eof:
                _grow(out, d.decompress(rest[i : i + _ZSTD_IN]), budget)
                i += _ZSTD_IN
        except zstandard.ZstdError as e:
            raise Unscannable(f"broken zstd frame: {e}") from None
        if not d.eof:
            if not out:
                raise Unscannable("broken zstd frame: ends before any data")
            break
        rest = d.unused_data + rest[i:]
        if not _is_zstd(rest):
            _keep(rest, leftovers)
            break
    return _done(out, budget)


def _is_zstd(data: bytes) -> bool:
    return data[:4] == b"\x28\xb5\x2f\xfd" or (
        data[1:4] == b"\x2a\x4d\x18" and 0x50 <= data[0] <= 0x5F  # a skippable frame
    )


def _brotli(data: bytes, budget: Budget) -> bytes:
    # Brotli has no framing: bytes after the end of the stream make process() fail, and that
    # is unscannable (not dropped).
    d = brotli.Decompressor()
    out = _Out()
    for i in range(0, len(data), 256):  # small input steps keep each step's output bounded
        _grow(out, d.process(data[i : i + 256]), budget)
    return _done(out, budget)


def undo_content_encoding(
    data: bytes, header: str, budget: Budget, leftovers: list[bytes] | None = None
) -> bytes:
    """Undo a (possibly stacked) Content-Encoding, last applied first. Bytes after the end of a
    compressed stream go to ``leftovers`` (dropped if none is given)."""
    spare: list[bytes] = [] if leftovers is None else leftovers
    for coding in reversed([c.strip().lower() for c in header.split(",") if c.strip()]):
        try:
            if coding in ("gzip", "x-gzip"):
                data = inflate(data, 16 + zlib.MAX_WBITS, budget, spare)
            elif coding == "deflate":
                try:
                    data = inflate(data, zlib.MAX_WBITS, budget, spare)
                except zlib.error:
                    data = inflate(data, -zlib.MAX_WBITS, budget, spare)  # raw deflate
            elif coding == "br":
                data = _brotli(data, budget)
            elif coding == "zstd":
                data = _zstd(data, budget, spare)
            elif coding != "identity":
                raise Unscannable(f"unknown content-encoding {coding!r}")
        except (zlib.error, brotli.error) as e:
            raise Unscannable(f"broken {coding} content-encoding: {e}") from None
    return data


# --- compressed bodies known by their magic bytes ---------------------------------------------

# Compressed or archive formats that cannot be opened here: what they carry cannot be checked.
# Each magic holds a byte no text starts with, so that a text is never taken for one, and is
# long enough (or checked further below) that random bytes — an encrypted file — are not
# taken for one either: a refusal of one upload in sixty thousand would be noticed. pack and
# SCO LZH (two-byte magics with nothing to check after) are not recognized.
OPAQUE: tuple[tuple[bytes, str], ...] = (
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"\x04\x22\x4d\x18", "lz4 frame"),
    (b"\x02\x21\x4c\x18", "lz4 legacy frame"),
    (b"LZIP\x01", "lzip stream"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzop stream"),
    (b"MSCF\x00\x00\x00\x00", "cabinet archive"),
    (b"xar!\x00\x1c", "xar archive"),
    (b"SIT!\x00", "StuffIt archive"),
    (b"StuffIt (c)", "StuffIt archive"),
)
_LHA = re.compile(rb"..-l[hz][0-9a-z]-", re.DOTALL)


def _is_arj(head: bytes) -> bool:
    """An ARJ main header: its two magic bytes alone start one random blob in 65 536, so the
    header's size and its CRC-32 must agree too (checked when the head holds it)."""
    if head[:2] != b"\x60\xea" or len(head) < 4:
        return False
    size = int.from_bytes(head[2:4], "little")
    if not 30 <= size <= 2600:
        return False
    if len(head) < 4 + size + 4:
        return len(head) < 32  # a short body: the magic and a plausible size; else look at all
    header, crc = head[4 : 4 + size], int.from_bytes(head[4 + size : 8 + size], "little")
    return zlib.crc32(header) == crc


def compression_of(head: bytes) -> str:
    """The compressed format the first (at least 22) bytes start, "" if none. Raises
    Unscannable for a format that cannot be opened here."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bzip2"  # the magic, the block size, then a block's or the end's magic
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if _is_zstd(head):
        return "zstd"
    if (
        head[:3] == b"\x5d\x00\x00"
        and len(head) >= 13
        and (head[5:13] == b"\xff" * 8 or head[12] == 0)
    ):
        return "lzma"  # .lzma (LZMA_Alone): properties 0x5d, dictionary size, length
    for magic, what in OPAQUE:
        if head.startswith(magic):
            raise Unscannable(f"{what} (contents cannot be inspected)")
    if (
        head[:2] == b"\x1f\x9d"
        and len(head) > 2
        and head[2] & 0x60 == 0
        and 9 <= head[2] & 0x1F <= 16
    ):
        # compress (.Z): the flags byte (unused bits clear, 9-16 code bits) backs the
        # two-byte magic, which alone starts one random blob in 65 536
        raise Unscannable("compress (.Z) stream (contents cannot be inspected)")
    if _is_arj(head):
        raise Unscannable("ARJ archive (contents cannot be inspected)")
    if _LHA.match(head) and len(head) > 21 and head[20] <= 3:  # the header's level byte
        raise Unscannable("LHA archive (contents cannot be inspected)")
    if head[7:14] == b"**ACE**":
        raise Unscannable("ACE archive (contents cannot be inspected)")
    return ""


def decompress(kind: str, data: bytes, budget: Budget, leftovers: list[bytes]) -> bytes:
    """A body or member in the compressed format ``kind`` (from ``compression_of``)."""
    try:
        if kind == "gzip":
            return inflate(data, 16 + zlib.MAX_WBITS, budget, leftovers)
        if kind == "zstd":
            return _zstd(data, budget, leftovers)
    except zlib.error as e:
        raise Unscannable(f"broken {kind} stream: {e}") from None
    if kind == "bzip2":
        return _streams(data, bz2.BZ2Decompressor, (b"BZh",), "bzip2", budget, leftovers)
    if kind == "xz":
        return _streams(data, lzma.LZMADecompressor, (b"\xfd7zXZ\x00",), "xz", budget, leftovers)
    if kind == "lzma":
        return _streams(
            data,
            lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE),
            (b"\x5d\x00\x00",),
            "lzma",
            budget,
            leftovers,
        )
    raise Unscannable(f"unknown compressed format {kind!r}")
