"""The console's HTML pages: login, logout and home (the auditor's pages are in ``investigate``,
``reports``, ``incidents`` and ``records``). Pages are rendered from
``templates/`` with tornado's autoescaping, so every value is escaped unless a template says
otherwise; no page carries a script."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import tornado.web

from egress_guard import metrics

from .accounts import AccountError, verify_password
from .auth import ALL_ROLES, BaseHandler, Principal
from .sessions import SESSION_COOKIE

log = logging.getLogger("egress_guard.console")


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
