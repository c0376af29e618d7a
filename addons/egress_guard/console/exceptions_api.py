"""The approvers' JSON API under ``/api/v1/exceptions`` (what ``egress-guard exceptions``
calls): list, show with the whole history, grant, approve (optionally narrowed), deny,
revoke, and the blocked request a pending exception came from; and the OpenAPI document
that describes them (``exceptions_openapi``).

Approvers decide; approvers and auditors read; nobody else (``admin`` is not an approver).
Every change and every refusal is noted in ``console_events``; the exception's own events are
the primary record. A refusal is a 4xx ``{"error": why, "code": …}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import tornado.web

from egress_guard.core.units import parse_time

from . import exception_ops as ops
from .api import ApiHandler
from .auth import ALL_ROLES
from .exceptions_openapi import document

READ: Mapping[str, frozenset[str]] = {"GET": frozenset({"approver", "auditor"})}
DECIDE = frozenset({"approver"})


class ExceptionsApi(ApiHandler):
    """What the exception handlers share: the workflow, JSON bodies, answers."""

    def workflow(self) -> ops.Workflow:
        if self.ctx.exceptions is None:
            raise tornado.web.HTTPError(503, reason="exceptions are not available on this console")
        return ops.Workflow(self.ctx)

    def body_fields(self, known: tuple[str, ...]) -> ops.Fields:
        raw = self.request.body or b"{}"
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise tornado.web.HTTPError(400, reason="the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, reason="the body must be a JSON object")
        try:
            return ops.Fields(body, form=False, known=known)
        except ops.BadInput as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None

    def actor(self) -> Any:
        assert self.principal is not None
        p = self.principal
        return self.workflow().actor(p.name, p.roles, self.address)

    async def bad_input(self, action: str, exception_id: str, e: ops.BadInput) -> None:
        outcome = ops.refused(action, exception_id, "bad_input", str(e))
        await self.answer(outcome)

    async def answer(self, outcome: ops.Outcome) -> None:
        """Note the call in ``console_events`` (after the change: the change is on disk
        already, and a store that is down must not stop an urgent revocation), send the
        notice, and answer."""
        ok = outcome.refusal is None
        await self.record_quietly(
            f"exception_{outcome.action}", "ok" if ok else "denied", outcome.detail()
        )
        if not ok:
            assert outcome.refusal is not None
            self.send_json(
                {"error": outcome.refusal.reason, "code": outcome.refusal.code}, outcome.status
            )
            return
        ops.send_notice(self.ctx.notify, outcome)
        assert outcome.state is not None and outcome.event is not None
        wf = self.workflow()
        events = await self.in_thread(wf.events_of, outcome.exception_id)
        self.send_json(
            {
                "exception": ops.state_json(outcome.state, events),
                "event": ops.event_json(outcome.event, True),
            },
            outcome.status,
        )


def list_args(arg: Any, now: Any) -> dict[str, Any]:
    """The list's filters from query arguments; ValueError names the bad one."""
    state = arg("state") or "all"
    if state not in ops.STATE_FILTERS:
        raise ValueError(f"state must be one of {', '.join(ops.STATE_FILTERS)}")
    control = arg("control")
    if control is not None and control != "marker":
        from egress_guard.core.exceptions import Control

        try:
            control = str(Control.parse(control))
        except ValueError as e:
            raise ValueError(f"control: {e}") from None
    since_text = arg("since")
    since_ms = ops.ms_of(parse_time(since_text, now)) if since_text else None
    try:
        limit = int(arg("limit") or 100)
    except ValueError:
        raise ValueError("limit must be a number") from None
    if not 1 <= limit <= ops.MAX_LIST:
        raise ValueError(f"limit must be between 1 and {ops.MAX_LIST}")
    return {
        "state": state,
        "user": arg("user"),
        "subject": arg("subject"),
        "control": control,
        "since_ms": since_ms,
        "limit": limit,
    }


class ExceptionsCollection(ExceptionsApi):
    """GET: the exceptions (filters: state, user, subject, control, since, limit). POST: a
    direct grant."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = READ | {"POST": DECIDE}

    async def get(self) -> None:
        try:
            a = list_args(self.arg, self.ctx.now())
        except (ValueError, OverflowError) as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None
        wf = self.workflow()
        states, partial = await self.in_thread(wf.states, a["since_ms"])
        found = [
            s for s in states if ops.matches(s, a["state"], a["user"], a["subject"], a["control"])
        ]
        shown = ops.ordered(found, a["state"])[: a["limit"]]
        self.send_json(
            {
                "exceptions": [ops.state_json(s) for s in shown],
                "count": len(shown),
                "partial": partial,  # the store's older history could not be read
            }
        )

    async def post(self) -> None:
        f = self.body_fields(ops.GRANT_FIELDS)
        wf = self.workflow()
        try:
            terms = ops.grant_terms(f, self.ctx.wall_ms())
            reason = f.text("reason") or ""
        except ops.BadInput as e:
            await self.bad_input("grant", "", e)
            return
        outcome = await self.in_thread(wf.grant, self.actor(), terms, reason)
        await self.answer(outcome)


class ExceptionItem(ExceptionsApi):
    """One exception as it stands, with every event of its history."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = READ

    async def get(self, exception_id: str) -> None:
        wf = self.workflow()
        events = await self.in_thread(wf.events_of, exception_id)
        from egress_guard.core.exceptions import state_of

        state = state_of(events, self.ctx.wall_ms()).get(exception_id) if events else None
        if state is None:
            raise tornado.web.HTTPError(404, reason="there is no such exception")
        self.send_json(ops.state_json(state, events))


class ExceptionDecision(ExceptionsApi):
    """POST a decision on one exception; ``ACTION`` says which."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"POST": DECIDE}
    ACTION: ClassVar[str] = ""

    async def post(self, exception_id: str) -> None:
        known = ops.APPROVE_FIELDS if self.ACTION == "approve" else ops.REASON_FIELDS
        f = self.body_fields(known)
        wf = self.workflow()
        try:
            outcome = await self.in_thread(wf.decide, self.ACTION, self.actor(), exception_id, f)
        except ops.BadInput as e:
            await self.bad_input(self.ACTION, exception_id, e)
            return
        await self.answer(outcome)


class ApproveApi(ExceptionDecision):
    """Approve a pending exception, as asked or narrowed: a shorter ``duration``, fewer bytes,
    a host (within the category or rule asked for), a path prefix, a smaller network."""

    ACTION = "approve"


class DenyApi(ExceptionDecision):
    ACTION = "deny"


class RevokeApi(ExceptionDecision):
    ACTION = "revoke"


class BlockedRequestApi(ExceptionsApi):
    """The rows of the blocked request a pending exception came from (and of its client
    connection, bounded): what an approver needs to decide, without the auditor role."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = READ

    async def get(self, exception_id: str) -> None:
        wf = self.workflow()
        state = await self.in_thread(wf.current, exception_id)
        if state is None:
            raise tornado.web.HTTPError(404, reason="there is no such exception")
        if not state.request_id:
            raise tornado.web.HTTPError(404, reason="a direct grant comes from no blocked request")
        detail = json.dumps({"exception_id": exception_id, "request_id": state.request_id})
        found = await self.audited_query(
            "query_exception_request", detail, lambda: ops.blocked_request(self.ctx.store, state)
        )
        self.send_json({"exception_id": exception_id} | found)


class OpenApi(ApiHandler):
    """The OpenAPI 3 document of the exceptions API."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": ALL_ROLES}

    def get(self) -> None:
        self.send_json(document())
