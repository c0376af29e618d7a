"""The auditor's JSON API (what ``egress-guard audit timeline | report | incidents |
retention`` call): one request with its connection, a timeline, the reports, the incident
queue, one incident and its update, the retention proof. Every read is recorded before it
runs, as on the pages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import tornado.web

from egress_guard.requestlog import incidents

from .api import ApiHandler
from .filters import encode_cursor, json_default
from .incidents import auditor_names, change_of, queue_args, update
from .investigate import AUDITOR, timeline_args, timeline_detail
from .records import ADMIN_AUDITOR
from .reports import report_detail


class AuditApi(ApiHandler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = AUDITOR

    def parsed(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ValueError as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None

    def required(self, name: str) -> str:
        value = self.arg(name)
        if value is None or not value.strip():
            raise tornado.web.HTTPError(400, reason=f"{name} is required")
        return value.strip()


class RequestApi(AuditApi):
    """``?id=``: the row (every column) and its connection's rows, each with why it exists."""

    async def get(self) -> None:
        request_id = self.required("id")
        found = await self.audited_query(
            "query_request",
            json.dumps({"request_id": request_id}),
            lambda: self.ctx.audit.connection(request_id),
        )
        if found is None:
            raise tornado.web.HTTPError(404, reason="no such request")
        self.send_json(found)


class TimelineApi(AuditApi):
    async def get(self) -> None:
        a = self.parsed(timeline_args, self.arg, self.ctx.now())
        found = await self.audited_query(
            "query_timeline",
            timeline_detail(a),
            lambda: self.ctx.audit.timeline(
                a["subject"], a["since"], a["until"], everything=a["everything"], after=a["after"]
            ),
        )
        nxt = found["next"]
        self.send_json(found | {"next": encode_cursor(*nxt) if nxt else None})


class ReportApi(AuditApi):
    async def get(self) -> None:
        now = self.ctx.now()

        def window() -> tuple[Any, Any]:
            from egress_guard.core.units import parse_time

            from .investigate import DEFAULT_SPAN

            since, until = self.arg("since"), self.arg("until")
            start = parse_time(since, now) if since else now - DEFAULT_SPAN
            end = parse_time(until, now) if until else now
            if end <= start:
                raise ValueError("until must be after since")
            return start, end

        since, until = self.parsed(window)
        report = await self.audited_query(
            "query_report", report_detail(since, until), lambda: self.ctx.audit.report(since, until)
        )
        self.send_json(report)


class IncidentsApi(AuditApi):
    async def get(self) -> None:
        a = self.parsed(queue_args, self.arg, self.ctx.now())
        rows = await self.audited_query(
            "query_incidents",
            json.dumps(
                {k: v for k, v in a.items() if v is not None}, default=json_default, sort_keys=True
            ),
            lambda: self.ctx.audit.incidents(**a),
        )
        self.send_json({"rows": rows, "count": len(rows)})


class IncidentApi(AuditApi):
    """GET ``?id=``: one incident with its history. POST a JSON object ``{"id": …, "status":
    …, "assignee": …, "classification": …, "comment": …}`` (fields left out stay as they are;
    ``"assignee": "-"`` unassigns) to append an update."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {
        "GET": frozenset({"auditor"}),
        "POST": frozenset({"auditor"}),
    }

    async def _found(self, request_id: str) -> Any:
        found = await self.audited_query(
            "query_incident",
            json.dumps({"request_id": request_id}),
            lambda: self.ctx.audit.incident(request_id),
        )
        if found is None:
            raise tornado.web.HTTPError(404, reason="no such incident")
        return found

    async def get(self) -> None:
        self.send_json(await self._found(self.required("id")))

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, reason="the body must be a JSON object") from None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
            raise tornado.web.HTTPError(400, reason="the body must be a JSON object with an id")
        fields = {k: body.get(k) for k in ("status", "assignee", "classification", "comment")}
        if any(v is not None and not isinstance(v, str) for v in fields.values()):
            raise tornado.web.HTTPError(400, reason="each field of an update is text")
        try:
            change = change_of(fields.get, auditor_names(self))
        except incidents.IncidentError as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None
        error = await update(self, body["id"], change)
        if error:
            raise tornado.web.HTTPError(404 if error == "no such incident" else 400, reason=error)
        self.send_json(await self._found(body["id"]))


class RetentionApi(AuditApi):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = ADMIN_AUDITOR

    async def get(self) -> None:
        now = self.ctx.now()
        found = await self.audited_query(
            "query_retention", "{}", lambda: self.ctx.audit.retention(now)
        )
        self.send_json(found)
