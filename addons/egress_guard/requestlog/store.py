"""Store: the ClickHouse client factory, the versioned schema migrations, and the queries.

One code path for the embedded engine (``chdb://DIR``, in-process) and a ClickHouse server
(``http(s)://user:pass@host:8123/db``). The embedded engine opens its directory in one process
only, so the gateway process owns the Store and everyone else goes through its admin API.
All SQL that carries values uses server-side parameters; nothing from a request is pasted in.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import clickhouse_connect

from egress_guard.core.policy import RETENTION_MIN_MONTHS

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
    # migration 5
    ("forwarded_bytes", "UInt64"),  # body bytes the upstream was sent (0 for every block)
)
COLUMN_NAMES = tuple(name for name, _ in REQUEST_COLUMNS)
# The columns a person reads first: the CLI table and the console page show these.
SUMMARY_COLUMNS = (
    "ts",
    "user",
    "client_ip",
    "method",
    "host",
    "path",
    "status",
    "decision",
    "reason_kind",
    "rule_id",
    "marker_levels",
    "upload_bytes",
    "request_id",
)

# Who did what in the console and the admin API: logins, refusals, and every read of the
# request log (an auditor's query names whose traffic was looked at). Kept as long as the log.
CONSOLE_EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DateTime64(3, 'UTC')"),
    ("node", "LowCardinality(String)"),
    ("actor", "String"),  # account name, or the name that was tried at a failed login
    ("roles", "Array(LowCardinality(String))"),
    ("via", "LowCardinality(String)"),  # session | token | login
    ("client_ip", "String"),
    ("action", "LowCardinality(String)"),
    ("outcome", "LowCardinality(String)"),  # ok | denied | failed | locked
    ("detail", "String"),  # e.g. the filters of a request-log query, as JSON
)
CONSOLE_EVENT_NAMES = tuple(name for name, _ in CONSOLE_EVENT_COLUMNS)


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


def _console_events_ddl() -> str:
    cols = ",\n  ".join(f"`{name}` {ctype}" for name, ctype in CONSOLE_EVENT_COLUMNS)
    return (
        f"CREATE TABLE IF NOT EXISTS console_events (\n  {cols}\n)\n"
        "ENGINE = MergeTree\nPARTITION BY toYYYYMM(ts)\nORDER BY (ts, actor)\n"
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
    (4, "console events table", (_console_events_ddl(),)),
    (
        5,
        "body bytes forwarded to the upstream",
        ("ALTER TABLE requests ADD COLUMN IF NOT EXISTS forwarded_bytes UInt64",),
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
        self._client: Any = None
        self._lock = threading.Lock()
        self._retention: int | None = None  # set by open_schema; the schema is ready when set
        self.schema_ready = False
        if self.embedded:
            Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._connected()  # a local directory: a failure here is fatal at once

    def _connected(self) -> Any:
        """The client, connecting first if need be (a server may be down now and up later).
        Call with the lock held."""
        if self._client is None:
            # A server that is down or firewalled must fail a call in seconds, not minutes:
            # the log writer retries from the spool.
            # The DSN may set its own (``?send_receive_timeout=60``).
            given = set(urllib.parse.parse_qs(urllib.parse.urlsplit(self.dsn).query))
            defaults = {} if self.embedded else {"connect_timeout": 5, "send_receive_timeout": 30}
            kwargs = {k: v for k, v in defaults.items() if k not in given}
            try:
                self._client = clickhouse_connect.get_client(dsn=self.dsn, **kwargs)
            except Exception as e:
                raise StoreError(f"cannot open store {describe_dsn(self.dsn)}: {e}") from e
        return self._client

    def close(self) -> None:
        # A call stuck on a hung server holds the lock until its timeout; shutting down must
        # not wait for it.
        if not self._lock.acquire(timeout=5):
            return
        try:
            if self._client is not None:
                self._client.close()
                self._client = None
        finally:
            self._lock.release()

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._connected().command(sql, parameters=parameters)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._connected().query(sql, parameters=parameters).result_rows

    def open_schema(self, retention_months: int) -> None:
        """Migrate and set the retention. If the server cannot be reached, the writer calls
        this again before its next insert, so a gateway can start while ClickHouse is down."""
        self._retention = int(retention_months)
        self.migrate()
        self.ensure_retention(self._retention)
        self.schema_ready = True

    def _ensure_schema(self) -> None:
        if not self.schema_ready and self._retention is not None:
            self.open_schema(self._retention)

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
                self._connected().insert(
                    "schema_migrations", [[version, name]], column_names=["version", "name"]
                )
            applied.append(version)
        return applied

    RETAINED_TABLES = ("requests", "console_events")

    def retention_months(self, table: str = "requests") -> int | None:
        rows = self.query(
            "SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
            "AND name = {table:String}",
            {"table": table},
        )
        if not rows:
            return None
        m = re.search(r"toIntervalMonth\((\d+)\)", rows[0][0])
        return int(m.group(1)) if m else None

    def ensure_retention(self, months: int) -> bool:
        """Set the TTL of the request log and the console events; True when it changed.
        Below six months is refused."""
        months = int(months)
        if months < RETENTION_MIN_MONTHS:
            raise StoreError(
                f"retention of {months} months refused: the request log must be kept at least "
                f"{RETENTION_MIN_MONTHS} months"
            )
        changed = False
        for table in self.RETAINED_TABLES:
            if self.retention_months(table) != months:
                # DDL takes no bind parameters; months is a validated int and the table name
                # a constant, not request text.
                self.command(
                    f"ALTER TABLE {table} MODIFY TTL toDateTime(ts) + INTERVAL {months} MONTH"
                )
                changed = True
        return changed

    # --- rows ---

    def insert_requests(self, rows: Sequence[Sequence[Any]], token: str = "") -> None:
        """Insert rows; a batch inserted again with the same token is dropped by ClickHouse
        (the table keeps a deduplication window), so a replay never writes a row twice."""
        self._ensure_schema()
        settings = {"insert_deduplication_token": token} if token else None
        with self._lock:
            self._connected().insert("requests", rows, column_names=COLUMN_NAMES, settings=settings)

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

    def insert_console_event(self, row: Sequence[Any]) -> None:
        self._ensure_schema()
        with self._lock:
            self._connected().insert("console_events", [row], column_names=CONSOLE_EVENT_NAMES)

    def query_console_events(
        self, since: datetime | None, actor: str | None, limit: int, contains: str | None = None
    ) -> list[dict[str, Any]]:
        where = ["1"]
        params: dict[str, Any] = {"limit": max(1, min(int(limit), MAX_QUERY_ROWS))}
        if since is not None:
            where.append("ts >= {since:DateTime64(3, 'UTC')}")
            params["since"] = since
        if actor is not None:
            where.append("actor = {actor:String}")
            params["actor"] = actor
        if contains is not None:  # e.g. the hash of an export
            where.append("position(detail, {contains:String}) > 0")
            params["contains"] = contains
        sql = (
            f"SELECT {', '.join(f'`{c}`' for c in CONSOLE_EVENT_NAMES)} FROM console_events "
            f"WHERE {' AND '.join(where)} ORDER BY ts DESC LIMIT {{limit:UInt32}}"
        )
        return [dict(zip(CONSOLE_EVENT_NAMES, r, strict=True)) for r in self.query(sql, params)]

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
