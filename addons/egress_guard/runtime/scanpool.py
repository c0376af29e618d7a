"""Scan pool: where whole bodies are scanned. Small ones inline on the event loop (well under a
millisecond), larger ones in worker processes so the proxy's loop keeps serving everyone else
while a big document is decoded, and the GIL is not shared with it."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

from egress_guard import metrics
from egress_guard.core.scan import MarkerPolicy, ScanResult, scan_body, scan_in_worker


def _spawn_pool() -> Executor:
    # spawn, not fork: the workers need the scanner, not the store engine or the event loop.
    return ProcessPoolExecutor(
        max(1, (os.cpu_count() or 2) - 1),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=os.nice,  # the proxy's own loop comes first
        initargs=(10,),
    )


class ScanPool:
    INLINE_BYTES = 128 * 1024  # bodies up to this are scanned on the event loop

    def __init__(self, make_executor: type[Executor] | None = None):
        self._make = make_executor or _spawn_pool
        self._executor: Executor | None = None

    def _pool(self) -> Executor:
        if self._executor is None:
            self._executor = self._make()
        return self._executor

    async def scan(
        self,
        policy: MarkerPolicy,
        body: bytes | Path,
        content_type: str,
        content_encoding: str,
    ) -> ScanResult:
        """Decode and scan a whole body: bytes, or a held body's file (read by the worker)."""
        start = time.perf_counter()
        markers = policy.markers
        if isinstance(body, bytes) and len(body) <= self.INLINE_BYTES:
            result = scan_body(markers, body, content_type, content_encoding, policy.limits)
            metrics.SCAN_SECONDS.labels("inline").observe(time.perf_counter() - start)
            return result
        result = await asyncio.get_running_loop().run_in_executor(
            self._pool(),
            scan_in_worker,
            markers.digest,
            markers.markers,
            markers.suppress,
            str(body) if isinstance(body, Path) else body,
            content_type,
            content_encoding,
            policy.limits,
        )
        metrics.SCAN_SECONDS.labels("worker").observe(time.perf_counter() - start)
        return result

    def warm(self) -> None:
        """Start the worker processes now rather than on the first large upload."""
        self._pool().submit(len, b"")

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
