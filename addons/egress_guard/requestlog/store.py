"""Store: the ClickHouse client factory, the versioned schema migrations, and the queries.

One code path for the embedded engine (``chdb://DIR``, in-process) and a ClickHouse server
(``http(s)://user:pass@host:8123/db``). The embedded engine opens its directory in one process
only, so the gateway process owns the Store and everyone else goes through its admin API.
All SQL that carries values uses server-side parameters; nothing from a request is pasted in.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect

from egress_guard.core.exceptions import Event, terms_from_json, terms_to_json
from egress_guard.core.policy import RETENTION_MIN_MONTHS

log = logging.getLogger(__name__)

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
    # migration 7: the client connection a row belongs to (a CONNECT, its tunnel, the
    # requests inside it, a WebSocket); rows written before it get it from a default
    ("connection_id", "String"),
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

# Every step of every exception (``core.exceptions``), appended and never changed: the state of
# an exception is derived from its events. Kept as long as the request log.
EXCEPTION_EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DateTime64(3, 'UTC')"),
    ("node", "LowCardinality(String)"),  # the gateway that recorded it
    ("event_id", "String"),
    ("exception_id", "String"),
    ("kind", "LowCardinality(String)"),  # requested granted approved denied cancelled revoked
    ("actor", "String"),
    ("actor_roles", "Array(LowCardinality(String))"),
    ("client_ip", "String"),
    ("reason", "String"),
    ("category", "LowCardinality(String)"),  # the destination category the rules applied to
    ("request_id", "String"),  # the blocked request a request came from
    ("approvals_needed", "UInt8"),
    ("decide_by", "DateTime64(3, 'UTC')"),  # a pending exception expires then
    ("subject", "String"),  # of the terms, to filter by: user:NAME | group:NAME | client:CIDR
    ("expiry", "DateTime64(3, 'UTC')"),  # of the terms, to find the exceptions still live
    ("terms", "String"),  # the terms as JSON; "" for denied, cancelled, revoked
)
EXCEPTION_EVENT_NAMES = tuple(name for name, _ in EXCEPTION_EVENT_COLUMNS)

# Columns the schema has but the writer does not send yet (migration 7): reads select them
# beside COLUMN_NAMES. ``connection_id`` is the client connection a row belongs to (a CONNECT,
# the requests inside its tunnel, the tunnel row); its default fills it for tunnel rows, whose
# request id is "<client connection id>/tunnel".
READ_ONLY_COLUMNS: tuple[tuple[str, str], ...] = (("connection_id", "String"),)
READ_COLUMN_NAMES = COLUMN_NAMES + tuple(n for n, _ in READ_ONLY_COLUMNS if n not in COLUMN_NAMES)

# The triage of DLP incidents (``requestlog.incidents``), appended and never changed: an
# incident is a request row (marker block or alert, unscannable refusal) and its state is the
# latest event of each kind. Kept as long as the request log.
INCIDENT_EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DateTime64(3, 'UTC')"),
    ("node", "LowCardinality(String)"),
    ("event_id", "String"),
    ("request_id", "String"),  # the incident: the request row that opened it
    ("kind", "LowCardinality(String)"),  # status | assign | classify | comment
    ("value", "String"),  # the new status, assignee ("" = nobody) or classification
    ("comment", "String"),
    ("actor", "String"),
    ("actor_roles", "Array(LowCardinality(String))"),
    ("client_ip", "String"),
)
INCIDENT_EVENT_NAMES = tuple(name for name, _ in INCIDENT_EVENT_COLUMNS)


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


def _event_table_ddl(
    table: str,
    columns: Sequence[tuple[str, str]],
    order_by: str,
    *,
    extra: str = "",
    dedup: bool = True,
) -> str:
    """An append-only event table kept as long as the request log, month-partitioned. ``dedup``:
    a retried insert of the same block is dropped (events are sent again after a failure)."""
    cols = ",\n  ".join(f"`{name}` {ctype}" for name, ctype in columns)
    settings = "ttl_only_drop_parts = 1" + (
        ", non_replicated_deduplication_window = 10000" if dedup else ""
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {table} (\n  {cols}{extra}\n)\n"
        f"ENGINE = MergeTree\nPARTITION BY toYYYYMM(ts)\nORDER BY ({order_by})\n"
        f"TTL toDateTime(ts) + INTERVAL {RETENTION_MIN_MONTHS} MONTH\n"
        f"SETTINGS {settings}"
    )


def _console_events_ddl() -> str:
    return _event_table_ddl("console_events", CONSOLE_EVENT_COLUMNS, "ts, actor", dedup=False)


def _exception_events_ddl() -> str:
    # inserted_at is the server's clock: nodes pull what was inserted since they last looked,
    # whatever the clocks of the nodes that recorded it.
    return _event_table_ddl(
        "exception_events",
        EXCEPTION_EVENT_COLUMNS,
        "exception_id, ts, event_id",
        extra=",\n  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3)",
    )


def _incident_events_ddl() -> str:
    return _event_table_ddl("incident_events", INCIDENT_EVENT_COLUMNS, "request_id, ts, event_id")


# The connection a tunnel row belongs to is in its request id; other rows get theirs from
# the writer once it sends the column.
_CONNECTION_DEFAULT = (
    "if(endsWith(request_id, '/tunnel'), substring(request_id, 1, length(request_id) - 7), '')"
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
    (6, "exception events table", (_exception_events_ddl(),)),
    (
        7,
        "connection id, and skip indexes for looking up one request or connection",
        (
            "ALTER TABLE requests ADD COLUMN IF NOT EXISTS connection_id String "
            f"DEFAULT {_CONNECTION_DEFAULT}",
            # A request id quoted from a block page, or one connection, among months of rows:
            # bloom filters skip the granules that cannot hold it. MATERIALIZE builds them
            # for the parts written before (a mutation; new parts get them as written).
            "ALTER TABLE requests ADD INDEX IF NOT EXISTS request_id_bloom request_id "
            "TYPE bloom_filter(0.01) GRANULARITY 1",
            "ALTER TABLE requests ADD INDEX IF NOT EXISTS connection_id_bloom connection_id "
            "TYPE bloom_filter(0.01) GRANULARITY 1",
            "ALTER TABLE requests MATERIALIZE INDEX request_id_bloom",
            "ALTER TABLE requests MATERIALIZE INDEX connection_id_bloom",
        ),
    ),
    (8, "incident events table", (_incident_events_ddl(),)),
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
    group: str | None = None
    client: str | None = None  # an address, or a network (CIDR)
    category: str | None = None
    reason_kind: str | None = None  # "none": rows with no reason
    rule_id: str | None = None
    marker_level: str | None = None
    exception_id: str | None = None  # "*": any exception
    request_id: str | None = None
    connection_id: str | None = None
    kind: str | None = None
    min_upload: int | None = None  # upload_bytes at least this
    # Keyset pagination: the (ts, request_id) of the last row of the previous page; the page
    # holds the rows after it in (ts, request_id) descending order. Never an OFFSET.
    after: tuple[datetime, str] | None = None


MAX_QUERY_ROWS = 100_000
PAGE_WINDOWS = (timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=31))
_FLOOR = datetime(1970, 1, 1, tzinfo=UTC)
# Every query an auditor's request makes runs with these (``audit_settings``): read-only, and
# stopped rather than left to hold the store.
MAX_EXECUTION_SECONDS = 30


def audit_settings(max_rows: int = MAX_QUERY_ROWS) -> dict[str, Any]:
    return {
        "readonly": 1,
        "max_execution_time": MAX_EXECUTION_SECONDS,
        "max_result_rows": max(1, int(max_rows)),
        "result_overflow_mode": "throw",
    }


def client_range(client: str) -> tuple[str, str]:
    """The first and last address of an address or a network (``10.1.0.0/16``, ``2001:db8::/32``);
    ValueError for anything else."""
    try:
        net = ipaddress.ip_network(client.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an address or network: {client!r}") from None
    return str(net.network_address), str(net.broadcast_address)


# RequestFilter field → condition; values are always bound as server-side parameters.
_FILTER_SQL = (
    ("user", "user = {user:String}"),
    ("host", "(host = {host:String} OR endsWith(host, concat('.', {host:String})))"),
    ("decision", "decision = {decision:String}"),
    ("since", "ts >= {since:DateTime64(3, 'UTC')}"),
    ("until", "ts < {until:DateTime64(3, 'UTC')}"),
    ("group", "has(groups, {group:String})"),
    ("category", "category = {category:String}"),
    ("rule_id", "rule_id = {rule_id:String}"),
    ("marker_level", "has(marker_levels, {marker_level:String})"),
    ("request_id", "request_id = {request_id:String}"),
    ("connection_id", "connection_id = {connection_id:String}"),
    ("kind", "kind = {kind:String}"),
    ("min_upload", "upload_bytes >= {min_upload:UInt64}"),
)


def request_conditions(f: RequestFilter) -> tuple[list[str], dict[str, Any]]:
    """The WHERE conditions and bound parameters of a filter (without its cursor)."""
    where = ["1"]
    params: dict[str, Any] = {}
    for name, condition in _FILTER_SQL:
        value = getattr(f, name)
        if value is not None:
            where.append(condition)
            params[name] = value
    if f.reason_kind is not None:
        where.append("reason_kind = {reason_kind:String}")
        params["reason_kind"] = "" if f.reason_kind == "none" else f.reason_kind
    if f.exception_id == "*":
        where.append("exception_id != ''")
    elif f.exception_id is not None:
        where.append("exception_id = {exception_id:String}")
        params["exception_id"] = f.exception_id
    if f.client is not None:
        # As addresses, not text: 10.1.2.3 and ::ffff:10.1.2.3 are one client; "" is no
        # address (toIPv6OrZero gives ::, outside every network but ::/0).
        where.append(
            "toIPv6OrZero(client_ip) "
            "BETWEEN toIPv6({client_lo:String}) AND toIPv6({client_hi:String})"
        )
        params["client_lo"], params["client_hi"] = client_range(f.client)
    return where, params


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

    def query(
        self,
        sql: str,
        parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        with self._lock:
            result = self._connected().query(sql, parameters=parameters, settings=settings)
            return result.result_rows

    def audit_query(
        self, sql: str, parameters: dict[str, Any] | None = None, max_rows: int = MAX_QUERY_ROWS
    ) -> list[tuple[Any, ...]]:
        """A query an auditor's request makes: read-only and bounded, whatever it asks. Only
        a SELECT: the embedded engine's client applies a statement's settings with SET (and
        resets them after) for anything else, and a readonly SET cannot be reset, which would
        leave the gateway's own session unable to write."""
        if not re.match(r"\s*(SELECT|WITH)\b", sql, re.IGNORECASE):
            raise StoreError("an auditor's query is a SELECT")
        return self.query(sql, parameters, audit_settings(max_rows))

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

    RETAINED_TABLES = ("requests", "console_events", "exception_events", "incident_events")

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
        Below six months is refused. The exception events are kept as long."""
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

    def insert_incident_events(self, rows: Sequence[Sequence[Any]], token: str) -> None:
        """Append triage events (``requestlog.incidents``); a retry with the same token is
        dropped by the table's deduplication window."""
        self._ensure_schema()
        with self._lock:
            self._connected().insert(
                "incident_events",
                rows,
                column_names=INCIDENT_EVENT_NAMES,
                settings={"insert_deduplication_token": token},
            )

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
        """One page of rows, newest first; ``f.after`` continues after the previous page."""
        where, params = request_conditions(f)
        params["limit"] = max(1, min(int(f.limit), MAX_QUERY_ROWS))
        if f.after is not None:
            # The first condition alone lets the sort key skip the newer days; the second
            # is the exact keyset step.
            where.append("ts <= {after_ts:DateTime64(3, 'UTC')}")
            where.append("(ts < {after_ts:DateTime64(3, 'UTC')} OR request_id < {after_id:String})")
            params["after_ts"], params["after_id"] = f.after
        sql = (
            f"SELECT {', '.join(f'`{c}`' for c in READ_COLUMN_NAMES)} FROM requests "
            f"WHERE {' AND '.join(where)} AND ts >= {{lo:DateTime64(3, 'UTC')}} "
            "ORDER BY ts DESC, request_id DESC LIMIT {limit:UInt32}"
        )
        # Without a user (the second key column) a page would sort the whole range to find
        # its newest rows. So the newest hour is tried first, then a day, a week, a month,
        # the whole range: the page is whole once a window holds ``limit`` rows (every row
        # outside it is older than every row in it), and a window reads only its own days.
        top = f.after[0] if f.after else f.until or datetime.now(UTC)
        top = top if top.tzinfo else top.replace(tzinfo=UTC)  # rows hand back naive UTC
        windows = () if f.user or f.request_id or f.connection_id else PAGE_WINDOWS
        for window in (*windows, None):
            lo = top - window if window else _FLOOR
            if window and f.since is not None and lo <= f.since:
                continue  # this window covers the range: the last try does that
            rows = self.audit_query(sql, params | {"lo": lo}, params["limit"])
            if window is None or len(rows) == params["limit"]:
                return [dict(zip(READ_COLUMN_NAMES, row, strict=True)) for row in rows]
        raise AssertionError("unreachable: the last window is the whole range")

    # --- exception events ---

    def insert_exception_event(self, event: Event, node: str = "") -> None:
        """Append one event. Inserted again (a retry after an answer was lost) it is dropped:
        its id is the deduplication token, and reads keep one row per event id besides."""
        self._ensure_schema()
        with self._lock:
            self._connected().insert(
                "exception_events",
                [exception_event_row(event, node)],
                column_names=EXCEPTION_EVENT_NAMES,
                settings={"insert_deduplication_token": event.id},
            )

    def exception_events(
        self,
        *,
        since: datetime | None = None,
        exception_id: str | None = None,
        subject: str | None = None,
        live_after: datetime | None = None,
    ) -> list[Event]:
        """Events in time order: all, those since a time, of one exception, of one subject
        (``user:alice``), or of the exceptions that may still be live after a time."""
        return self._exception_events(since, exception_id, subject, live_after, None)[0]

    def exception_events_inserted(
        self, after: datetime | None, live_after: datetime | None = None
    ) -> tuple[list[Event], datetime | None]:
        """What a node refreshing its view needs: the events the server stored after
        ``after`` (its own clock, not the nodes'), and the newest insert time among them
        (``after`` when there are none)."""
        return self._exception_events(None, None, None, live_after, after)

    def _exception_events(
        self,
        since: datetime | None,
        exception_id: str | None,
        subject: str | None,
        live_after: datetime | None,
        inserted_after: datetime | None,
    ) -> tuple[list[Event], datetime | None]:
        where = ["1"]
        params: dict[str, Any] = {}
        for name, value, condition in (
            ("since", since, "ts >= {since:DateTime64(3, 'UTC')}"),
            ("exception_id", exception_id, "exception_id = {exception_id:String}"),
            ("subject", subject, "subject = {subject:String}"),
            ("after", inserted_after, "inserted_at > {after:DateTime64(3, 'UTC')}"),
            (
                "live_after",
                live_after,
                # A pending exception ends by its expiry at the latest, too.
                "exception_id IN (SELECT exception_id FROM exception_events "
                "GROUP BY exception_id HAVING max(expiry) >= {live_after:DateTime64(3, 'UTC')})",
            ),
        ):
            if value is not None:
                where.append(condition)
                params[name] = value
        sql = (
            "SELECT toUnixTimestamp64Milli(ts), event_id, exception_id, kind, actor, actor_roles, "
            "client_ip, reason, category, request_id, approvals_needed, "
            "toUnixTimestamp64Milli(decide_by), terms, inserted_at FROM exception_events "
            f"WHERE {' AND '.join(where)} ORDER BY ts, event_id LIMIT 1 BY event_id"
        )
        events: list[Event] = []
        newest = inserted_after
        for row in self.query(sql, params):
            inserted = row[-1] if row[-1].tzinfo else row[-1].replace(tzinfo=UTC)  # it is UTC
            newest = inserted if newest is None or inserted > newest else newest
            try:
                events.append(_event_of_row(row))
            except ValueError as e:  # written by a version that knows more: never fatal
                log.error("exception event %s unreadable, skipped: %s", row[1], e)
        return events, newest


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def exception_event_row(event: Event, node: str = "") -> tuple[Any, ...]:
    """The ``exception_events`` row of an event (``EXCEPTION_EVENT_NAMES`` order)."""
    t = event.terms
    return (
        _utc(event.ts_ms),
        node,
        event.id,
        event.exception_id,
        event.kind,
        event.actor,
        list(event.actor_roles),
        event.client_ip,
        event.reason,
        event.category,
        event.request_id,
        event.approvals_needed,
        _utc(event.decide_by_ms),
        str(t.subject) if t else "",
        _utc(t.expiry_ms if t else 0),
        json.dumps(terms_to_json(t), ensure_ascii=False, sort_keys=True) if t else "",
    )


def _event_of_row(row: Sequence[Any]) -> Event:
    (ts, event_id, exception_id, kind, actor, roles, client_ip, reason, category, request_id,
     needed, decide_by, terms, _) = row  # fmt: skip
    try:
        parsed = terms_from_json(json.loads(terms)) if terms else None
    except json.JSONDecodeError as e:
        raise ValueError(f"terms are not JSON: {e}") from None
    return Event(
        id=event_id,
        exception_id=exception_id,
        kind=kind,
        actor=actor,
        actor_roles=tuple(roles),
        client_ip=client_ip,
        ts_ms=int(ts),
        reason=reason,
        terms=parsed,
        category=category,
        request_id=request_id,
        approvals_needed=int(needed),
        decide_by_ms=int(decide_by),
    )
