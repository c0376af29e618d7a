"""Spool: the durable on-disk queue between the proxy and the store.

Every batch of log rows is appended here, fsync'd, before it is inserted into ClickHouse, and
stays until the store has it. Records are append-only segment files of checksummed frames::

    [4 bytes length][4 bytes CRC-32][payload: one msgpack batch of rows]

A batch is inserted with the deduplication token ``<segment>:<offset>``: after a crash between
insert and checkpoint, replaying the same frame is the same insert and ClickHouse drops it.
A frame whose checksum fails is skipped (reported); a torn frame at the end of the last segment
(a crash mid-write) is where that segment ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")
_SEGMENT_SUFFIX = ".seg"
_CHECKPOINT = "checkpoint"


class SpoolFull(Exception):
    """The spool reached its size limit (the store has been away for long)."""


@dataclass(frozen=True)
class Frame:
    segment: int
    offset: int
    payload: bytes

    @property
    def token(self) -> str:
        return f"{self.segment}:{self.offset}"

    @property
    def end(self) -> int:
        return self.offset + _HEADER.size + len(self.payload)


class Spool:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        on_corrupt=lambda n: None,
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.on_corrupt = on_corrupt
        self._write_file = None
        segments = self.segments()
        self._write_segment = segments[-1] + 1 if segments else 1  # never append to old ones
        self._write_offset = 0

    # --- layout ---

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob(f"*{_SEGMENT_SUFFIX}") if p.stem.isdigit())

    def _path(self, segment: int) -> Path:
        return self.dir / f"{segment:012d}{_SEGMENT_SUFFIX}"

    def size(self) -> int:
        total = 0
        for segment in self.segments():
            # committed and deleted by the store thread meanwhile: nothing to count
            with contextlib.suppress(FileNotFoundError):
                total += self._path(segment).stat().st_size
        return total

    def checkpoint(self) -> tuple[int, int]:
        """(segment, offset) up to which everything is in the store."""
        try:
            seg, off = (self.dir / _CHECKPOINT).read_text().split()
            return int(seg), int(off)
        except (OSError, ValueError):
            return 0, 0

    # --- writing ---

    def append(self, payload: bytes) -> Frame:
        """Append one frame and fsync it: when this returns, the batch survives a crash."""
        if self.size() + len(payload) + _HEADER.size > self.max_bytes:
            raise SpoolFull(f"spool at {self.dir} is full ({self.max_bytes} bytes)")
        if self._write_file is None or self._write_offset >= self.segment_bytes:
            self._roll()
        assert self._write_file is not None
        frame = Frame(self._write_segment, self._write_offset, payload)
        self._write_file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._write_file.flush()
        os.fsync(self._write_file.fileno())
        self._write_offset = frame.end
        return frame

    def _roll(self) -> None:
        if self._write_file is not None:
            self._write_file.close()
            self._write_segment += 1
        self._write_offset = 0
        self._write_file = open(self._path(self._write_segment), "ab")  # noqa: SIM115
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name is durable too
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        if self._write_file is not None:
            self._write_file.close()
            self._write_file = None

    # --- reading back ---

    def pending(self) -> Iterator[Frame]:
        """Frames not yet in the store, in the order they were written."""
        done_seg, done_off = self.checkpoint()
        for segment in self.segments():
            if segment < done_seg:
                continue
            start = done_off if segment == done_seg else 0
            try:
                with open(self._path(segment), "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, crc = _HEADER.unpack_from(data, offset)
                body_at = offset + _HEADER.size
                if body_at + length > len(data):
                    break  # torn write at the end: the crash happened here
                payload = data[body_at : body_at + length]
                if zlib.crc32(payload) != crc:
                    log.error(
                        "spool %s: corrupt frame at offset %d skipped", segment, start + offset
                    )
                    self.on_corrupt(1)
                else:
                    yield Frame(segment, start + offset, payload)
                offset = body_at + length

    def commit(self, frame: Frame) -> None:
        """Everything up to and including ``frame`` is in the store: move the checkpoint and
        delete the segments that are wholly behind it."""
        tmp = self.dir / (_CHECKPOINT + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{frame.segment} {frame.end}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / _CHECKPOINT)
        for segment in self.segments():
            if segment < frame.segment:
                self._path(segment).unlink(missing_ok=True)
