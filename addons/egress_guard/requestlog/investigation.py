"""The auditor's queries over the store: one request and its connection, one person's
timeline, the reports, DLP incidents and their triage, the console's event log, and the
retention proof.

Every query runs through ``Store.audit_query`` (read-only, bounded in time and rows) and binds
every value as a server-side parameter. Table names and SQL fragments come from constants of
this module, never from a request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from . import incidents
from .store import (
    CONSOLE_EVENT_NAMES,
    INCIDENT_EVENT_NAMES,
    READ_COLUMN_NAMES,
)

REQUEST_SELECT = ", ".join(f"`{c}`" for c in READ_COLUMN_NAMES)
# A connection's rows are looked for this far around the row that names it: a client
# connection (keep-alive, a tunnel) lasting longer is rare, and the bound keeps the lookup on
# a few days' parts.
CONNECTION_SPAN = timedelta(days=3)
# Old rows carry no connection id: the requests of a CONNECT are then the ones from the same
# client address to the same host and port after it, until its next CONNECT or this long.
APPROXIMATE_SPAN = timedelta(hours=1)
TIMELINE_ROWS = 2000
TOP = 10


class AuditStore(Protocol):
    def audit_query(
        self, sql: str, parameters: dict[str, Any] | None = None, max_rows: int = ...
    ) -> list[tuple[Any, ...]]: ...

    def insert_incident_events(self, rows: Sequence[Sequence[Any]], token: str) -> None: ...

    def retention_months(self, table: str = "requests") -> int | None: ...

    RETAINED_TABLES: tuple[str, ...]


def gateway_timezone() -> str:
    """The gateway's time zone as an IANA name for ClickHouse (days are cut there): $TZ, else
    /etc/timezone, else where /etc/localtime points; UTC when none says."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if (tz and "/" in tz) or tz == "UTC":
        return tz
    try:
        named = Path("/etc/timezone").read_text().strip()
        if named:
            return named
    except OSError:
        pass
    try:
        target = str(Path("/etc/localtime").resolve())
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    except OSError:
        pass
    return "UTC"


def _rows(names: Sequence[str], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(names, r, strict=True)) for r in rows]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def connection_of(row: dict[str, Any]) -> str:
    """The client connection a row belongs to, "" when its row does not say."""
    if row.get("connection_id"):
        return str(row["connection_id"])
    rid = str(row.get("request_id", ""))
    return rid.removesuffix("/tunnel") if rid.endswith("/tunnel") else ""


def explain(row: dict[str, Any]) -> str:
    """Why a row exists, for a person who sees several rows for one visit."""
    kind, decision, status = row.get("kind"), row.get("decision"), row.get("status")
    where = f"{row.get('host')}:{row.get('port')}"
    if kind == "connect":
        text = (
            f"The client asked the proxy to open a tunnel to {where} (HTTP CONNECT). Status "
            f"{status} is the proxy's answer to that question"
        )
        if status == 407:
            return text + ": proxy login required."
        if decision == "block":
            return text + (
                ": the destination is blocked, and the tunnel is opened only so that the "
                "gateway can answer the request inside it with its block page; nothing "
                "reaches the destination."
            )
        return text + "; the requests inside the tunnel have rows of their own."
    if kind == "tunnel":
        if row.get("tls_intercepted") is False and row.get("error"):
            return (
                f"The tunnel to {where} itself, closed without an HTTP request the gateway "
                "could read (see the error: e.g. the client did not trust the interception "
                "certificate, or sent something other than HTTP). Status 0: a tunnel has no "
                "HTTP status."
            )
        return (
            f"The tunnel to {where} itself: bytes relayed without being read as HTTP (a "
            "pass-through host or a raw TCP connection the policy allows), counted as "
            "uploads. Status 0: a tunnel has no HTTP status."
        )
    if kind == "websocket":
        return (
            "A WebSocket: its messages are counted (upload bytes: sent by the client) and "
            "scanned; the row is written when it closes."
        )
    inside = row.get("scheme") == "https" or row.get("tls_intercepted")
    text = "An HTTP request"
    if inside:
        text += " inside a tunnel, intercepted and judged on its own"
    if decision == "block":
        return text + f"; refused ({row.get('reason_kind') or 'see error'}), status {status}."
    if decision == "alert":
        return text + "; forwarded, and flagged for an auditor."
    return text + "."


@dataclass(frozen=True)
class EventFilter:
    """Which console events: all fields optional; ``after`` is the keyset cursor (ts, hash)."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    contains: str | None = None
    limit: int = 100
    after: tuple[datetime, int] | None = None


class Investigation:
    """The auditor's queries over one store."""

    def __init__(self, store: AuditStore, tz: str | None = None):
        self.store = store
        self.tz = tz or gateway_timezone()

    def _q(self, sql: str, params: dict[str, Any] | None = None, max_rows: int = 100_000) -> Any:
        return self.store.audit_query(sql, params or {}, max_rows)

    # --- one request and its connection ---

    def request(self, request_id: str) -> dict[str, Any] | None:
        rows = self._q(
            f"SELECT {REQUEST_SELECT} FROM requests WHERE request_id = {{id:String}} "
            "ORDER BY ts LIMIT 1",
            {"id": request_id},
        )
        return _rows(READ_COLUMN_NAMES, rows)[0] if rows else None

    def connection(self, request_id: str) -> dict[str, Any] | None:
        """The row, the client connection it belongs to and all that connection's rows in
        time order, each with why it exists; ``approximate`` when the rows carry no
        connection id and the tunnel's requests are matched by address, host and time."""
        row = self.request(request_id)
        if row is None:
            return None
        cid = connection_of(row)
        ts = _utc(row["ts"])
        if cid:
            rows = self._q(
                f"SELECT {REQUEST_SELECT} FROM requests WHERE ts >= {{lo:DateTime64(3, 'UTC')}} "
                "AND ts <= {hi:DateTime64(3, 'UTC')} AND (connection_id = {cid:String} OR "
                "request_id = concat({cid:String}, '/tunnel')) ORDER BY ts, request_id LIMIT 1000",
                {"cid": cid, "lo": ts - CONNECTION_SPAN, "hi": ts + CONNECTION_SPAN},
            )
            members, approximate = _rows(READ_COLUMN_NAMES, rows), False
        else:
            members, approximate = self._approximate_connection(row), True
        for m in members:
            m["why"] = explain(m)
        return {"row": row, "connection_id": cid, "approximate": approximate, "rows": members}

    def _approximate_connection(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if row["kind"] not in ("connect", "http", "websocket") or (
            row["kind"] != "connect" and row["scheme"] != "https"
        ):
            return [row]
        same = (
            "client_ip = {ip:String} AND host = {host:String} AND port = {port:UInt16} AND "
            "connection_id = ''"
        )
        params = {"ip": row["client_ip"], "host": row["host"], "port": row["port"]}
        ts = _utc(row["ts"])
        if row["kind"] == "connect":
            start = ts
        else:  # the CONNECT this request came through: the last one before it
            found = self._q(
                f"SELECT max(ts) FROM requests WHERE {same} AND kind = 'connect' AND "
                "ts <= {ts:DateTime64(3, 'UTC')} AND ts >= {lo:DateTime64(3, 'UTC')}",
                params | {"ts": ts, "lo": ts - APPROXIMATE_SPAN},
            )
            start = _utc(found[0][0]) if found and found[0][0].year > 1970 else None
            if start is None:
                return [row]
        following = self._q(
            f"SELECT min(ts) FROM requests WHERE {same} AND kind = 'connect' AND "
            "ts > {start:DateTime64(3, 'UTC')} AND ts <= {hi:DateTime64(3, 'UTC')}",
            params | {"start": start, "hi": start + APPROXIMATE_SPAN},
        )
        nxt = _utc(following[0][0]) if following and following[0][0].year > 1970 else None
        end = nxt or start + APPROXIMATE_SPAN
        rows = self._q(
            f"SELECT {REQUEST_SELECT} FROM requests WHERE {same} AND "
            "ts >= {start:DateTime64(3, 'UTC')} AND ts < {end:DateTime64(3, 'UTC')} AND "
            "(kind IN ('connect', 'tunnel') OR scheme = 'https') "
            "ORDER BY ts, request_id LIMIT 1000",
            params | {"start": start, "end": end},
        )
        return _rows(READ_COLUMN_NAMES, rows) or [row]

    # --- one person's timeline ---

    @staticmethod
    def _subject(subject: str) -> tuple[str, dict[str, Any]]:
        """A user name, or ``ip:ADDRESS`` for traffic with no user (by client address)."""
        if subject.startswith("ip:"):
            return "client_ip = {who:String}", {"who": subject[3:]}
        return "user = {who:String}", {"who": subject}

    def timeline(
        self,
        subject: str,
        since: datetime,
        until: datetime,
        *,
        everything: bool = False,
        after: tuple[datetime, str] | None = None,
        limit: int = TIMELINE_ROWS,
    ) -> dict[str, Any]:
        """One person's egress between two times: a summary per day (in the gateway's time
        zone), the sites reached, the exceptions used, and the rows in time order (only the
        notable ones unless ``everything``: blocks, alerts, uploads, marker hits, exceptions),
        ``limit`` at a time after ``after``."""
        who, params = self._subject(subject)
        params |= {"since": since, "until": until, "tz": self.tz}
        rng = (
            f"{who} AND ts >= {{since:DateTime64(3, 'UTC')}} "
            "AND ts < {until:DateTime64(3, 'UTC')}"
        )
        day_names = (
            "day", "requests", "blocked", "alerts", "hosts", "upload_bytes", "forwarded_bytes",
            "marker_hits", "exceptions",
        )  # fmt: skip
        days = self._q(
            "SELECT toDate(ts, {tz:String}) AS day, count(), countIf(decision = 'block'), "
            "countIf(decision = 'alert'), uniqExact(host), sum(upload_bytes), "
            "sum(forwarded_bytes), countIf(notEmpty(marker_ids)), "
            "arraySort(groupUniqArrayIf(exception_id, exception_id != '')) "
            f"FROM requests WHERE {rng} GROUP BY day ORDER BY day",
            params,
        )
        site_names = (
            "host", "first", "last", "requests", "reached", "blocked", "upload_bytes",
            "forwarded_bytes", "categories",
        )  # fmt: skip
        sites = self._q(
            "SELECT host, min(ts), max(ts), count(), countIf(decision != 'block'), "
            "countIf(decision = 'block'), sum(upload_bytes), sum(forwarded_bytes), "
            "arraySort(groupUniqArrayIf(category, category != '')) "
            f"FROM requests WHERE {rng} GROUP BY host ORDER BY min(ts) LIMIT 1000",
            params,
        )
        exc_names = ("exception_id", "requests", "first", "last", "hosts")
        exceptions = self._q(
            "SELECT exception_id, count(), min(ts), max(ts), arraySort(groupUniqArray(host)) "
            f"FROM requests WHERE {rng} AND exception_id != '' GROUP BY exception_id "
            "ORDER BY min(ts)",
            params,
        )
        where = [rng]
        if not everything:
            where.append(
                "(decision != 'allow' OR upload_bytes > 0 OR notEmpty(marker_ids) "
                "OR exception_id != '')"
            )
        page = params | {"limit": max(1, min(limit, TIMELINE_ROWS))}
        if after is not None:
            where.append("ts >= {after_ts:DateTime64(3, 'UTC')}")
            where.append("(ts > {after_ts:DateTime64(3, 'UTC')} OR request_id > {after_id:String})")
            page["after_ts"], page["after_id"] = after
        rows = self._q(
            f"SELECT {REQUEST_SELECT} FROM requests WHERE {' AND '.join(where)} "
            "ORDER BY ts, request_id LIMIT {limit:UInt32}",
            page,
        )
        events = _rows(READ_COLUMN_NAMES, rows)
        return {
            "subject": subject,
            "since": since,
            "until": until,
            "timezone": self.tz,
            "days": _rows(day_names, days),
            "sites": _rows(site_names, sites),
            "exceptions": _rows(exc_names, exceptions),
            "events": events,
            "everything": everything,
            "next": (
                (events[-1]["ts"], events[-1]["request_id"])
                if len(events) == page["limit"]
                else None
            ),
        }

    # --- reports ---

    def report(self, since: datetime, until: datetime) -> dict[str, Any]:
        """Each report over a time range: series per time bucket (an hour up to two days, a
        day beyond, cut in the gateway's time zone) and top lists."""
        span = until - since
        # Cut in the gateway's time zone, handed back as the UTC instant it starts at (as
        # every time leaves the store).
        unit = "Hour" if span <= timedelta(days=2) else "Day"
        bucket = f"toTimeZone(toStartOf{unit}(ts, {{tz:String}}), 'UTC')"
        params = {"since": since, "until": until, "tz": self.tz, "top": TOP}
        rng = "ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}"
        blocked = f"{rng} AND decision = 'block'"

        def q(names: Sequence[str], sql: str) -> list[dict[str, Any]]:
            return _rows(names, self._q(sql, params))

        def top_blocked(column: str) -> list[dict[str, Any]]:
            # column is one of this function's callers' constants, never request text.
            return q(
                ("key", "value"),
                f"SELECT {column} AS key, count() AS value FROM requests WHERE {blocked} "
                "GROUP BY key ORDER BY value DESC, key LIMIT {top:UInt32}",
            )

        return {
            "since": since,
            "until": until,
            "bucket": "hour" if span <= timedelta(days=2) else "day",
            "timezone": self.tz,
            "totals": q(
                (
                    "requests",
                    "blocked",
                    "alerts",
                    "users",
                    "hosts",
                    "upload_bytes",
                    "forwarded_bytes",
                    "marker_hits",
                ),
                "SELECT count(), countIf(decision = 'block'), countIf(decision = 'alert'), "
                "uniq(user), uniq(host), sum(upload_bytes), sum(forwarded_bytes), "
                f"countIf(notEmpty(marker_ids)) FROM requests WHERE {rng}",
            )[0],
            "requests_over_time": q(
                ("time", "requests", "blocked", "alerts"),
                f"SELECT {bucket} AS t, count(), countIf(decision = 'block'), "
                f"countIf(decision = 'alert') FROM requests WHERE {rng} GROUP BY t ORDER BY t",
            ),
            "top_blocked_users": top_blocked("user"),
            "top_blocked_hosts": top_blocked("host"),
            "top_blocked_categories": top_blocked("category"),
            "upload_per_user_day": q(
                ("day", "user", "upload_bytes", "forwarded_bytes"),
                "SELECT toDate(ts, {tz:String}) AS day, user, sum(upload_bytes), "
                f"sum(forwarded_bytes) FROM requests WHERE {rng} AND user IN ("
                f"SELECT user FROM requests WHERE {rng} AND upload_bytes > 0 GROUP BY user "
                "ORDER BY sum(upload_bytes) DESC, user LIMIT {top:UInt32}) "
                "AND upload_bytes > 0 GROUP BY day, user ORDER BY day, user",
            ),
            "marker_hits_over_time": q(
                ("time", "level", "hits"),
                f"SELECT {bucket} AS t, level, count() FROM requests "
                f"ARRAY JOIN arrayDistinct(marker_levels) AS level WHERE {rng} "
                "AND notEmpty(marker_levels) GROUP BY t, level ORDER BY t, level",
            ),
            "exception_usage": q(
                ("exception_id", "requests", "users", "upload_bytes", "first", "last"),
                "SELECT exception_id, count() AS n, uniq(user), sum(upload_bytes), min(ts), "
                f"max(ts) FROM requests WHERE {rng} AND exception_id != '' "
                "GROUP BY exception_id ORDER BY n DESC, exception_id LIMIT 100",
            ),
            "busiest_destinations": q(
                ("host", "requests", "users", "upload_bytes", "blocked"),
                "SELECT host, count() AS n, uniq(user), sum(upload_bytes), "
                f"countIf(decision = 'block') FROM requests WHERE {rng} "
                "GROUP BY host ORDER BY n DESC, host LIMIT {top:UInt32}",
            ),
        }

    # --- DLP incidents ---

    _STATE = (
        "SELECT request_id, argMaxIf(value, (ts, event_id), kind = 'status') AS status, "
        "argMaxIf(value, (ts, event_id), kind = 'assign') AS assignee, "
        "argMaxIf(value, (ts, event_id), kind = 'classify') AS classification, "
        "countIf(kind = 'comment') AS comments, max(ts) AS updated FROM incident_events "
    )
    _INCIDENT_ROW = (
        "request_id", "ts", "user", "client_ip", "host", "port", "method", "path", "category",
        "decision", "marker_ids", "marker_levels", "rule_id", "upload_bytes",
        "forwarded_bytes", "error",
    )  # fmt: skip
    INCIDENT_NAMES = (
        *_INCIDENT_ROW, "severity", "status", "assignee", "classification", "comments", "updated",
    )  # fmt: skip

    def incidents(
        self,
        *,
        since: datetime,
        until: datetime,
        status: str | None = None,
        assignee: str | None = None,
        user: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """The queue: incidents opened between two times, open ones first, then by severity
        (highest first) and age (oldest first)."""
        cols = ", ".join(f"r.`{c}`" for c in self._INCIDENT_ROW)
        where = ["1"]
        params: dict[str, Any] = {"since": since, "until": until, "limit": limit}
        if status is not None:
            where.append("incident_status = {status:String}")
            params["status"] = status
        if assignee is not None:
            where.append("e.assignee = {assignee:String}")
            params["assignee"] = assignee
        opened = (
            f"{incidents.INCIDENT_CONDITION} AND ts >= {{since:DateTime64(3, 'UTC')}} "
            "AND ts < {until:DateTime64(3, 'UTC')}"
        )
        if user is not None:
            opened += " AND user = {user:String}"
            params["user"] = user
        inner = ", ".join(f"`{c}`" for c in self._INCIDENT_ROW)
        sql = (
            f"SELECT {cols}, r.severity, if(e.status = '', 'new', e.status) AS incident_status, "
            "e.assignee, e.classification, e.comments, e.updated "
            f"FROM (SELECT {inner}, {incidents.SEVERITY_SQL} AS severity FROM requests "
            # The triage events are few (people write them): all of them are grouped, and
            # the request log is read once.
            f"WHERE {opened}) AS r LEFT JOIN ({self._STATE} GROUP BY request_id) AS e "
            f"ON r.request_id = e.request_id WHERE {' AND '.join(where)} ORDER BY "
            "incident_status = 'resolved', r.severity DESC, r.ts, r.request_id "
            "LIMIT {limit:UInt32}"
        )
        rows = _rows(self.INCIDENT_NAMES, self._q(sql, params, limit))
        for r in rows:
            r["severity"] = incidents.SEVERITY_NAMES[r["severity"]]
        return rows

    def incident(self, request_id: str) -> dict[str, Any] | None:
        """One incident: its row (every column), its state and its whole history."""
        row = self.request(request_id)
        if row is None or not self._is_incident(request_id):
            return None
        history = _rows(
            INCIDENT_EVENT_NAMES,
            self._q(
                f"SELECT {', '.join(INCIDENT_EVENT_NAMES)} FROM incident_events "
                "WHERE request_id = {id:String} ORDER BY ts, event_id LIMIT 10000",
                {"id": request_id},
            ),
        )
        state = {"status": "new", "assignee": "", "classification": ""}
        field_of = {"status": "status", "assign": "assignee", "classify": "classification"}
        for e in history:
            if e["kind"] in field_of:
                state[field_of[e["kind"]]] = e["value"]
        severity = (
            3 if row["marker_ids"] and row["decision"] == "block" else 2 if row["marker_ids"] else 1
        )
        return {
            "row": row,
            "severity": incidents.SEVERITY_NAMES[severity],
            "kind": "marker" if row["marker_ids"] else "unscannable",
            **state,
            "history": history,
        }

    def _is_incident(self, request_id: str) -> bool:
        return bool(
            self._q(
                "SELECT 1 FROM requests WHERE request_id = {id:String} AND "
                f"{incidents.INCIDENT_CONDITION} LIMIT 1",
                {"id": request_id},
            )
        )

    def update_incident(
        self,
        request_id: str,
        change: incidents.Change,
        *,
        now: datetime,
        node: str,
        actor: str,
        roles: list[str],
        client_ip: str,
    ) -> dict[str, Any]:
        """Append the events of an update; IncidentError when it is not allowed, LookupError
        when there is no such incident."""
        current = self.incident(request_id)
        if current is None:
            raise LookupError(f"no incident {request_id}")
        change.check(current)
        rows = incidents.event_rows(
            request_id, change, now=now, node=node, actor=actor, roles=roles, client_ip=client_ip
        )
        self.store.insert_incident_events(rows, rows[0][2])
        updated = self.incident(request_id)
        assert updated is not None
        return updated

    # --- the console's event log ---

    def console_events(self, f: EventFilter) -> list[dict[str, Any]]:
        """Console events newest first, ``f.limit`` after the cursor ``f.after``; each with
        ``key``, the hash the cursor continues from."""
        where = ["1"]
        params: dict[str, Any] = {"limit": f.limit}
        for name, condition in (
            ("since", "ts >= {since:DateTime64(3, 'UTC')}"),
            ("until", "ts < {until:DateTime64(3, 'UTC')}"),
            ("actor", "actor = {actor:String}"),
            ("action", "action = {action:String}"),
            ("outcome", "outcome = {outcome:String}"),
            ("contains", "positionCaseInsensitiveUTF8(concat(detail, ' ', client_ip), "
             "{contains:String}) > 0"),
        ):  # fmt: skip
            value = getattr(f, name)
            if value is not None:
                where.append(condition)
                params[name] = value
        if f.after is not None:
            where.append("ts <= {after_ts:DateTime64(3, 'UTC')}")
            where.append("(ts < {after_ts:DateTime64(3, 'UTC')} OR key < {after_key:UInt64})")
            params["after_ts"], params["after_key"] = f.after
        cols = ", ".join(f"`{c}`" for c in CONSOLE_EVENT_NAMES)
        sql = (
            f"SELECT {cols}, cityHash64(node, actor, via, client_ip, action, outcome, detail) "
            f"AS key FROM console_events WHERE {' AND '.join(where)} "
            "ORDER BY ts DESC, key DESC LIMIT {limit:UInt32}"
        )
        return _rows((*CONSOLE_EVENT_NAMES, "key"), self._q(sql, params, f.limit))

    # --- retention ---

    def retention(self, now: datetime) -> dict[str, Any]:
        """Per retained table: its TTL, oldest and newest row, rows and bytes per month (from
        ``system.parts``), and whether each of the last six months is present."""
        months = _last_months(now.astimezone(UTC).date(), 6)
        tables = []
        for table in self.store.RETAINED_TABLES:
            # table is a constant of the store (RETAINED_TABLES), never request text.
            parts = self._q(
                "SELECT partition, sum(rows), sum(bytes_on_disk), sum(data_uncompressed_bytes) "
                "FROM system.parts WHERE database = currentDatabase() AND table = {t:String} "
                "AND active GROUP BY partition ORDER BY partition",
                {"t": table},
            )
            ttl = self._q(
                "SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
                "AND name = {t:String}",
                {"t": table},
            )
            if not ttl:
                continue
            bounds = self._q(f"SELECT count(), min(ts), max(ts) FROM {table}")
            count, oldest, newest = bounds[0]
            by_month = {
                str(p): {"month": str(p), "rows": int(r), "bytes": int(b), "raw_bytes": int(u)}
                for p, r, b, u in parts
            }
            first = min((m for m, v in by_month.items() if v["rows"]), default=None)
            present = [
                {
                    "month": m,
                    "present": by_month.get(m, {}).get("rows", 0) > 0,
                    # A month before the first row was never written: not a gap.
                    "before_start": first is None or m < first,
                }
                for m in months
            ]
            gaps = [p["month"] for p in present if not p["present"] and not p["before_start"]]
            ttl_text = ttl[0][0]
            tables.append(
                {
                    "table": table,
                    "ttl_months": self.store.retention_months(table),
                    "ttl": ttl_text[ttl_text.find("TTL ") :].split(" SETTINGS")[0]
                    if "TTL " in ttl_text
                    else "",
                    "rows": int(count),
                    "oldest": oldest if count else None,
                    "newest": newest if count else None,
                    "months": list(by_month.values()),
                    "last_six_months": present,
                    "gaps": gaps,
                    "all_six_present": all(p["present"] for p in present),
                }
            )
        return {"now": now, "months": months, "tables": tables}


def _last_months(today: date, n: int) -> list[str]:
    """The last ``n`` months as partition ids (``YYYYMM``), this month last."""
    y, m = today.year, today.month
    out = []
    for _ in range(n):
        out.append(f"{y:04d}{m:02d}")
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    return out[::-1]
