"""The store (real embedded ClickHouse) and the audit writer that feeds it."""

from datetime import UTC, datetime, timedelta

import pytest

from egress_guard.auditlog import AuditLog, RequestRow
from egress_guard.store import RequestFilter, Store, StoreError, default_dsn

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
    assert store.query("SELECT version FROM schema_migrations ORDER BY version") == [(1,), (2,)]
    columns = [
        r[0]
        for r in store.query(
            "SELECT name FROM system.columns WHERE "
            "database = currentDatabase() AND table = 'requests'"
        )
    ]
    assert columns[-2:] == ["declared_bytes", "window_bytes"]


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


def test_rows_written_in_batches_and_flushed_on_close(store):
    batches = []

    def insert(rows):
        batches.append(len(rows))
        store.insert_requests(rows)

    log = AuditLog(insert, batch_rows=40, flush_interval=60)
    log.start()
    for i in range(100):
        log.submit(row(i, user="bob" if i % 2 else "alice"))
    log.close()
    assert sum(batches) == 100 and max(batches) <= 40
    assert store.query("SELECT count() FROM requests") == [(100,)]
    assert log.written == 100 and log.dropped == 0


def test_failed_inserts_are_retried_not_lost(store):
    failures = [RuntimeError("store down"), RuntimeError("still down")]

    def flaky(rows):
        if failures:
            raise failures.pop(0)
        store.insert_requests(rows)

    errors = []
    log = AuditLog(flaky, flush_interval=0.05, on_error=errors.append)
    log.start()
    for i in range(10):
        log.submit(row(i))
    log.close()
    assert len(errors) == 2
    assert store.query("SELECT count() FROM requests") == [(10,)]


def test_full_queue_counts_dropped_rows_instead_of_blocking():
    dropped = []
    log = AuditLog(lambda rows: None, max_queue=3, on_dropped=dropped.append)  # not started
    for i in range(5):
        log.submit(row(i))
    assert log.dropped == 2 and sum(dropped) == 2


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
