"""The auditor's investigation pages: the request log (every filter, keyset pages, one
connection's rows shown together), one request in full with its connection, and one person's
timeline. Every read is recorded in ``console_events`` before it runs."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import tornado.web

from egress_guard.core.units import parse_time
from egress_guard.requestlog.investigation import APPROXIMATE_SPAN, connection_of, explain
from egress_guard.requestlog.store import READ_COLUMN_NAMES

from . import display, svg
from .auth import BaseHandler
from .filters import (
    ALL_ARGS,
    CHOICE_ARGS,
    TEXT_ARGS,
    decode_cursor,
    encode_cursor,
    filter_detail,
    json_default,
    next_cursor,
    request_filter,
)

AUDITOR: Mapping[str, frozenset[str]] = {"GET": frozenset({"auditor"})}
DEFAULT_SPAN = timedelta(days=7)


class AuditorPage(BaseHandler):
    """A page for auditors: query arguments, a time range, links that keep the filters."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = AUDITOR

    def arg(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return value.strip() if value and value.strip() else None

    def time_range(self, default: timedelta = DEFAULT_SPAN) -> tuple[datetime, datetime]:
        now = self.ctx.now()
        since, until = self.arg("since"), self.arg("until")
        start = parse_time(since, now) if since else now - default
        end = parse_time(until, now) if until else now
        if end <= start:
            raise ValueError("until must be after since")
        return start, end

    def url(self, path: str, **args: Any) -> str:
        kept = {k: v for k, v in args.items() if v not in (None, "")}
        return f"{path}?{urllib.parse.urlencode(kept)}" if kept else path

    def page(self, template: str, title: str, status: int = 200, **values: Any) -> None:
        self.send_page(
            template, title, status, show=display, zone=display.zone_label(), url=self.url, **values
        )


# --- the request log ----------------------------------------------------------------------


@dataclass
class Group:
    """Rows of one client connection on a page (a CONNECT, the requests in its tunnel, the
    tunnel row), or a single row; ``approximate`` when matched without a connection id."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    key: str = ""
    approximate: bool = False

    @property
    def head(self) -> dict[str, Any]:
        for kind in ("connect", "tunnel"):
            for r in self.rows:
                if r["kind"] == kind:
                    return r
        return self.rows[0]

    @property
    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        kinds = ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items())
        blocked = any(r["decision"] == "block" for r in self.rows)
        return f"{len(self.rows)} rows on this page ({kinds})" + (" · blocked" if blocked else "")


def group_rows(rows: list[dict[str, Any]]) -> list[Group]:
    """The page's rows with each connection's rows together, in time order, where its newest
    row would be. Rows with a connection id are grouped by it. Rows without (written before
    the runtime recorded it) are grouped under a CONNECT on the page from the same client to
    the same host and port, when they follow it within ``APPROXIMATE_SPAN`` and before the
    next such CONNECT."""
    keys: list[str] = []
    approximate_connects: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not connection_of(r) and r["kind"] == "connect":
            where = f"{r['client_ip']}|{r['host']}|{r['port']}"
            approximate_connects.setdefault(where, []).append(r)
    for i, r in enumerate(rows):
        cid = connection_of(r)
        if cid:
            keys.append(f"c:{cid}")
            continue
        where = f"{r['client_ip']}|{r['host']}|{r['port']}"
        connects = approximate_connects.get(where, [])
        owner = None
        if r["kind"] in ("connect", "tunnel") or r["scheme"] == "https":
            for c in connects:  # newest first, as the page is
                if c["ts"] <= r["ts"] <= c["ts"] + APPROXIMATE_SPAN:
                    owner = c
                    break
        keys.append(f"a:{owner['request_id']}" if owner else f"r:{i}")
    groups: dict[str, Group] = {}
    order: list[Group] = []
    for r, key in zip(rows, keys, strict=True):
        if key not in groups:
            groups[key] = Group(key=key, approximate=key.startswith("a:"))
            order.append(groups[key])
        groups[key].rows.append(r)
    for g in order:
        g.rows.sort(key=lambda r: (r["ts"], r["kind"] != "connect", r["request_id"]))
    return order


class RequestLog(AuditorPage):
    async def get(self) -> None:
        form = {name: self.arg(name) for name in ALL_ARGS}
        values: dict[str, Any] = {"form": form, "rows": None, "error": "", "text_args": TEXT_ARGS}
        values["choice_args"] = CHOICE_ARGS
        if not self.request.query:  # the empty form: nothing is read, nothing recorded
            self.page("requests.html", "请求日志 Request log", **values)
            return
        try:
            flt = request_filter(self.arg, self.ctx.now())
        except ValueError as e:
            self.page("requests.html", "请求日志 Request log", 400, **(values | {"error": str(e)}))
            return
        rows = await self.audited_query(
            "query_requests", filter_detail(flt), lambda: self.ctx.store.query_requests(flt)
        )
        cursor = next_cursor(rows, flt.limit)
        kept = {k: v for k, v in form.items() if k != "after"}
        values |= {
            "rows": rows,
            "groups": group_rows(rows),
            "columns": display.LOG_COLUMNS,
            "explain": explain,
            "next_url": self.url("/requests", **kept, after=cursor) if cursor else None,
            "first_url": self.url("/requests", **kept) if flt.after else None,
            "export_url": self.url("/api/v1/export", **kept),
        }
        self.page("requests.html", "请求日志 Request log", **values)


# --- one request ----------------------------------------------------------------------------


class RequestDetail(AuditorPage):
    """One row with every column, its connection, and links onward."""

    async def get(self) -> None:
        request_id = self.arg("id")
        if request_id is None:
            self.page("request.html", "请求 Request", found=None, asked=None)
            return
        found = await self.audited_query(
            "query_request",
            json.dumps({"request_id": request_id}),
            lambda: self.ctx.audit.connection(request_id),
        )
        if found is None:
            self.set_status(404, "no such request")
        row = found["row"] if found else None
        links = links_of(row, self.url) if row else {}
        self.page(
            "request.html",
            "请求 Request",
            found=found,
            asked=request_id,
            row=row,
            columns=READ_COLUMN_NAMES,
            links=links,
            explain=explain,
        )


def links_of(row: dict[str, Any], url: Any) -> dict[str, str]:
    """Where to go from a row: the user's timeline around it, the rule's and the
    exception's other requests, its incident."""
    from egress_guard.requestlog import evidence

    ts = evidence.as_utc(row["ts"])
    around = {
        "since": evidence.utc_iso(ts - timedelta(days=1)),
        "until": evidence.utc_iso(ts + timedelta(days=1)),
    }
    links = {}
    if row["user"]:
        links["timeline"] = url("/timeline", user=row["user"], **around)
    elif row["client_ip"]:
        links["timeline"] = url("/timeline", user=f"ip:{row['client_ip']}", **around)
    if row["rule_id"]:
        links["rule"] = url("/requests", rule=row["rule_id"], **around)
    if row["exception_id"]:
        links["exception"] = url("/requests", exception=row["exception_id"], since="186d")
    marked = row["reason_kind"] == "marker" and row["decision"] in ("block", "alert")
    if marked or (row["decision"] == "block" and str(row["error"]).startswith("unscannable")):
        links["incident"] = url("/incident", id=row["request_id"])
    return links


# --- one person's timeline ------------------------------------------------------------------


def timeline_args(arg: Any, now: datetime) -> dict[str, Any]:
    """subject, since, until, everything, after from query arguments; ValueError names the
    bad one."""
    subject = arg("user")
    if subject is None:
        raise ValueError("user is required (a user name, or ip:ADDRESS)")
    since_text, until_text = arg("since"), arg("until")
    since = parse_time(since_text, now) if since_text else now - DEFAULT_SPAN
    until = parse_time(until_text, now) if until_text else now
    if until <= since:
        raise ValueError("until must be after since")
    if until - since > timedelta(days=366):
        raise ValueError("a timeline covers at most a year")
    after = arg("after")
    return {
        "subject": subject,
        "since": since,
        "until": until,
        "everything": arg("all") in ("1", "true", "on"),
        "after": decode_cursor(after) if after else None,
    }


def timeline_detail(a: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in a.items() if v is not None}, default=json_default, sort_keys=True
    )


class Timeline(AuditorPage):
    async def get(self) -> None:
        form = {n: self.arg(n) for n in ("user", "since", "until", "all")}
        if self.arg("user") is None:
            self.page("timeline.html", "时间线 Timeline", form=form, found=None, error="")
            return
        try:
            a = timeline_args(self.arg, self.ctx.now())
        except ValueError as e:
            self.page("timeline.html", "时间线 Timeline", 400, form=form, found=None, error=str(e))
            return
        found = await self.audited_query(
            "query_timeline",
            timeline_detail(a),
            lambda: self.ctx.audit.timeline(
                a["subject"], a["since"], a["until"], everything=a["everything"], after=a["after"]
            ),
        )
        nxt = found["next"]
        self.page(
            "timeline.html",
            f"时间线 Timeline · {a['subject']}",
            form=form,
            found=found,
            error="",
            explain=explain,
            next_url=self.url("/timeline", **form, after=encode_cursor(*nxt)) if nxt else None,
            export_url=self.url(
                "/api/v1/export",
                **(
                    {"client": a["subject"][3:]}
                    if a["subject"].startswith("ip:")
                    else {"user": a["subject"]}
                ),
                since=display.utc_time(a["since"]),
                until=display.utc_time(a["until"]),
                limit="100000",
            ),
            biggest=max([d["upload_bytes"] for d in found["days"]] or [0]),
            svg_bar=svg.sparkbar,
        )


def bad_request(e: ValueError) -> tornado.web.HTTPError:
    return tornado.web.HTTPError(400, reason=str(e))
