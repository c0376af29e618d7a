"""DLP incident triage pages: the queue (open incidents first, by severity, then the oldest),
and one incident with its request, its history and the form that appends to it. An update is
recorded in ``console_events`` and appended to ``incident_events``; nothing is ever changed
in place. The pages show marker ids and levels, never matched text (the rows hold none)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar

import tornado.web

from egress_guard.requestlog import incidents
from egress_guard.requestlog.store import READ_COLUMN_NAMES

from .accounts import AccountError
from .auth import BaseHandler
from .filters import json_default, parse_limit
from .investigate import AuditorPage, links_of

# The queue looks back over the whole retention period by default (six months and a bit).
QUEUE_SPAN = timedelta(days=186)


def queue_args(arg: Any, now: Any) -> dict[str, Any]:
    from egress_guard.core.units import parse_time

    status = arg("status")
    if status is not None and status not in incidents.STATUSES:
        raise ValueError(f"status must be one of {', '.join(incidents.STATUSES)}")
    since_text, until_text = arg("since"), arg("until")
    return {
        "since": parse_time(since_text, now) if since_text else now - QUEUE_SPAN,
        "until": parse_time(until_text, now) if until_text else now + timedelta(minutes=1),
        "status": status,
        "assignee": arg("assignee"),
        "user": arg("user"),
        "limit": parse_limit(arg("limit"), 500, 10_000),
    }


def auditor_names(handler: BaseHandler) -> list[str]:
    """Who an incident can be assigned to: the accounts with the auditor role."""
    try:
        return sorted(a.name for a in handler.ctx.accounts.all() if "auditor" in a.roles)
    except AccountError:
        return []


def change_of(get: Any, auditors: list[str]) -> incidents.Change:
    """The update a form or JSON body asks for; IncidentError when a value is not allowed.
    ``get(name)`` is None for a field not given; "" for the status, classification and
    assignee fields of the form means "leave it" except ``assignee="-"`` (nobody)."""

    def opt(name: str) -> str | None:
        value = get(name)
        return value.strip() if value is not None and value.strip() else None

    assignee = opt("assignee")
    if assignee == "-":
        assignee = ""
    elif assignee is not None and assignee not in auditors:
        raise incidents.IncidentError(f"{assignee} is not an auditor")
    return incidents.Change(
        status=opt("status"),
        assignee=assignee,
        classification=opt("classification"),
        comment=get("comment") if get("comment") and get("comment").strip() else None,
    )


class IncidentQueue(AuditorPage):
    async def get(self) -> None:
        form = {n: self.arg(n) for n in ("status", "since", "until", "assignee", "user")}
        try:
            a = queue_args(self.arg, self.ctx.now())
        except ValueError as e:
            self.page("incidents.html", "事件 Incidents", 400, form=form, rows=None, error=str(e))
            return
        rows = await self.audited_query(
            "query_incidents",
            json.dumps(
                {k: v for k, v in a.items() if v is not None}, default=json_default, sort_keys=True
            ),
            lambda: self.ctx.audit.incidents(**a),
        )
        self.page(
            "incidents.html",
            "事件 Incidents",
            form=form,
            rows=rows,
            error="",
            now=self.ctx.now(),
            statuses=incidents.STATUSES,
            auditors=auditor_names(self),
        )


class Incident(AuditorPage):
    """One incident; POST appends an update (status, assignee, classification, comment)."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {
        "GET": frozenset({"auditor"}),
        "POST": frozenset({"auditor"}),
    }

    async def _show(self, request_id: str | None, status: int = 200, error: str = "") -> None:
        if request_id is None:
            self.redirect("/incidents", status=303)
            return
        found = await self.audited_query(
            "query_incident",
            json.dumps({"request_id": request_id}),
            lambda: self.ctx.audit.incident(request_id),
        )
        if found is None:
            status = 404
        self.page(
            "incident.html",
            "事件 Incident",
            status,
            asked=request_id,
            found=found,
            error=error,
            columns=READ_COLUMN_NAMES,
            links=links_of(found["row"], self.url) if found else {},
            statuses=incidents.STATUSES,
            classifications=incidents.CLASSIFICATIONS,
            auditors=auditor_names(self),
        )

    async def get(self) -> None:
        await self._show(self.arg("id"))

    async def post(self) -> None:
        request_id = self.get_body_argument("id", "").strip()
        if not request_id:
            raise tornado.web.HTTPError(400, reason="which incident: id is missing")
        try:
            change = change_of(lambda n: self.get_body_argument(n, None), auditor_names(self))
        except incidents.IncidentError as e:
            await self._show(request_id, 400, str(e))
            return
        error = await update(self, request_id, change)
        if error:
            await self._show(request_id, 400 if error != "no such incident" else 404, error)
            return
        self.redirect(self.url("/incident", id=request_id), status=303)


async def update(handler: BaseHandler, request_id: str, change: incidents.Change) -> str:
    """Record the update in ``console_events``, then append it; "" when done, else why not."""
    p = handler.principal
    assert p is not None
    detail = json.dumps(
        {"request_id": request_id, **{k: v for k, v in vars(change).items() if v is not None}},
        ensure_ascii=False,
        sort_keys=True,
    )

    def run() -> str:
        try:
            handler.ctx.audit.update_incident(
                request_id,
                change,
                now=handler.ctx.now(),
                node=handler.ctx.node,
                actor=p.name,
                roles=sorted(p.roles),
                client_ip=handler.address,
            )
        except LookupError:
            return "no such incident"
        except incidents.IncidentError as e:
            return str(e)
        return ""

    error = await handler.audited_query("update_incident", detail, run)
    if error:  # the attempt is on record as made; this says it was refused, and why
        await handler.record_quietly("update_incident", "refused", f"{detail} {error}")
    return error
