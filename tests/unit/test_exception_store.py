"""The exception event log: the table in the real embedded store, the snapshot on disk, and the
book each node keeps (refresh from the store, local appends, restarts without the store)."""

import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest

from egress_guard.core.exceptions import (
    APPROVER_ROLE,
    BLOCK,
    DAY,
    HOUR,
    Actor,
    ApprovalRules,
    ControlRule,
    Subject,
    Target,
    Terms,
    approve,
    grant,
    new_event_id,
    new_exception_id,
    request,
    revoke,
    state_of,
)
from egress_guard.requestlog.exception_snapshot import (
    ExceptionBook,
    ExceptionSnapshot,
    Snapshot,
    SnapshotError,
)
from egress_guard.requestlog.store import Store, StoreError, default_dsn

T0 = 1_800_000_000_000
RULES = ApprovalRules(controls={"block": ControlRule(True, 30 * DAY)})
ALICE = Actor("alice", client_ip="10.1.2.3")
LI = Actor("li.na", frozenset({APPROVER_ROLE}), "10.9.0.5")
WANG = Actor("wang.fang", frozenset({APPROVER_ROLE}), "10.9.0.6")


def dt(ms):
    return datetime.fromtimestamp(ms / 1000, UTC)


@pytest.fixture
def store(tmp_path):
    s = Store(default_dsn(tmp_path))
    s.migrate()
    yield s
    s.close()


def granted(user="alice", host="mail.qq.com", now=T0, days=1, actor=LI):
    t = Terms(Subject.user(user), BLOCK, Target.for_host(host), now, now + days * DAY)
    return grant(
        RULES,
        exception_id=new_exception_id(),
        event_id=new_event_id(),
        actor=actor,
        now_ms=now,
        terms=t,
        reason="project X",
        category="webmail",
    )


def requested(now=T0, reason="customer sent files", days=1):
    t = Terms(Subject.user("alice"), BLOCK, Target.for_host("mail.qq.com"), now, now + days * DAY)
    return request(
        RULES,
        exception_id=new_exception_id(),
        event_id=new_event_id(),
        actor=ALICE,
        now_ms=now,
        terms=t,
        reason=reason,
        category="webmail",
        request_id="r-1",
    )


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


class Switchable:
    """The real store behind a switch: ``down`` makes every call fail as an unreachable
    server does."""

    def __init__(self, store):
        self.store = store
        self.down = False
        self.calls = 0

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.down:
                raise StoreError("store unreachable")
            return method(*args, **kwargs)

        return call


class NoStore:
    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise StoreError("store unreachable")

        return call


def book(tmp_path, store, clock, name="node-a", **kw):
    return ExceptionBook(
        ExceptionSnapshot(tmp_path / name / "exceptions.json"), store, node=name, clock=clock, **kw
    )


# --- the table -------------------------------------------------------------------------------


def test_exception_events_table_is_monthly_mergetree_kept_as_long_as_the_request_log(store):
    ((engine, partition_key, sorting_key),) = store.query(
        "SELECT engine, partition_key, sorting_key FROM system.tables "
        "WHERE database = currentDatabase() AND name = 'exception_events'"
    )
    assert engine == "MergeTree" and partition_key == "toYYYYMM(ts)"
    assert sorting_key.startswith("exception_id")
    assert store.retention_months("exception_events") == store.retention_months("requests") == 6
    assert store.ensure_retention(12) is True
    assert store.retention_months("exception_events") == 12
    assert store.ensure_retention(12) is False
    columns = [
        r[0]
        for r in store.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() "
            "AND table = 'exception_events' ORDER BY position"
        )
    ]
    for name in (
        "ts",
        "event_id",
        "exception_id",
        "kind",
        "actor",
        "actor_roles",
        "client_ip",
        "reason",
        "terms",
        "inserted_at",
        "node",
    ):
        assert name in columns


def test_events_round_trip_through_the_store(store):
    req = requested(reason="需要发送合同'); DROP TABLE exception_events; --")
    store.insert_exception_event(req, node="node-a")
    state = state_of([req], T0 + 1)[req.exception_id]
    ap = approve(RULES, state, event_id=new_event_id(), actor=LI, now_ms=T0 + HOUR)
    store.insert_exception_event(ap, node="node-b")
    other = granted(user="bob", now=T0 + 2 * HOUR)
    store.insert_exception_event(other)

    assert store.exception_events() == [req, ap, other]  # in time order
    assert store.exception_events(exception_id=req.exception_id) == [req, ap]
    assert store.exception_events(since=dt(T0 + HOUR)) == [ap, other]
    assert store.exception_events(subject="user:bob") == [other]
    assert store.query("SELECT count() FROM exception_events") == [(3,)]
    assert store.query(
        "SELECT node FROM exception_events WHERE event_id = {e:String}", {"e": ap.id}
    ) == [("node-b",)]


def test_an_event_inserted_twice_is_one_event(store):
    ev = granted()
    store.insert_exception_event(ev, node="node-a")
    # A retry after a lost answer, even from a node restarted under another name: the event
    # id is the deduplication token, whatever else the row holds.
    store.insert_exception_event(ev, node="node-a2")
    assert store.query("SELECT count() FROM exception_events") == [(1,)]
    assert store.exception_events() == [ev]
    # Past the server's deduplication window, reads still give one event per id.
    from egress_guard.requestlog.store import EXCEPTION_EVENT_NAMES, exception_event_row

    with store._lock:
        store._connected().insert(
            "exception_events",
            [exception_event_row(ev, "node-b")],
            column_names=EXCEPTION_EVENT_NAMES,
            settings={"insert_deduplicate": 0},
        )
    assert store.query("SELECT count() FROM exception_events") == [(2,)]
    assert store.exception_events() == [ev]
    assert store.exception_events_inserted(None)[0] == [ev]


def test_reads_by_insert_time_and_live_exceptions(store):
    old = granted(now=T0 - 10 * DAY, days=1)  # over nine days ago
    pending = requested(now=T0 - 2 * DAY, days=5)  # its window is still open
    live = granted(now=T0, days=1)
    ended = granted(user="dave", now=T0 - 2 * HOUR, days=1)  # revoked an hour ago
    state = state_of([ended], T0 - HOUR)[ended.exception_id]
    revoked = revoke(
        RULES, state, event_id=new_event_id(), actor=WANG, now_ms=T0 - HOUR, reason="done"
    )
    for ev in (old, pending, live, ended, revoked):
        store.insert_exception_event(ev)
    events, newest = store.exception_events_inserted(None, live_after=dt(T0 - DAY))
    assert {e.id for e in events} == {pending.id, live.id, ended.id, revoked.id}
    assert newest is not None and newest.utcoffset() == timedelta(0)
    assert store.exception_events_inserted(newest, live_after=None) == ([], newest)
    later = granted(user="carol", now=T0 + 1)
    store.insert_exception_event(later)
    events, newest2 = store.exception_events_inserted(newest, live_after=None)
    assert events == [later] and newest2 >= newest


# --- the snapshot ----------------------------------------------------------------------------


def test_snapshot_round_trip_is_private_and_atomic(tmp_path, monkeypatch):
    snap = ExceptionSnapshot(tmp_path / "state" / "exceptions.json")
    assert snap.read() is None
    first = Snapshot((granted(), requested()), frozenset(), dt(T0), T0)
    snap.write(first)
    assert snap.read() == first
    assert stat.S_IMODE(os.stat(snap.path).st_mode) == 0o600
    second = Snapshot((granted(user="bob"),), frozenset({"x"}), None, T0 + 1)

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        snap.write(second)
    monkeypatch.undo()
    assert snap.read() == first  # the old snapshot, whole
    assert [p.name for p in snap.path.parent.iterdir()] == ["exceptions.json"]  # no leftovers
    snap.write(second)
    assert snap.read() == second


def test_a_damaged_snapshot_is_refused_not_half_read(tmp_path):
    snap = ExceptionSnapshot(tmp_path / "exceptions.json")
    snap.write(Snapshot((granted(),), frozenset(), None, T0))
    data = json.loads(snap.path.read_text())
    data["events"][0]["actor"] = "mallory"  # edited by hand: the checksum no longer matches
    snap.path.write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="checksum"):
        snap.read()
    snap.path.write_text('{"version": 1, "events": [')
    with pytest.raises(SnapshotError):
        snap.read()


# --- the book --------------------------------------------------------------------------------


def test_a_local_event_counts_at_once_even_with_the_store_down(tmp_path, store):
    clock = Clock()
    shared = Switchable(store)
    shared.down = True
    errors = []
    b = book(tmp_path, shared, clock, on_error=errors.append)
    b.start()
    ev = granted()
    state = b.append(ev)
    assert state.state == "active" and b.unsent == 1 and errors
    found = b.active.find("alice", (), "", BLOCK, "mail.qq.com", "/", "", "", clock())
    assert found is not None and found.id == ev.exception_id
    assert b.refresh().error is not None  # still down: kept, not lost
    shared.down = False
    result = b.refresh()
    assert result.error is None and result.pushed == 1 and b.unsent == 0
    assert store.exception_events() == [ev]


def test_nodes_sharing_a_store_see_each_others_events_on_refresh(tmp_path, store):
    clock = Clock()
    a, b = book(tmp_path, store, clock, "node-a"), book(tmp_path, store, clock, "node-b")
    a.start()
    b.start()
    req = requested()
    a.append(req)
    assert b.state(req.exception_id) is None
    assert b.refresh().pulled == 1
    assert b.state(req.exception_id).state == "pending"
    ap = approve(
        RULES, b.state(req.exception_id), event_id=new_event_id(), actor=LI, now_ms=clock()
    )
    b.append(ap)
    assert b.active.find("alice", (), "", BLOCK, "mail.qq.com", "/", "", "", clock())
    assert not a.active.find("alice", (), "", BLOCK, "mail.qq.com", "/", "", "", clock())
    result = a.refresh()
    assert result.pulled == 1 and result.changed
    assert a.active.find("alice", (), "", BLOCK, "mail.qq.com", "/", "", "", clock())
    again = a.refresh()  # the same events again (the overlap): nothing changes
    assert again.pulled == 0 and not again.changed
    rv = revoke(
        RULES,
        a.state(req.exception_id),
        event_id=new_event_id(),
        actor=WANG,
        now_ms=clock.now + 1,
        reason="done",
    )
    clock.now += 1
    a.append(rv)
    b.refresh()
    assert b.state(req.exception_id).state == "revoked"
    assert not b.active.find("alice", (), "", BLOCK, "mail.qq.com", "/", "", "", clock())


def test_a_restart_without_the_store_still_honours_and_still_expires(tmp_path, store):
    clock = Clock()
    first = book(tmp_path, store, clock)
    first.start()
    ev = granted(days=1)
    first.append(ev)
    unsent = granted(user="bob", days=2)
    store_down = Switchable(store)
    first.store = store_down
    store_down.down = True
    first.append(unsent)  # recorded while the store was away: only the snapshot has it

    clock.now = T0 + HOUR
    restarted = book(tmp_path, NoStore(), clock)
    restarted.start()
    assert restarted.refresh().error is not None
    assert restarted.unsent == 1
    for user in ("alice", "bob"):
        assert restarted.active.find(user, (), "", BLOCK, "mail.qq.com", "/", "", "", clock())
    end = T0 + DAY
    assert restarted.active.find("alice", (), "", BLOCK, "mail.qq.com", "/", "", "", end - 1)
    assert not restarted.active.find("alice", (), "", BLOCK, "mail.qq.com", "/", "", "", end)
    clock.now = end
    restarted.refresh()
    assert restarted.state(ev.exception_id).state == "expired"
    assert restarted.active.count_in_force(clock()) == 1  # bob's two days

    # When the store is back, the event only the snapshot held reaches it.
    restarted.store = store
    assert restarted.refresh().pushed == 1
    assert {e.id for e in store.exception_events()} == {ev.id, unsent.id}


def test_ended_exceptions_leave_the_book_after_a_while(tmp_path, store):
    clock = Clock()
    b = book(tmp_path, store, clock, keep_ms=DAY)
    b.start()
    short = granted(days=1)
    b.append(short)
    long = granted(user="bob", days=5)
    b.append(long)
    clock.now = T0 + 2 * DAY - 1  # alice's ended a day ago, less a millisecond: kept
    b.refresh()
    assert b.state(short.exception_id).state == "expired"
    clock.now = T0 + 2 * DAY
    b.refresh()
    assert b.state(short.exception_id) is None  # the store keeps its history
    assert b.state(long.exception_id).state == "active"
    again = book(tmp_path, NoStore(), clock)
    again.start()
    assert [e.id for e in ExceptionSnapshot(b.snapshot.path).read().events] == [long.id]
    assert again.state(long.exception_id).state == "active"


def test_a_damaged_snapshot_is_set_aside_and_the_store_fills_in(tmp_path, store):
    clock = Clock()
    first = book(tmp_path, store, clock)
    first.start()
    ev = granted()
    first.append(ev)
    first.snapshot.path.write_text("{ not json")
    errors = []
    restarted = book(tmp_path, store, clock, on_error=errors.append)
    restarted.start()
    assert errors and isinstance(errors[0], SnapshotError)
    assert list(first.snapshot.path.parent.glob("exceptions.json.damaged-*"))
    assert restarted.state(ev.exception_id) is None
    restarted.refresh()
    assert restarted.state(ev.exception_id).state == "active"
