"""The console's HTML pages: login, logout, home, and the request log. Pages are rendered from
``templates/`` with tornado's autoescaping, so every value is escaped unless a template says
otherwise; no page carries a script."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import tornado.web

from egress_guard import metrics
from egress_guard.requestlog import evidence
from egress_guard.requestlog.store import SUMMARY_COLUMNS

from .accounts import AccountError, verify_password
from .auth import ALL_ROLES, BaseHandler, Principal
from .filters import filter_detail, request_filter
from .sessions import SESSION_COOKIE

log = logging.getLogger("egress_guard.console")

# The request-log form's fields, in the order shown.
FILTER_FIELDS = ("user", "host", "since", "until", "decision", "limit")


def local_time(value: datetime) -> str:
    return evidence.as_utc(value).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def show_cell(column: str, value: Any) -> str:
    """One request-log value as the table shows it: times in the gateway's local time."""
    return local_time(value) if column == "ts" else evidence.cell(value)


class Login(BaseHandler):
    PUBLIC = frozenset({"GET", "POST"})

    def _form(self, message: str = "", status: int = 200) -> None:
        self.principal = None
        self.send_page("login.html", "登录 Log in", status, message=message)

    def get(self) -> None:
        self._form()

    async def post(self) -> None:
        name = self.get_body_argument("username", "").strip().lower()[:64]
        password = self.get_body_argument("password", "")
        self.principal = None
        if self.ctx.failed_by_account.locked(name):
            metrics.CONSOLE_LOGINS.labels("locked").inc()
            await self.record_quietly("login", "locked", actor=name)
            self._form("Too many failed logins for this account; try again later.", 429)
            return
        try:
            account = self.ctx.accounts.get(name)
        except AccountError as e:
            log.error("%s", e)
            raise tornado.web.HTTPError(503, reason="account file unreadable") from None
        ok = await self.in_thread(
            verify_password, password, account.password_hash if account else ""
        )
        if not ok or account is None:
            self.ctx.failed_by_address.failed(self.address)
            self.ctx.failed_by_account.failed(name)
            metrics.CONSOLE_LOGINS.labels("failed").inc()
            await self.record_quietly("login", "failed", actor=name)
            self._form("Wrong user name or password. 用户名或密码错误。", 401)
            return
        if self.session is not None:
            self.ctx.sessions.close(self.session.id)
        self.open_session(self.ctx.sessions.open(account))  # always a new id: no fixation
        self.principal = Principal(account.name, account.roles, "session")
        metrics.CONSOLE_LOGINS.labels("ok").inc()
        await self.record_quietly("login", "ok")
        self.redirect("/", status=303)


class Logout(BaseHandler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"POST": ALL_ROLES}

    async def post(self) -> None:
        if self.session is not None:
            self.ctx.sessions.close(self.session.id)
        self.clear_cookie(SESSION_COOKIE, path="/")
        await self.record_quietly("logout", "ok")
        self.redirect("/login", status=303)


class Home(BaseHandler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": ALL_ROLES}

    def get(self) -> None:
        assert self.principal is not None
        roles = self.principal.roles
        # Only an admin's page asks the gateway for its status.
        gateway_status = self.ctx.status() if "admin" in roles else None
        self.send_page("home.html", "控制台 Console", roles=roles, gateway_status=gateway_status)


class RequestLog(BaseHandler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"auditor"})}

    def _arg(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return value.strip() if value and value.strip() else None

    def _page(self, status: int = 200, **values: Any) -> None:
        form = {name: self._arg(name) for name in FILTER_FIELDS}
        values = {"rows": None, "error": "", **values}
        self.send_page("requests.html", "请求日志 Request log", status, form=form, **values)

    async def get(self) -> None:
        if not self.request.query:  # the empty form: nothing is read, nothing recorded
            self._page()
            return
        try:
            flt = request_filter(self._arg, self.ctx.now())
        except ValueError as e:
            self._page(400, error=str(e))
            return
        rows = await self.audited_query(
            "query_requests", filter_detail(flt), lambda: self.ctx.store.query_requests(flt)
        )
        self._page(
            rows=rows,
            columns=SUMMARY_COLUMNS,
            show=show_cell,
            export_url=f"/api/v1/export?{self.request.query}",
        )
