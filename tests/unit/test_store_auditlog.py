"""The store (real embedded ClickHouse) and the audit writer that feeds it."""

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from egress_guard.requestlog.auditlog import AuditLog, RequestRow, pack_rows, unpack_rows
from egress_guard.requestlog.spool import Spool, SpoolFull
from egress_guard.requestlog.store import RequestFilter, Store, StoreError, default_dsn

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path):
    s = Store(default_dsn(tmp_path))
    s.migrate()
    yield s
    s.close()


def row(i, **kw):
    base = dict(
        ts=T0 + timedelta(minutes=i),
        request_id=f"r{i}",
        user="alice",
        host="mail.qq.com",
        decision="block",
        rule_id="webmail.qq",
    )
    base.update(kw)
    return RequestRow(**base)


def test_migrations_are_versioned_and_idempotent(store):
    assert store.migrate() == []
    versions = store.query("SELECT version FROM schema_migrations ORDER BY version")
    assert versions == [(v,) for v in range(1, 9)]
    columns = [
        r[0]
        for r in store.query(
            "SELECT name FROM system.columns WHERE "
            "database = currentDatabase() AND table = 'requests'"
        )
    ]
    assert columns[-4:] == ["declared_bytes", "window_bytes", "forwarded_bytes", "connection_id"]


def test_requests_table_is_monthly_mergetree_with_at_least_six_months_ttl(store):
    ((engine, partition_key),) = store.query(
        "SELECT engine, partition_key FROM system.tables "
        "WHERE database = currentDatabase() AND name = 'requests'"
    )
    assert engine == "MergeTree"
    assert partition_key == "toYYYYMM(ts)"
    assert store.retention_months() == 6
    assert store.ensure_retention(12) is True
    assert store.retention_months() == 12
    assert store.ensure_retention(12) is False
    with pytest.raises(StoreError, match="at least 6 months"):
        store.ensure_retention(5)
    assert store.retention_months() == 12


def count(store):
    return store.query("SELECT count() FROM requests")[0][0]


def test_rows_written_in_batches_and_flushed_on_close(store, tmp_path):
    batches = []

    def insert(rows, token):
        batches.append(len(rows))
        store.insert_requests(rows, token)

    log = AuditLog(insert, Spool(tmp_path / "spool"), batch_rows=40, flush_interval=60)
    log.start()
    for i in range(100):
        log.submit(row(i, user="bob" if i % 2 else "alice"))
    log.close()
    assert sum(batches) == 100 and max(batches) <= 40
    assert count(store) == 100
    assert log.written == 100 and log.dropped == 0
    assert list(Spool(tmp_path / "spool").pending()) == []  # nothing left behind


def test_rows_wait_in_the_spool_while_the_store_is_down(store, tmp_path):
    down = [True]
    errors = []

    def insert(rows, token):
        if down[0]:
            raise RuntimeError("store down")
        store.insert_requests(rows, token)

    log = AuditLog(insert, Spool(tmp_path / "spool"), flush_interval=0.01, on_error=errors.append)
    log.start()
    for i in range(30):
        log.submit(row(i))
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert errors and count(store) == 0
    assert sum(1 for _ in log.spool.pending()) >= 1  # on disk, not only in memory
    down[0] = False
    log.close()
    assert count(store) == 30


def test_a_restart_replays_the_spool_and_never_duplicates(store, tmp_path):
    spool = Spool(tmp_path / "spool")
    first = spool.append(pack_rows([row(i) for i in range(5)]))
    spool.append(pack_rows([row(i) for i in range(5, 8)]))
    # The previous process inserted the first batch, then died before its checkpoint.
    store.insert_requests(unpack_rows(first.payload), first.token)
    spool.close()
    log = AuditLog(store.insert_requests, Spool(tmp_path / "spool"))
    log.start()
    log.close()
    assert count(store) == 8
    assert store.query("SELECT uniqExact(request_id) FROM requests") == [(8,)]


def test_corrupt_frames_are_skipped_and_counted(tmp_path):
    corrupt = []
    spool = Spool(tmp_path / "spool", on_corrupt=corrupt.append)
    frames = [spool.append(f"batch {i}".encode()) for i in range(3)]
    spool.close()
    (segment,) = spool.segments()
    path = spool._path(segment)
    data = bytearray(path.read_bytes())
    data[frames[1].offset + 9] ^= 0xFF  # flip a payload byte of the middle frame
    path.write_bytes(bytes(data) + b"\x00\x00\x01")  # and a torn write at the end
    assert [f.payload for f in Spool(tmp_path / "spool", on_corrupt=corrupt.append).pending()] == [
        b"batch 0",
        b"batch 2",
    ]
    assert corrupt == [1]


def test_checkpoint_and_segments(tmp_path):
    spool = Spool(tmp_path / "spool", segment_bytes=64)
    frames = [spool.append(bytes([i]) * 60) for i in range(5)]
    assert len(spool.segments()) == 5  # one frame fills a 64-byte segment
    spool.commit(frames[2])
    assert [f.payload[0] for f in spool.pending()] == [3, 4]
    assert spool.segments()[0] == frames[2].segment  # older segments deleted
    with pytest.raises(SpoolFull):
        Spool(tmp_path / "small", max_bytes=100).append(b"x" * 200)


def test_sync_mode_resolves_once_the_row_is_on_disk(store, tmp_path):
    log = AuditLog(store.insert_requests, Spool(tmp_path / "spool"), sync=True)
    log.start()
    done = log.submit(row(1))
    done.result(timeout=10)
    assert any(True for _ in Spool(tmp_path / "spool").pending()) or count(store) == 1
    log.close()
    assert count(store) == 1


def test_a_hung_store_never_holds_up_the_spool(store, tmp_path):
    release = threading.Event()
    entered = threading.Event()

    def hung_insert(rows, token):
        entered.set()
        release.wait(30)  # a server that accepted the call and answers nothing
        store.insert_requests(rows, token)

    log = AuditLog(hung_insert, Spool(tmp_path / "spool"), sync=True)
    log.start()
    first = log.submit(row(0))
    first.result(timeout=10)
    assert entered.wait(10)  # the store thread is now stuck in the insert
    later = [log.submit(row(i)) for i in range(1, 50)]
    for done in later:
        done.result(timeout=10)  # on disk although the store answers nothing
    assert count(store) == 0
    release.set()
    log.close()
    assert count(store) == 50


def test_a_store_unreachable_at_start_gets_its_schema_at_the_first_insert(tmp_path):
    dsn = default_dsn(tmp_path)
    lazy = Store(dsn)
    lazy._retention = 6  # as open_schema leaves it after failing to reach a server
    lazy.insert_requests([row(1).values()], "t-1")
    assert lazy.schema_ready and lazy.retention_months() == 6
    assert lazy.query("SELECT count() FROM requests") == [(1,)]
    lazy.close()


def test_full_queue_counts_dropped_rows_instead_of_blocking(tmp_path):
    dropped = []
    log = AuditLog(
        lambda rows, token: None, Spool(tmp_path / "s"), max_queue=3, on_dropped=dropped.append
    )  # not started
    for i in range(5):
        log.submit(row(i))
    assert log.dropped == 2 and sum(dropped) == 2
    assert not log.accepting


def test_query_filters(store):
    store.insert_requests(
        [
            row(0).values(),
            row(1, user="bob", host="pan.baidu.com", decision="block").values(),
            row(2, user="bob", host="www.example.org", decision="allow", rule_id="").values(),
            row(3, user="alice", host="qq.com", decision="allow").values(),
        ]
    )

    def ids(**kw):
        return [r["request_id"] for r in store.query_requests(RequestFilter(**kw))]

    assert ids() == ["r3", "r2", "r1", "r0"]
    assert ids(user="bob") == ["r2", "r1"]
    assert ids(host="qq.com") == ["r3", "r0"]  # the domain and its subdomains
    assert ids(host="q.com") == []
    assert ids(decision="block") == ["r1", "r0"]
    assert ids(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == ["r2", "r1"]
    assert ids(limit=1) == ["r3"]
    assert ids(user="alice' OR '1'='1") == []  # a value, never SQL


def test_window_usage_separates_this_node_from_the_others(store):
    store.insert_requests(
        [
            row(0, node="a", user="alice", window_bytes=100).values(),
            row(1, node="a", user="", client_ip="10.0.0.9", window_bytes=7).values(),
            row(2, node="b", user="alice", window_bytes=40).values(),
            row(3, node="b", user="alice", window_bytes=0).values(),
            row(-120, node="a", user="alice", window_bytes=999).values(),  # before the window
        ]
    )
    since = T0 - timedelta(minutes=1)
    own = store.window_usage(since, "a", own=True)
    assert [(k, n) for k, _s, n in own] == [("alice", 100), ("ip:10.0.0.9", 7)]
    assert own[0][1] == int((T0).timestamp())
    assert [(k, n) for k, _s, n in store.window_usage(since, "a", own=False)] == [("alice", 40)]


def test_rows_spooled_before_a_column_was_added_replay_with_its_default():
    """A gateway upgraded with rows still in its spool: their frames are shorter than today's
    rows, and replay them with the new columns' defaults."""
    import msgpack

    from egress_guard.requestlog.auditlog import unpack_rows

    row = RequestRow(ts=datetime(2026, 11, 1, tzinfo=UTC), request_id="old", user="alice")
    full = [row.ts.timestamp(), *row.values()[1:]]
    old = full[: full.__len__() - 2]  # before forwarded_bytes and connection_id existed
    (unpacked,) = unpack_rows(msgpack.packb([old], use_bin_type=True))
    assert len(unpacked) == len(row.values())
    assert unpacked[-2:] == (0, "") and unpacked[2] == "old"
