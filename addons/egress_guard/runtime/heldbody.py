"""Held bodies: a request body kept back from the upstream until its verdict.

Why: a body the gateway may refuse must not reach the upstream before a verdict covers it, and
most of the verdicts (archives, Office documents, PDFs, compressed or base64-laden text) need
the whole body. So the body is kept here — in memory up to ``HoldSpec.memory_bytes``, then in a
private temporary file (mode 0600 in a 0700 directory, deleted when the flow ends) — and only
forwarded once judged. A worker process scans a spilled body from its file, so a large upload
is never copied through the event loop's memory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 256 * 1024  # what a held body is forwarded in


@dataclass(frozen=True)
class HoldSpec:
    spill_dir: Path
    memory_bytes: int = 1 << 20  # a body beyond this goes to a file
    max_bytes: int = 32 << 20  # held at most; beyond, the gates decide (see bodygate)

    def prepare(self) -> None:
        """Create the spill directory (private) and remove what a crash left in it."""
        self.spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.spill_dir, 0o700)
        for leftover in self.spill_dir.glob("held-*"):
            with contextlib.suppress(OSError):
                leftover.unlink()


class HeldBody:
    """The bytes of one body, in order; in memory, or in a file once large."""

    def __init__(self, spec: HoldSpec):
        self.spec = spec
        self.size = 0
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self.path: Path | None = None

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self._memory is not None:
            self._memory += data
            if len(self._memory) <= self.spec.memory_bytes:
                return
            self._spill()
            return
        assert self._file is not None
        self._file.write(data)

    def _spill(self) -> None:
        assert self._memory is not None
        fd, name = tempfile.mkstemp(prefix="held-", dir=self.spec.spill_dir)  # mode 0600
        self.path = Path(name)
        self._file = os.fdopen(fd, "w+b")
        self._file.write(self._memory)
        self._memory = None

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def content(self) -> bytes | Path:
        """The body for the scanner: its bytes, or the path of its file (flushed)."""
        if self._memory is not None:
            return bytes(self._memory)
        assert self._file is not None and self.path is not None
        self._file.flush()
        return self.path

    def chunks(self) -> Iterator[bytes]:
        """The body in order, in pieces of ``CHUNK`` bytes."""
        if self._memory is not None:
            view = memoryview(self._memory)
            for at in range(0, len(view), CHUNK):
                yield bytes(view[at : at + CHUNK])
            return
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        while piece := self._file.read(CHUNK):
            yield piece

    def release(self) -> None:
        """Forget the body; its file is deleted. Safe to call twice."""
        self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None
