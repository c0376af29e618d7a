"""The base of every handler: who is asking (token or session), whether their roles allow
the method, the CSRF rules, the security headers, console events, and error answers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import tornado.web

from egress_guard import metrics

from .accounts import ROLES, AccountError
from .context import ConsoleContext
from .sessions import COOKIE_FLAGS, SESSION_COOKIE, Session
from .tokens import BOOTSTRAP_NAME, is_bootstrap_token

log = logging.getLogger("egress_guard.console")

ALL_ROLES = frozenset(ROLES)

# No scripts at all, styles only from the page itself, forms only to this console, and no
# framing (clickjacking) or <base> rewriting.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    via: str  # "session" | "token"


class BaseHandler(tornado.web.RequestHandler):
    """Authentication, role checks, CSRF rules and error rendering for every path."""

    # HTTP method → roles allowed. Empty: nobody. Methods in PUBLIC need no login.
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {}
    PUBLIC: ClassVar[frozenset[str]] = frozenset()

    principal: Principal | None = None
    session: Session | None = None

    def initialize(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx

    @property
    def is_api(self) -> bool:
        return self.request.path.startswith("/api/")

    @property
    def address(self) -> str:
        return self.request.remote_ip or ""

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "same-origin")  # "no-referrer" makes Origin "null"
        self.set_header("Strict-Transport-Security", "max-age=31536000")
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)

    # --- CSRF ---

    def check_xsrf_cookie(self) -> None:
        if "Authorization" in self.request.headers:
            return  # a bearer call: authenticated by the header alone, cookies are ignored
        origin = self.request.headers.get("Origin")
        if origin is not None and origin != f"{self.request.protocol}://{self.request.host}":
            raise tornado.web.HTTPError(403, reason="cross-origin request refused")
        super().check_xsrf_cookie()

    # --- authentication and roles ---

    def _from_token(self, given: str) -> Principal | None:
        scheme, _, token = given.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if is_bootstrap_token(token, self.ctx.bootstrap_token):
            return Principal(BOOTSTRAP_NAME, frozenset({"admin"}), "token")
        account = self.ctx.accounts.by_token(token)
        return Principal(account.name, account.roles, "token") if account else None

    def _from_session(self) -> Principal | None:
        session_id = self.get_cookie(SESSION_COOKIE)
        if not session_id:
            return None
        found = self.ctx.sessions.find(session_id, self.ctx.accounts)
        if found is None:
            self.clear_cookie(SESSION_COOKIE, path="/")
            return None
        self.session, account = found
        return Principal(account.name, account.roles, "session")

    async def prepare(self) -> None:
        if self.ctx.failed_by_address.locked(self.address):
            raise tornado.web.HTTPError(429, reason="too many failed authentications; wait")
        given = self.request.headers.get("Authorization")
        try:
            self.principal = self._from_token(given) if given is not None else self._from_session()
        except AccountError as e:  # a broken account file: nobody gets in, the admin is told
            log.error("%s", e)
            raise tornado.web.HTTPError(503, reason="account file unreadable") from None
        method = self.request.method or ""
        if method in self.PUBLIC:
            return
        if self.principal is None:
            if given is not None:  # a wrong credential, not a missing one
                self.ctx.failed_by_address.failed(self.address)
                metrics.CONSOLE_LOGINS.labels("failed").inc()
            if not self.is_api and method in ("GET", "HEAD"):
                self.redirect("/login")
                return
            self.set_header("WWW-Authenticate", 'Bearer realm="egress-guard admin"')
            raise tornado.web.HTTPError(401, reason="authentication required")
        if not self.principal.roles & self.ROLES.get(method, frozenset()):
            await self.record_quietly("access", "denied", self.request.path)
            raise tornado.web.HTTPError(
                403, reason=f"{self.principal.name} has no role that may do this"
            )

    def open_session(self, session: Session) -> None:
        self.set_cookie(SESSION_COOKIE, session.id, **COOKIE_FLAGS)

    # --- console events ---

    async def record(self, action: str, outcome: str, detail: str = "", actor: str = "") -> None:
        """Write one console event; raises when the store cannot take it."""
        p = self.principal
        await self.ctx.record_event(
            actor=actor or (p.name if p else ""),
            roles=sorted(p.roles) if p else [],
            via=p.via if p else "login",
            client_ip=self.address,
            action=action,
            outcome=outcome,
            detail=detail,
        )

    async def record_quietly(self, *args: str, **kwargs: str) -> None:
        try:
            await self.record(*args, **kwargs)
        except Exception as e:  # a login must not fail because the event could not be kept
            log.error("cannot record console event: %s", e)

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def audited_query(self, action: str, detail: str, run: Callable[[], Any]) -> Any:
        """Record the read, then run it: a read the store cannot record is not run."""
        try:
            await self.record(action, "ok", detail)
            return await self.in_thread(run)
        except Exception as e:
            raise tornado.web.HTTPError(503, reason=f"store unavailable: {e}") from None

    # --- output ---

    def send_page(
        self,
        template: str,
        title: str,
        status: int | None = None,
        logout: bool = True,
        **values: Any,
    ) -> None:
        """A page from ``templates/`` (autoescaped). ``status`` None keeps the one set (and
        its reason); ``logout`` offers the logout form to a session (a token has nothing to
        log out of)."""
        if status is not None:
            self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        p = self.principal
        self.render(
            template,
            title=title,
            principal=p,
            logout=logout and p is not None and p.via == "session",
            **values,
        )

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = (
            exc.reason if isinstance(exc, tornado.web.HTTPError) and exc.reason else self._reason
        )
        if self.is_api or "Authorization" in self.request.headers:
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"error": message}))
        else:
            # No form on an error page, so it hands out no XSRF cookie either.
            title = f"{status_code} {self._reason}"
            self.send_page("error.html", title, logout=False, message=message)

    def options(self, *args: Any) -> None:
        raise tornado.web.HTTPError(405, reason="no cross-origin access")
