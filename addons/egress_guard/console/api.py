"""The admin API under ``/api/v1/``: JSON in and out (the export: CSV), bearer tokens or a
console session."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import tornado.web

from egress_guard.core.units import parse_time
from egress_guard.requestlog import evidence
from egress_guard.requestlog.store import MAX_QUERY_ROWS, RequestFilter

from .auth import ALL_ROLES, BaseHandler
from .filters import filter_detail, json_default, next_cursor, request_filter


class ApiHandler(BaseHandler):
    def arg(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return value if value not in (None, "") else None

    def request_filter(self) -> RequestFilter:
        try:
            return request_filter(self.arg, self.ctx.now())
        except ValueError as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(payload, default=json_default, ensure_ascii=False))


class Requests(ApiHandler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"auditor"})}

    async def get(self) -> None:
        flt = self.request_filter()
        rows = await self.audited_query(
            "query_requests", filter_detail(flt), lambda: self.ctx.store.query_requests(flt)
        )
        # next: the cursor of the following page (pass it as after=), null on the last page.
        self.send_json({"rows": rows, "count": len(rows), "next": next_cursor(rows, flt.limit)})


class Export(ApiHandler):
    """The request log as evidence: canonical CSV, its SHA-256 in a header and in the
    console's event log (with the filters and the row count) before a byte is sent."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"auditor"})}

    async def get(self) -> None:
        flt = self.request_filter()
        try:
            rows = await self.in_thread(self.ctx.store.query_requests, flt)
        except Exception as e:
            raise tornado.web.HTTPError(503, reason=f"store unavailable: {e}") from None
        body = evidence.to_csv(rows)
        sha256 = evidence.digest(body)
        detail = json.loads(filter_detail(flt)) | {"rows": len(rows), "sha256": sha256}
        try:
            await self.record("export_requests", "ok", json.dumps(detail, sort_keys=True))
        except Exception as e:  # an export nobody could verify later is not handed out
            raise tornado.web.HTTPError(503, reason=f"store unavailable: {e}") from None
        stamp = self.ctx.now().strftime("%Y%m%dT%H%M%SZ")
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="egress-{stamp}.csv"')
        self.set_header("X-Egress-Guard-SHA256", sha256)
        self.set_header("X-Egress-Guard-Rows", str(len(rows)))
        self.finish(body)


class ConsoleEvents(ApiHandler):
    # The admin and the auditors both answer for how the console is used.
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"admin", "auditor"})}

    async def get(self) -> None:
        try:
            since_text, limit = self.arg("since"), int(self.arg("limit") or 100)
            since = parse_time(since_text, self.ctx.now()) if since_text else None
            if not 1 <= limit <= MAX_QUERY_ROWS:
                raise ValueError(f"limit must be between 1 and {MAX_QUERY_ROWS}")
        except ValueError as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None
        actor, contains = self.arg("actor"), self.arg("contains")
        detail = json.dumps(
            {"since": since_text, "actor": actor, "contains": contains, "limit": limit}
        )
        rows = await self.audited_query(
            "query_console_events",
            detail,
            lambda: self.ctx.store.query_console_events(since, actor, limit, contains),
        )
        self.send_json({"rows": rows, "count": len(rows)})


class Status(ApiHandler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"admin"})}

    def get(self) -> None:
        self.send_json(self.ctx.status())


class WhoAmI(ApiHandler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": ALL_ROLES}

    def get(self) -> None:
        assert self.principal is not None
        p = self.principal
        self.send_json({"name": p.name, "roles": sorted(p.roles), "via": p.via})
