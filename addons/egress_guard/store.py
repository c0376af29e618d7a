"""Store: the ClickHouse client factory, the versioned schema migrations, and the queries.

One code path for the embedded engine (``chdb://DIR``, in-process) and a ClickHouse server
(``http(s)://user:pass@host:8123/db``). The embedded engine opens its directory in one process
only, so the gateway process owns the Store and everyone else goes through its admin API.
All SQL that carries values uses server-side parameters; nothing from a request is pasted in.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import clickhouse_connect

from . import faults
from .policy import RETENTION_MIN_MONTHS

REQUEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DateTime64(3, 'UTC')"),
    ("node", "LowCardinality(String)"),
    ("request_id", "String"),
    ("client_ip", "String"),
    ("user", "String"),
    ("groups", "Array(LowCardinality(String))"),
    ("method", "LowCardinality(String)"),
    ("scheme", "LowCardinality(String)"),
    ("host", "String"),
    ("port", "UInt16"),
    ("path", "String"),
    ("query", "String"),
    ("http_version", "LowCardinality(String)"),
    ("kind", "LowCardinality(String)"),
    ("status", "UInt16"),
    ("decision", "LowCardinality(String)"),
    ("reason_kind", "LowCardinality(String)"),
    ("rule_id", "String"),
    ("category", "LowCardinality(String)"),
    ("marker_ids", "Array(String)"),
    ("marker_levels", "Array(LowCardinality(String))"),
    ("exception_id", "String"),
    ("request_bytes", "UInt64"),
    ("upload_bytes", "UInt64"),
    ("response_bytes", "UInt64"),
    ("content_type", "String"),
    ("user_agent", "String"),
    ("duration_ms", "UInt32"),
    ("tls_intercepted", "Bool"),
    ("error", "String"),
    # migration 2
    ("declared_bytes", "UInt64"),  # Content-Length as the client announced it
    ("window_bytes", "UInt64"),  # bytes counted towards the user's rolling upload window
)
COLUMN_NAMES = tuple(name for name, _ in REQUEST_COLUMNS)


_V1_COLUMNS = REQUEST_COLUMNS[: [n for n, _ in REQUEST_COLUMNS].index("declared_bytes")]


def _requests_ddl() -> str:
    cols = ",\n  ".join(f"`{name}` {ctype}" for name, ctype in _V1_COLUMNS)
    # Month partitions make the retention TTL drop whole parts; the sort key puts the day
    # first (every audit query has a time range), then who and where.
    return (
        f"CREATE TABLE IF NOT EXISTS requests (\n  {cols}\n)\n"
        "ENGINE = MergeTree\nPARTITION BY toYYYYMM(ts)\n"
        "ORDER BY (toStartOfDay(ts), user, host, ts)\n"
        f"TTL toDateTime(ts) + INTERVAL {RETENTION_MIN_MONTHS} MONTH\n"
        "SETTINGS ttl_only_drop_parts = 1"
    )


# (version, name, statements). Append only: a released migration never changes.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "requests table", (_requests_ddl(),)),
    (
        2,
        "upload accounting columns",
        (
            "ALTER TABLE requests ADD COLUMN IF NOT EXISTS declared_bytes UInt64",
            "ALTER TABLE requests ADD COLUMN IF NOT EXISTS window_bytes UInt64",
        ),
    ),
    (
        3,
        "insert deduplication window (spool replays never duplicate rows)",
        ("ALTER TABLE requests MODIFY SETTING non_replicated_deduplication_window = 10000",),
    ),
)


class StoreError(Exception):
    pass


def default_dsn(data_dir: str | Path) -> str:
    return f"chdb://{Path(data_dir).resolve() / 'clickhouse'}"


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for printing."""
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", dsn)


@dataclass(frozen=True)
class RequestFilter:
    user: str | None = None
    host: str | None = None  # matches the host and its subdomains
    decision: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100


MAX_QUERY_ROWS = 100_000

# RequestFilter field → condition; values are always bound as server-side parameters.
_FILTER_SQL = (
    ("user", "user = {user:String}"),
    ("host", "(host = {host:String} OR endsWith(host, concat('.', {host:String})))"),
    ("decision", "decision = {decision:String}"),
    ("since", "ts >= {since:DateTime64(3, 'UTC')}"),
    ("until", "ts < {until:DateTime64(3, 'UTC')}"),
)


class Store:
    """A ClickHouse client behind a lock: the writer thread and the admin API share it."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.embedded = dsn.startswith("chdb://")
        if self.embedded:
            Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
        try:
            self._client = clickhouse_connect.get_client(dsn=dsn)
        except Exception as e:
            raise StoreError(f"cannot open store {describe_dsn(dsn)}: {e}") from e
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._client.command(sql, parameters=parameters)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._client.query(sql, parameters=parameters).result_rows

    # --- schema ---

    def migrate(self) -> list[int]:
        """Apply the migrations not applied yet; returns the versions applied now."""
        self.command(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = MergeTree ORDER BY version"
        )
        done = {row[0] for row in self.query("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, statements in MIGRATIONS:
            if version in done:
                continue
            for sql in statements:
                self.command(sql)
            with self._lock:
                self._client.insert(
                    "schema_migrations", [[version, name]], column_names=["version", "name"]
                )
            applied.append(version)
        return applied

    def retention_months(self) -> int | None:
        rows = self.query(
            "SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
            "AND name = 'requests'"
        )
        if not rows:
            return None
        m = re.search(r"toIntervalMonth\((\d+)\)", rows[0][0])
        return int(m.group(1)) if m else None

    def ensure_retention(self, months: int) -> bool:
        """Set the request log's TTL; True when it changed. Below six months is refused."""
        months = int(months)
        if months < RETENTION_MIN_MONTHS:
            raise StoreError(
                f"retention of {months} months refused: the request log must be kept at least "
                f"{RETENTION_MIN_MONTHS} months"
            )
        if self.retention_months() == months:
            return False
        # DDL takes no bind parameters; months is a validated int, not request text.
        self.command(f"ALTER TABLE requests MODIFY TTL toDateTime(ts) + INTERVAL {months} MONTH")
        return True

    # --- rows ---

    def insert_requests(self, rows: Sequence[Sequence[Any]], token: str = "") -> None:
        """Insert rows; a batch inserted again with the same token is dropped by ClickHouse
        (the table keeps a deduplication window), so a replay never writes a row twice."""
        if faults.active("store-down"):
            raise StoreError("store unavailable (injected fault)")
        settings = {"insert_deduplication_token": token} if token else None
        with self._lock:
            self._client.insert("requests", rows, column_names=COLUMN_NAMES, settings=settings)

    def window_usage(self, since: datetime, node: str, own: bool) -> list[tuple[str, int, int]]:
        """(user key, unix second, bytes) counted towards upload windows since ``since``, from
        this node's rows (own=True, to seed after a restart) or the other nodes' rows."""
        rows = self.query(
            "SELECT if(user = '', concat('ip:', client_ip), user) AS who, "
            "toUnixTimestamp(ts) AS second, sum(window_bytes) FROM requests "
            "WHERE ts >= {since:DateTime64(3, 'UTC')} AND window_bytes > 0 AND "
            + ("node = {node:String}" if own else "node != {node:String}")
            + " GROUP BY who, second ORDER BY second",
            {"since": since, "node": node},
        )
        return [(str(w), int(sec), int(n)) for w, sec, n in rows]

    def query_requests(self, f: RequestFilter) -> list[dict[str, Any]]:
        where = ["1"]
        params: dict[str, Any] = {"limit": max(1, min(int(f.limit), MAX_QUERY_ROWS))}
        for name, condition in _FILTER_SQL:
            value = getattr(f, name)
            if value is not None:
                where.append(condition)
                params[name] = value
        sql = (
            f"SELECT {', '.join(f'`{c}`' for c in COLUMN_NAMES)} FROM requests "
            f"WHERE {' AND '.join(where)} ORDER BY ts DESC, request_id LIMIT {{limit:UInt32}}"
        )
        return [dict(zip(COLUMN_NAMES, row, strict=True)) for row in self.query(sql, params)]
