"""Audit log: one row per request / CONNECT / tunnel, queued off the hot path and written to the
store in batches by a background thread.

The proxy only ever calls ``AuditLog.submit`` (a non-blocking put). The writer drains the queue
into batches (up to ``batch_rows`` or every ``flush_interval`` seconds) and inserts them; a
failed insert is retried with backoff while new rows keep queueing. ``close`` flushes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from .store import COLUMN_NAMES

log = logging.getLogger(__name__)


@dataclass
class RequestRow:
    """One row of the ``requests`` table. Never holds the text a marker matched."""

    ts: datetime
    node: str = ""
    request_id: str = ""
    client_ip: str = ""
    user: str = ""
    groups: list[str] = field(default_factory=list)
    method: str = ""
    scheme: str = ""
    host: str = ""
    port: int = 0
    path: str = ""
    query: str = ""
    http_version: str = ""
    kind: str = "http"  # http | connect | tunnel | websocket
    status: int = 0
    decision: str = "allow"  # allow | block | alert
    reason_kind: str = ""  # blocklist | upload_cap | marker | error | exception
    rule_id: str = ""
    category: str = ""
    marker_ids: list[str] = field(default_factory=list)
    marker_levels: list[str] = field(default_factory=list)
    exception_id: str = ""
    request_bytes: int = 0
    upload_bytes: int = 0
    response_bytes: int = 0
    content_type: str = ""
    user_agent: str = ""
    duration_ms: int = 0
    tls_intercepted: bool = False
    error: str = ""
    declared_bytes: int = 0
    window_bytes: int = 0

    def values(self) -> tuple[Any, ...]:
        return astuple(self)


assert tuple(f.name for f in fields(RequestRow)) == COLUMN_NAMES, "row and table disagree"

MAX_TEXT = {"path": 2048, "query": 2048, "user_agent": 512, "error": 1024, "content_type": 256}


def bounded(text: str, name: str) -> str:
    limit = MAX_TEXT.get(name, 1024)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def utc_from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class AuditLog:
    """Bounded queue + writer thread. ``insert`` is the store's ``insert_requests``."""

    def __init__(
        self,
        insert: Callable[[Sequence[Sequence[Any]]], None],
        *,
        max_queue: int = 200_000,
        batch_rows: int = 10_000,
        flush_interval: float = 0.5,
        on_written: Callable[[int], None] = lambda n: None,
        on_dropped: Callable[[int], None] = lambda n: None,
        on_error: Callable[[Exception], None] = lambda e: None,
    ):
        self._insert = insert
        self._queue: queue.Queue[RequestRow | None] = queue.Queue(maxsize=max_queue)
        self._batch_rows = batch_rows
        self._flush_interval = flush_interval
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="egress-guard-auditlog", daemon=True)
        self._closing = threading.Event()
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, row: RequestRow) -> None:
        """Never blocks. A full queue means the store has been down for long: count the loss."""
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1
            self._on_dropped(1)

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything queued so far, then stop the writer."""
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take_batch(self) -> tuple[list[RequestRow], bool]:
        batch: list[RequestRow] = []
        deadline = time.monotonic() + self._flush_interval
        while len(batch) < self._batch_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return batch, False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return batch, False
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _write(self, batch: list[RequestRow]) -> None:
        backoff = 0.2
        while True:
            try:
                self._insert([row.values() for row in batch])
            except Exception as e:  # the store is down or refused the batch: keep it, retry
                self._on_error(e)
                log.error("audit log insert of %d rows failed: %s", len(batch), e)
                if self._closing.is_set() and backoff > 5:
                    log.error("giving up on %d audit rows at shutdown", len(batch))
                    self.dropped += len(batch)
                    self._on_dropped(len(batch))
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 10)
                continue
            self.written += len(batch)
            self._on_written(len(batch))
            return

    def _run(self) -> None:
        while True:
            batch, stop = self._take_batch()
            if batch:
                self._write(batch)
            if stop:
                return
