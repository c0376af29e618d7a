"""Exception snapshot: this node's durable view of the exception events, and the refresh that
keeps it in step with the store.

A node restarted while the store is unreachable must still honour the exceptions it knew of,
and still expire them on time. ``ExceptionSnapshot`` keeps the events of every live (or lately
ended) exception in one JSON file (mode 0600), replaced atomically: written to a temporary
file, fsync'd, renamed over the old one, the directory fsync'd. A crash leaves the old snapshot
or the new one, never a mix, and a checksum refuses a file damaged or edited by hand.

``ExceptionBook`` is what the runtime holds: the events, and the ``ActiveExceptions`` the
decision path asks (an immutable object, swapped whole). ``append`` makes an event count on
this node at once: it goes to disk first, then to the store, and stays marked unsent until the
store has it. ``refresh``, which the runtime polls every few seconds, sends what is unsent and
merges what other nodes recorded. It merges by event id, so repeats change nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from egress_guard.core.exceptions import (
    DAY,
    MINUTE,
    ActiveExceptions,
    Event,
    ExceptionState,
    event_from_json,
    event_to_json,
    state_of,
)

SNAPSHOT_VERSION = 1


class SnapshotError(Exception):
    """A snapshot that cannot be trusted (unreadable, damaged, or of an unknown version)."""


@dataclass(frozen=True)
class Snapshot:
    events: tuple[Event, ...] = ()
    unsent: frozenset[str] = frozenset()  # ids of the events the store has not acknowledged
    watermark: datetime | None = None  # the store's insert time up to which events were pulled
    written_ms: int = 0


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


class ExceptionSnapshot:
    """One file, replaced whole."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def read(self) -> Snapshot | None:
        """The snapshot, or None when there is none yet. SnapshotError when it is damaged."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SnapshotError(f"{self.path}: cannot read: {e}") from None
        try:
            data = json.loads(raw)
            digest = data.pop("sha256")
            if hashlib.sha256(_canonical(data)).hexdigest() != digest:
                raise SnapshotError(f"{self.path}: checksum mismatch (damaged or edited)")
            if data["version"] != SNAPSHOT_VERSION:
                raise SnapshotError(f"{self.path}: unknown snapshot version {data['version']!r}")
            watermark = data["watermark"]
            return Snapshot(
                tuple(event_from_json(e) for e in data["events"]),
                frozenset(data["unsent"]),
                datetime.fromisoformat(watermark) if watermark else None,
                int(data["written_ms"]),
            )
        except SnapshotError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SnapshotError(f"{self.path}: unreadable snapshot: {e}") from None

    def write(self, snap: Snapshot) -> None:
        """Replace the snapshot atomically; when this returns, it survives a crash."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = {
            "version": SNAPSHOT_VERSION,
            "written_ms": snap.written_ms,
            "watermark": snap.watermark.isoformat() if snap.watermark else None,
            "unsent": sorted(snap.unsent),
            "events": [event_to_json(e) for e in snap.events],
        }
        data = _canonical({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()})
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # a leftover temporary file keeps its mode
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename is durable too
        finally:
            os.close(dir_fd)

    def set_aside(self, now_ms: int) -> Path | None:
        """Move a damaged snapshot out of the way (kept for a look, not read again)."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{now_ms}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return None
        return aside


class EventStore(Protocol):
    """What the book needs of ``requestlog.store.Store``."""

    def insert_exception_event(self, event: Event, node: str = "") -> None: ...

    def exception_events_inserted(
        self, after: datetime | None, live_after: datetime | None = None
    ) -> tuple[list[Event], datetime | None]: ...


@dataclass(frozen=True)
class RefreshResult:
    pushed: int = 0  # unsent events the store took
    pulled: int = 0  # events new to this node
    changed: bool = False  # the events or the states changed (the active set was rebuilt)
    error: Exception | None = None  # the store could not be reached (the rest still happened)


def _utc_from_ms(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


class ExceptionBook:
    """This node's exceptions: events kept in memory and on disk, merged with the store.

    ``clock`` gives milliseconds since the epoch (injected: tests move it). ``keep_ms`` is how
    long an ended exception stays in the book (and the snapshot) before only the store keeps
    it; ``overlap_ms`` how far back each refresh looks again, for inserts the server made
    visible late (merging by id makes the repeat free).
    """

    def __init__(
        self,
        snapshot: ExceptionSnapshot,
        store: EventStore | None,
        *,
        clock: Callable[[], int],
        node: str = "",
        keep_ms: int = 7 * DAY,
        overlap_ms: int = MINUTE,
        on_error: Callable[[Exception], None] = lambda e: None,
    ):
        self.snapshot = snapshot
        self.store = store
        self.clock = clock
        self.node = node
        self.keep_ms = keep_ms
        self.overlap_ms = overlap_ms
        self.on_error = on_error
        self._lock = threading.RLock()
        self._events: dict[str, Event] = {}
        self._unsent: set[str] = set()
        self._watermark: datetime | None = None
        self._next_boundary: int | None = None
        self.active = ActiveExceptions()  # read by the decision path without the lock

    # --- reading ---

    @property
    def unsent(self) -> int:
        return len(self._unsent)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events.values())

    def states(self) -> dict[str, ExceptionState]:
        """Every exception in the book, as it stands now."""
        return state_of(self.events(), self.clock())

    def state(self, exception_id: str) -> ExceptionState | None:
        evs = [e for e in self.events() if e.exception_id == exception_id]
        return state_of(evs, self.clock()).get(exception_id)

    # --- changing ---

    def start(self) -> None:
        """Load the snapshot. A damaged one is reported and set aside: the store fills in
        at the next refresh (until then this node knows no exceptions, which blocks more,
        never less)."""
        now = self.clock()
        try:
            snap = self.snapshot.read()
        except SnapshotError as e:
            self.on_error(e)
            self.snapshot.set_aside(now)
            snap = None
        with self._lock:
            if snap is not None:
                self._events = {e.id: e for e in snap.events}
                self._unsent = set(snap.unsent) & set(self._events)
                self._watermark = snap.watermark
            self._rebuild(now)

    def append(self, event: Event) -> ExceptionState | None:
        """Record an event made on this node: in force here at once, on disk before this
        returns (an OSError means it was not recorded), then sent to the store (if that
        fails it stays unsent and ``refresh`` retries). Returns the exception's state."""
        with self._lock:
            if event.id not in self._events:
                self._events[event.id] = event
                self._unsent.add(event.id)
                now = self.clock()
                try:
                    self._rebuild(now)
                    self._write(now)
                except BaseException:
                    del self._events[event.id]
                    self._unsent.discard(event.id)
                    self._rebuild(now)
                    raise
        self._push([event])
        return self.state(event.exception_id)

    def refresh(self, full: bool = False) -> RefreshResult:
        """Send what is unsent, then merge what the store has that this node does not.
        ``full`` reads every live exception again instead of only what is new."""
        with self._lock:
            unsent = sorted((self._events[i] for i in self._unsent), key=lambda e: e.ts_ms)
        pushed, error = self._push(unsent)
        now = self.clock()
        pulled: list[Event] = []
        newest = None
        if self.store is not None:
            try:
                if full or self._watermark is None:
                    live_after = _utc_from_ms(now - self.keep_ms)
                    pulled, newest = self.store.exception_events_inserted(None, live_after)
                else:
                    after = self._watermark - timedelta(milliseconds=self.overlap_ms)
                    pulled, newest = self.store.exception_events_inserted(after, None)
            except Exception as e:
                error = error or e
                self.on_error(e)
        with self._lock:
            new = [e for e in pulled if e.id not in self._events]
            for e in new:
                self._events[e.id] = e
            moved = newest is not None and (self._watermark is None or newest > self._watermark)
            if moved:
                self._watermark = newest
            due = self._next_boundary is not None and now >= self._next_boundary
            if new or due:
                self._rebuild(now)
            if new or due or moved or pushed:
                try:
                    self._write(now)
                except OSError as e:  # kept in memory; written at the next change
                    error = error or e
                    self.on_error(e)
        return RefreshResult(pushed, len(new), bool(new) or due, error)

    # --- inside ---

    def _push(self, events: list[Event]) -> tuple[int, Exception | None]:
        if self.store is None or not events:
            return 0, None
        sent: list[str] = []
        error: Exception | None = None
        for e in events:
            try:
                self.store.insert_exception_event(e, self.node)
            except Exception as exc:  # the store is away: stop, keep the rest for later
                error = exc
                self.on_error(exc)
                break
            sent.append(e.id)
        if sent:
            with self._lock:
                before = len(self._unsent)
                self._unsent.difference_update(sent)
                if len(self._unsent) != before:
                    try:
                        self._write(self.clock())
                    except OSError as exc:
                        self.on_error(exc)
        return len(sent), error

    def _rebuild(self, now: int) -> None:
        """Derive the states, drop what ended long enough ago, swap in the new active set."""
        states = state_of(self._events.values(), now)
        horizon = now - self.keep_ms
        gone = {i for i, s in states.items() if not s.live and s.ended_ms <= horizon}
        self._events = {
            i: e
            for i, e in self._events.items()
            if i in self._unsent
            or (e.exception_id in states and e.exception_id not in gone)
            or (e.exception_id not in states and e.ts_ms > horizon)  # its creation may follow
        }
        live = [s for i, s in states.items() if i not in gone]
        self.active = ActiveExceptions.from_states(live)
        boundaries = []
        for s in live:
            if s.state == "pending":
                boundaries.append(min(s.decide_by_ms, s.terms.expiry_ms))
            elif s.state == "scheduled":
                boundaries.append(s.terms.start_ms)
            elif s.state == "active":
                boundaries.append(s.terms.expiry_ms)
            else:
                boundaries.append(s.ended_ms + self.keep_ms)
        self._next_boundary = min(boundaries, default=None)

    def _write(self, now: int) -> None:
        self.snapshot.write(
            Snapshot(
                tuple(sorted(self._events.values(), key=lambda e: (e.ts_ms, e.id))),
                frozenset(self._unsent),
                self._watermark,
                now,
            )
        )
