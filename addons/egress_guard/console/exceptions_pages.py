"""The approvers' console pages: the queue of pending requests (the oldest first, each with the
blocked request it came from), one exception with its blocked request, its whole history and
the approve / deny / revoke forms, the direct grant form, the active exceptions with revoke,
and the history with filters. Server-rendered from ``templates/exceptions_*.html``, every form
with its XSRF token, no script. Auditors may read these pages; only approvers see and post
the forms. The work is ``exception_ops``'s, as for the API.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import tornado.web

from egress_guard.core import exceptions as ex

from . import display
from . import exception_ops as ops
from .auth import BaseHandler
from .exceptions_api import list_args

READ: Mapping[str, frozenset[str]] = {"GET": frozenset({"approver", "auditor"})}
DECIDE: Mapping[str, frozenset[str]] = {"POST": frozenset({"approver"})}
QUEUE_ROWS = 50  # pending requests whose blocked request the queue looks up (one query each)
DONE = {
    "granted": "例外已授予 Exception granted.",
    "approved": "已批准 Approved.",
    "denied": "已拒绝 Denied: the requester is told why.",
    "revoked": "已撤销 Revoked: it no longer lets anything through.",
}
DURATIONS = ("1h", "8h", "1d", "3d", "7d", "14d", "30d")


def when(ms: int) -> str:
    """A time in the gateway's zone, to the second."""
    if not ms:
        return ""
    return display.local_time(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms), False)


def utc(ms: int) -> str:
    return ops.iso(ms) or ""


class ExceptionPage(BaseHandler):
    """A page of the exception workflow."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = READ

    def arg(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return value.strip() if value and value.strip() else None

    def workflow(self) -> ops.Workflow:
        if self.ctx.exceptions is None:
            raise tornado.web.HTTPError(503, reason="exceptions are not available on this console")
        return ops.Workflow(self.ctx)

    @property
    def approver(self) -> bool:
        return self.principal is not None and ex.APPROVER_ROLE in self.principal.roles

    def actor(self) -> ex.Actor:
        assert self.principal is not None
        p = self.principal
        return self.workflow().actor(p.name, p.roles, self.address)

    def page(self, template: str, title: str, status: int = 200, **values: Any) -> None:
        self.send_page(
            template,
            title,
            status,
            show=display,
            zone=display.zone_label(),
            when=when,
            utc=utc,
            span=ex.span,
            grant_text=ops.grant_text,
            approver=self.approver,
            quote=lambda v: urllib.parse.quote(v, safe=""),
            now_ms=self.ctx.wall_ms(),
            **values,
        )

    def form_fields(self, names: tuple[str, ...]) -> ops.Fields:
        data = {n: self.get_body_argument(n, None) for n in names}
        return ops.Fields({k: v for k, v in data.items() if v is not None}, form=True, known=names)

    async def blocked(self, states: list[ex.ExceptionState]) -> tuple[dict[str, Any], str]:
        """The blocked request of each state that came from one (id → row), read after the
        read is recorded; a store that is away leaves the rows out and says so."""
        asked = [s for s in states if s.request_id][:QUEUE_ROWS]
        if not asked:
            return {}, ""
        detail = json.dumps({"exception_requests": [s.request_id for s in asked]})

        def run() -> dict[str, Any]:
            out = {}
            for s in asked:
                flt = ops.blocked_filters(s)
                found = self.ctx.store.query_requests(flt) if flt else []
                out[s.id] = found[0] if found else None
            return out

        try:
            return await self.audited_query("query_exception_requests", detail, run), ""
        except tornado.web.HTTPError as e:
            return {}, f"请求日志不可用 The request log is unavailable now ({e.reason})."

    async def note(self, outcome: ops.Outcome) -> None:
        ok = outcome.refusal is None
        await self.record_quietly(
            f"exception_{outcome.action}", "ok" if ok else "denied", outcome.detail()
        )
        if ok:
            ops.send_notice(self.ctx.notify, outcome)


class ExceptionQueue(ExceptionPage):
    """The pending requests, the oldest first."""

    async def get(self) -> None:
        wf = self.workflow()
        states = await self.in_thread(wf.states, None)
        pending = ops.ordered([s for s in states[0] if s.state == "pending"], "pending")
        rows, store_note = await self.blocked(pending)
        self.page(
            "exceptions_queue.html",
            "待审批 Pending exception requests",
            pending=pending,
            rows=rows,
            store_note=store_note,
        )


class ExceptionList(ExceptionPage):
    """``/exceptions/active``: what is in force or scheduled, with revoke. ``/exceptions/
    history``: every exception, filtered."""

    ACTIVE: ClassVar[bool] = False

    async def get(self) -> None:
        form = {n: self.arg(n) for n in ("state", "user", "control", "since")}
        if self.ACTIVE:
            form["state"] = "live"
        error, shown, partial = "", [], False
        try:
            a = list_args(lambda n: form.get(n), self.ctx.now())
        except (ValueError, OverflowError) as e:
            error = str(e)
        if not error:
            wf = self.workflow()
            states, partial = await self.in_thread(wf.states, a["since_ms"])
            found = [
                s
                for s in states
                if ops.matches(s, a["state"], a["user"], a["subject"], a["control"])
                and (not self.ACTIVE or s.state in ("active", "scheduled"))
            ]
            shown = ops.ordered(found, a["state"])[: a["limit"]]
        title = "生效中 Active exceptions" if self.ACTIVE else "历史 Exception history"
        self.page(
            "exceptions_list.html",
            title,
            400 if error else 200,
            active=self.ACTIVE,
            form=form,
            states=shown,
            error=error,
            partial=partial,
            state_filters=ops.STATE_FILTERS,
        )


class ActiveList(ExceptionList):
    ACTIVE = True


class HistoryList(ExceptionList):
    ACTIVE = False


class DetailView(ExceptionPage):
    """One exception: what it lets through, the blocked request, the forms, the history."""

    async def show(
        self, exception_id: str, status: int = 200, error: str = "", **form: Any
    ) -> None:
        wf = self.workflow()
        events = await self.in_thread(wf.events_of, exception_id)
        state = ex.state_of(events, self.ctx.wall_ms()).get(exception_id) if events else None
        if state is None:
            raise tornado.web.HTTPError(404, reason="there is no such exception")
        blocked: dict[str, Any] = {"rows": [], "row": None, "truncated": False}
        store_note = ""
        if state.request_id:
            detail = json.dumps({"exception_id": exception_id, "request_id": state.request_id})
            try:
                blocked = await self.audited_query(
                    "query_exception_request",
                    detail,
                    lambda: ops.blocked_request(self.ctx.store, state),
                )
            except tornado.web.HTTPError as e:
                store_note = f"请求日志不可用 The request log is unavailable now ({e.reason})."
        applied = {e.id for e in state.events}
        history = sorted(
            events, key=lambda e: (e.kind not in ("requested", "granted"), e.ts_ms, e.id)
        )
        done = self.get_query_argument("done", "")
        self.page(
            "exceptions_detail.html",
            f"例外 Exception {exception_id}",
            status,
            s=state,
            history=history,
            applied=applied,
            blocked=blocked,
            store_note=store_note,
            error=error,
            done=DONE.get(done, ""),
            durations=DURATIONS,
            form=form,
        )


class ExceptionDetail(DetailView):
    async def get(self, exception_id: str) -> None:
        await self.show(exception_id)


class DecisionForm(DetailView):
    """POST approve, deny or revoke from the detail page (or revoke from the active list):
    done, back to the detail page (303); refused, the page again with why (4xx)."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = DECIDE
    ACTION: ClassVar[str] = ""
    DONE_WORD: ClassVar[str] = ""

    async def post(self, exception_id: str) -> None:
        known = ops.APPROVE_FIELDS if self.ACTION == "approve" else ops.REASON_FIELDS
        f = self.form_fields(known)
        wf = self.workflow()
        try:
            outcome = await self.in_thread(wf.decide, self.ACTION, self.actor(), exception_id, f)
        except ops.BadInput as e:
            outcome = ops.refused(self.ACTION, exception_id, "bad_input", str(e))
        await self.note(outcome)
        if outcome.refusal is not None:
            if outcome.refusal.code == "unknown_exception":
                raise tornado.web.HTTPError(404, reason=outcome.refusal.reason)
            await self.show(exception_id, outcome.status, outcome.refusal.reason, **f.data)
            return
        path = f"/exceptions/{urllib.parse.quote(exception_id, safe='')}"
        self.redirect(f"{path}?done={self.DONE_WORD}", status=303)


class ApproveForm(DecisionForm):
    ACTION, DONE_WORD = "approve", "approved"


class DenyForm(DecisionForm):
    ACTION, DONE_WORD = "deny", "denied"


class RevokeForm(DecisionForm):
    ACTION, DONE_WORD = "revoke", "revoked"


class GrantForm(ExceptionPage):
    """A direct grant, without a request (approver)."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {
        "GET": frozenset({"approver"}),
        "POST": frozenset({"approver"}),
    }
    FIELDS = ("subject_kind", "subject_value", "control_kind", "level", "target_kind", "target")
    FIELDS += ("path", "duration", "start", "max_bytes", "window_bytes", "lowered_to", "reason")

    def _form(self, status: int = 200, error: str = "", **values: Any) -> None:
        self.page(
            "exceptions_grant.html",
            "直接授予 Grant an exception",
            status,
            error=error,
            form=values,
            durations=DURATIONS,
        )

    def get(self) -> None:
        self._form(subject_kind=self.arg("subject_kind") or "user", duration="1d")

    def _grant_data(self, values: dict[str, str]) -> dict[str, Any]:
        """The form as the API's grant body (``exception_ops.GRANT_FIELDS``)."""
        kind = values.get("subject_kind") or "user"
        value = values.get("subject_value", "").strip()
        if kind == "client" and value and "/" not in value:
            value += "/128" if ":" in value else "/32"  # one address
        control = values.get("control_kind") or "block"
        if control == "marker":
            control = f"marker:{values.get('level', '').strip()}"
        data: dict[str, Any] = {
            "subject": f"{kind}:{value}",
            "control": control,
            "duration": values.get("duration", ""),
            "start": values.get("start", ""),
            "reason": values.get("reason", ""),
            "lowered_to": values.get("lowered_to", "")
            if control.startswith(("marker", "unscannable"))
            else "",
        }
        target, where = values.get("target_kind") or "host", values.get("target", "")
        if target in ("host", "exact_host"):
            data |= {"host": where, "path": values.get("path", "")}
            data["exact"] = "1" if target == "exact_host" else ""
        else:
            data["category" if target == "category" else "rule"] = where
        if control == "upload":
            data |= {"per_request": values.get("max_bytes", "")}
            data |= {"per_window": values.get("window_bytes", "")}
        return data

    async def post(self) -> None:
        values = {n: self.get_body_argument(n, "") for n in self.FIELDS}
        data = {k: v for k, v in self._grant_data(values).items() if v not in ("", None)}
        f = ops.Fields(data, form=True, known=ops.GRANT_FIELDS)
        wf = self.workflow()
        try:
            terms = ops.grant_terms(f, self.ctx.wall_ms())
            outcome = await self.in_thread(wf.grant, self.actor(), terms, f.text("reason") or "")
        except ops.BadInput as e:
            outcome = ops.refused("grant", "", "bad_input", str(e))
        await self.note(outcome)
        if outcome.refusal is not None:
            self._form(outcome.status, outcome.refusal.reason, **values)
            return
        path = f"/exceptions/{urllib.parse.quote(outcome.exception_id, safe='')}"
        self.redirect(f"{path}?done=granted", status=303)
