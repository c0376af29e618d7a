"""Audit log: one row per request / CONNECT / tunnel, queued off the hot path, made durable in
the on-disk spool by one thread and written to the store in batches by another.

Rows lost in a crash (kill -9): only those still in the in-memory queue, i.e. of the last
``flush_interval`` (0.5 s); with ``sync`` none of a request that was answered (its response
waits for its row to be on disk).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import msgpack

from .spool import Spool, SpoolFull
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
    forwarded_bytes: int = 0  # of the body, what reached the upstream
    connection_id: str = ""  # the client connection (a CONNECT and what went through it)

    def values(self) -> tuple[Any, ...]:
        return _ROW_VALUES(self)  # not dataclasses.astuple: it deep-copies, 10x slower


assert tuple(f.name for f in fields(RequestRow)) == COLUMN_NAMES, "row and table disagree"
_ROW_VALUES = operator.attrgetter(*COLUMN_NAMES)
_ROW_DEFAULTS = tuple(f.default if f.default is not MISSING else None for f in fields(RequestRow))

MAX_TEXT = {"path": 2048, "query": 2048, "user_agent": 512, "error": 1024, "content_type": 256}


def bounded(text: str, name: str) -> str:
    limit = MAX_TEXT.get(name, 1024)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def utc_from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def pack_rows(rows: Sequence[RequestRow]) -> bytes:
    return msgpack.packb([[r.ts.timestamp(), *r.values()[1:]] for r in rows], use_bin_type=True)


def unpack_rows(payload: bytes) -> list[tuple[Any, ...]]:
    """Spooled rows; a frame written before a column was added gets that column's default."""
    width = len(_ROW_DEFAULTS)
    return [
        (datetime.fromtimestamp(v[0], UTC), *v[1:], *_ROW_DEFAULTS[len(v) : width])
        for v in msgpack.unpackb(payload)
    ]


class AuditLog:
    """Bounded queue → durable spool → store, on two threads.

    The proxy calls ``submit`` (never blocks). The spool thread takes batches (up to
    ``batch_rows`` or every ``flush_interval``) and appends each to the spool with one fsync.
    The store thread inserts the spooled batches into the store in order, each with its
    deduplication token; a batch leaves the spool only once the store has it. Two threads, so
    that a store that hangs (a firewalled server answers nothing until a timeout) never holds
    up the spool. With ``sync=True`` ``submit`` returns a future that completes when the row is
    on disk, for callers that must not answer before their row is durable.
    """

    def __init__(
        self,
        insert: Callable[[Sequence[Sequence[Any]], str], None],
        spool: Spool,
        *,
        max_queue: int = 200_000,
        batch_rows: int = 10_000,
        flush_interval: float = 0.5,
        sync: bool = False,
        on_written: Callable[[int], None] = lambda n: None,
        on_dropped: Callable[[int], None] = lambda n: None,
        on_error: Callable[[Exception], None] = lambda e: None,
        after_insert: Callable[[], None] = lambda: None,
    ):
        self._insert = insert
        self.spool = spool
        self.sync = sync
        self._queue: queue.Queue[tuple[RequestRow, Future[None] | None] | None] = queue.Queue(
            maxsize=max_queue
        )
        self._batch_rows = batch_rows
        self._flush_interval = 0.002 if sync else flush_interval
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._on_error = on_error
        # Called when the store has a batch and its checkpoint is not yet written: where a
        # crash must not lose or duplicate rows (the durability test dies here).
        self._after_insert = after_insert
        self._spool_thread = threading.Thread(
            target=self._run_spool, name="egress-guard-audit-spool", daemon=True
        )
        self._store_thread = threading.Thread(
            target=self._run_store, name="egress-guard-audit-store", daemon=True
        )
        self._closing = threading.Event()
        self._spooled_all = threading.Event()  # the spool thread has taken its last batch
        self._wake_store = threading.Event()
        self._retry_at = 0.0
        self._backoff = 0.2
        self.written = 0
        self.dropped = 0
        self.spool_ok = True  # False while the spool cannot take rows (full, disk error)
        self.store_ok = True
        self._fresh: dict[str, list[tuple[Any, ...]]] = {}  # rows of frames just spooled

    @property
    def accepting(self) -> bool:
        """Whether a new row would be kept: the spool takes rows and the queue has room."""
        return self.spool_ok and self._queue.qsize() < self._queue.maxsize

    def start(self) -> None:
        self._spool_thread.start()
        self._store_thread.start()

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, row: RequestRow) -> Future[None] | None:
        """Never blocks. Returns, in sync mode, a future done when the row is on disk."""
        done: Future[None] | None = Future() if self.sync else None
        try:
            self._queue.put_nowait((row, done))
        except queue.Full:
            self._drop(1)
            if done is not None:
                done.set_exception(SpoolFull("audit queue full"))
        return done

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._on_dropped(n)

    def close(self, timeout: float = 30.0) -> None:
        """Spool everything queued so far, try to hand it to the store, stop the writer."""
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        if self._spool_thread.is_alive():
            self._spool_thread.join(timeout)
        # The store thread hands over what it can for up to 10 s; one stuck in a hung
        # server's call is left behind (a daemon): its rows are in the spool for next start.
        if self._store_thread.is_alive():
            self._store_thread.join(min(timeout, 12.0))
        self.spool.close()

    def _take_batch(self) -> tuple[list[tuple[RequestRow, Future[None] | None]], bool]:
        batch: list[tuple[RequestRow, Future[None] | None]] = []
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

    def _spool(self, batch: list[tuple[RequestRow, Future[None] | None]]) -> None:
        rows = [row for row, _ in batch]
        try:
            frame = self.spool.append(pack_rows(rows))
        except (SpoolFull, OSError) as e:
            if self.spool_ok:
                log.error("audit spool cannot take rows: %s", e)
            self.spool_ok = False
            self._drop(len(batch))
            for _, done in batch:
                if done is not None:
                    done.set_exception(e)
            return
        self.spool_ok = True
        if len(self._fresh) < 8:  # spare the store round trip a re-read of the disk
            self._fresh[frame.token] = [r.values() for r in rows]
        for _, done in batch:
            if done is not None:
                done.set_result(None)
        self._wake_store.set()

    def _drain(self, budget: float) -> None:
        """Insert spooled batches into the store, oldest first, for at most ``budget`` s."""
        if time.monotonic() < self._retry_at:
            return
        deadline = time.monotonic() + budget
        for frame in self.spool.pending():
            try:
                rows = self._fresh.pop(frame.token, None) or unpack_rows(frame.payload)
                self._insert(rows, frame.token)
            except Exception as e:  # the store is down or refused: keep the batch, retry
                self.store_ok = False
                self._on_error(e)
                log.error("audit log insert failed, batch kept in the spool: %s", e)
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 10.0)
                return
            self._after_insert()
            self.spool.commit(frame)
            self.store_ok = True
            self._backoff = 0.2
            self.written += len(rows)
            self._on_written(len(rows))
            if not self.spool_ok:
                self.spool_ok = True  # the spool has room again
            if time.monotonic() > deadline:
                return

    def _run_spool(self) -> None:
        while True:
            batch, stop = self._take_batch()
            if batch:
                self._spool(batch)
            if stop:
                self._spooled_all.set()
                self._wake_store.set()
                return

    def _run_store(self) -> None:
        self._drain(budget=60.0)  # what a previous run left in the spool goes first
        while not self._spooled_all.is_set():
            self._wake_store.wait(timeout=self._flush_interval)
            self._wake_store.clear()
            self._drain(budget=1.0)
        deadline = time.monotonic() + 10
        while any(True for _ in self.spool.pending()) and time.monotonic() < deadline:
            self._retry_at = 0.0
            self._drain(budget=5.0)
            if not self.store_ok:
                time.sleep(0.2)
