"""Console: the admin HTTP API and the web console (tornado, which mitmproxy already ships),
served over TLS on the proxy's event loop.

Who may do what:

- **Authentication:** an API call carries a bearer token, either an account's token or the
  bootstrap admin token. A console page carries a session cookie, issued at login with an
  account's password.
- **Roles:** every handler declares the roles allowed per HTTP method. A handler that declares
  none refuses everyone, so a new page is closed until someone opens it on purpose. Strangers
  get 401 on every path, and the authenticated get 403 outside their roles.
- **Cookies:** sessions live on the server; the cookie only names one. It is Secure, HttpOnly
  and SameSite=Strict. It idles out after 30 minutes and ends after 12 hours, on logout, or
  when the account's password changes or the account is removed. Roles are read from the
  account at each request, so a revoked role takes effect at once.
- **CSRF:** a state-changing request that comes with a cookie must carry tornado's XSRF token,
  and its Origin, when sent, must be this console. Bearer calls carry no ambient credential and
  so have no CSRF to forge.
- **Throttling:** failed logins and failed tokens are rate-limited, per client address and per
  account name.

Every read of the request log, every login and every refusal is written to the
``console_events`` table. A query the store cannot record is not run.

Store calls and password checks run in worker threads, so the proxy's loop never waits on
them. Errors are JSON ``{"error": ...}`` on the API and a plain page in the console, never a
stack trace. All SQL goes through the store's bound parameters.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from html import escape
from ipaddress import ip_address
from pathlib import Path
from typing import Any, ClassVar

import tornado.httpserver
import tornado.web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from egress_guard import metrics
from egress_guard.core.units import parse_time
from egress_guard.requestlog import evidence
from egress_guard.requestlog.store import (
    CONSOLE_EVENT_NAMES,
    MAX_QUERY_ROWS,
    SUMMARY_COLUMNS,
    RequestFilter,
    Store,
)

from .accounts import ROLES, Account, AccountBook, AccountError, verify_password

log = logging.getLogger("egress_guard.console")

TOKEN_FILE = "admin-token"
SESSION_COOKIE = "egress_session"
ALL_ROLES = frozenset(ROLES)
BOOTSTRAP_NAME = "admin-token"  # the principal the bootstrap token stands for


def token_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / TOKEN_FILE


def ensure_admin_token(data_dir: str | Path) -> tuple[str, bool]:
    """The bootstrap admin token (created with mode 0600 on first start); (token, created)."""
    path = token_path(data_dir)
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def tls_context(confdir: Path, cert_dir: Path, host: str) -> ssl.SSLContext:
    """A server certificate for the console, signed by the gateway's own CA: every browser
    behind the proxy trusts that CA already, and the CLI finds it in the data directory."""
    from mitmproxy import certs

    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    addresses = {"127.0.0.1", "::1"}
    if host not in ("", "0.0.0.0", "::"):
        try:
            addresses.add(str(ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.IPAddress(ip_address(a)) for a in sorted(addresses)]
    entry = store.get_cert(host if host not in ("", "0.0.0.0", "::") else "localhost", names)
    key_pem = entry.privatekey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cert_dir.mkdir(parents=True, exist_ok=True)
    path = cert_dir / "console-tls.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem + entry.cert.to_pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(path)
    return context


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return evidence.utc_iso(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class FailedLogins:
    """Failed authentications per key (a client address or an account name): after ``limit``
    within ``window`` seconds the key is refused (429) until the window has passed, right
    credential or not. Guessing a password or a token is not a rate anyone gets."""

    def __init__(
        self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        horizon = self.clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def locked(self, key: str) -> bool:
        return len(self._recent(key)) >= self.limit

    def failed(self, key: str) -> None:
        self._recent(key)
        self._failures.setdefault(key, deque()).append(self.clock())
        if len(self._failures) > 10_000:  # bounded: forget the oldest keys
            self._failures.pop(next(iter(self._failures)))


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    via: str  # "session" | "token"


@dataclass
class Session:
    id: str
    account: str
    stamp: str  # the account's password stamp at login
    created: float
    seen: float


class Sessions:
    """Server-side console sessions; the cookie only names one. Bounded in number."""

    IDLE = 30 * 60.0
    LIFETIME = 12 * 3600.0
    MAX = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, account: Account) -> Session:
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), account.name, account.stamp, now, now)
        self._sessions[session.id] = session
        while len(self._sessions) > self.MAX:
            self._sessions.popitem(last=False)
        return session

    def find(self, session_id: str, accounts: AccountBook) -> tuple[Session, Account] | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        account = accounts.get(session.account)
        if (
            account is None
            or account.stamp != session.stamp
            or now - session.seen >= self.IDLE
            or now - session.created >= self.LIFETIME
        ):
            del self._sessions[session_id]
            return None
        session.seen = now
        self._sessions.move_to_end(session_id)
        return session, account

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class ConsoleContext:
    bootstrap_token: str
    accounts: AccountBook
    store: Store
    status: Callable[[], dict[str, Any]]
    node: str = ""
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    clock: Callable[[], float] = time.monotonic
    failed_by_address: FailedLogins = field(default_factory=FailedLogins)
    # Per account name: slower to trip than per address (a lock-out is itself a nuisance),
    # but an account cannot be guessed at from many addresses either.
    failed_by_account: FailedLogins = field(default_factory=lambda: FailedLogins(20, 900))
    sessions: Sessions = field(default_factory=Sessions)

    def __post_init__(self) -> None:
        self.failed_by_address.clock = self.clock
        self.failed_by_account.clock = self.clock
        self.sessions.clock = self.clock


def request_filter(arg: Callable[[str], str | None], now: datetime) -> RequestFilter:
    """The request-log filter from query arguments; ValueError names the bad one."""
    limit_text = arg("limit") or "100"
    try:
        limit = int(limit_text)
    except ValueError:
        raise ValueError(f"limit must be a number, got {limit_text!r}") from None
    if not 1 <= limit <= MAX_QUERY_ROWS:
        raise ValueError(f"limit must be between 1 and {MAX_QUERY_ROWS}")
    decision = arg("decision")
    if decision is not None and decision not in ("allow", "block", "alert"):
        raise ValueError("decision must be allow, block or alert")
    host, since, until = arg("host"), arg("since"), arg("until")
    return RequestFilter(
        user=arg("user"),
        host=host.lower().rstrip(".") if host else None,
        decision=decision,
        since=parse_time(since, now) if since else None,
        until=parse_time(until, now) if until else None,
        limit=limit,
    )


async def record_event(ctx: ConsoleContext, **fields: Any) -> None:
    """One row of ``console_events``, written from a worker thread."""
    row = [ctx.now(), ctx.node] + [fields[name] for name in CONSOLE_EVENT_NAMES[2:]]
    await asyncio.get_running_loop().run_in_executor(None, ctx.store.insert_console_event, row)


async def watch_accounts(ctx: ConsoleContext, every: float = 2.0) -> None:
    """Copy the account journal (every permission change made with ``egress-guard account``)
    into the console's event log; an entry is marked recorded only once the store has it."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            for change, offset in await loop.run_in_executor(None, ctx.accounts.unrecorded_changes):
                await record_event(
                    ctx,
                    actor=change.get("by") or "account-file",
                    roles=[],
                    via="cli",
                    client_ip="",
                    action="account_change",
                    outcome="ok",
                    detail=json.dumps(
                        {k: change.get(k, "") for k in ("account", "change", "roles", "ts")},
                        sort_keys=True,
                    ),
                )
                await loop.run_in_executor(None, ctx.accounts.mark_recorded, offset)
        except Exception as e:  # the store is down: the journal waits
            log.error("cannot record account changes yet: %s", e)
        await asyncio.sleep(every)


def _filter_detail(flt: RequestFilter) -> str:
    return json.dumps(
        {k: v for k, v in vars(flt).items() if v is not None}, default=_json_default, sort_keys=True
    )


class _Handler(tornado.web.RequestHandler):
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
        self.set_header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'",
        )

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
        if hmac.compare_digest(token.encode(), self.ctx.bootstrap_token.encode()):
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

    # --- console events ---

    async def record(self, action: str, outcome: str, detail: str = "", actor: str = "") -> None:
        """Write one console event; raises when the store cannot take it."""
        p = self.principal
        await record_event(
            self.ctx,
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

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(payload, default=_json_default, ensure_ascii=False))

    def send_page(self, title: str, body: str, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(_page(title, body, self.principal, self._logout_form()))

    def _logout_form(self) -> str:
        if self.principal is None or self.principal.via != "session":
            return ""
        return (
            f'<form method="post" action="/logout" class="logout">{self.xsrf_form_html()}'
            '<button type="submit" id="logout">退出 Log out</button></form>'
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
            self.set_header("Content-Type", "text/html; charset=utf-8")
            body = f'<p class="error" id="error">{escape(message)}</p><p><a href="/">Home</a></p>'
            self.finish(_page(f"{status_code} {self._reason}", body, self.principal, ""))

    def options(self, *args: Any) -> None:
        raise tornado.web.HTTPError(405, reason="no cross-origin access")


# --- pages --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","PingFang SC","Microsoft YaHei",sans-serif;
background:#f4f5f7;color:#1d2330;margin:0}header{background:#1d2330;color:#fff;display:flex;
align-items:center;gap:1rem;padding:.6rem 1.2rem}header a{color:#fff}header .who{margin-left:auto}
main{padding:1.2rem;max-width:90rem;margin:0 auto}form.filters{display:flex;flex-wrap:wrap;
gap:.6rem;align-items:end;background:#fff;padding:1rem;border-radius:6px}label{display:flex;
flex-direction:column;font-size:.85rem;gap:.2rem}input,select,button{font:inherit;padding:.3rem}
table{border-collapse:collapse;background:#fff;margin-top:1rem;font-size:.85rem;width:100%}
th,td{border-bottom:1px solid #e4e7ec;padding:.3rem .5rem;text-align:left;vertical-align:top}
td{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.error{color:#b42318;font-weight:600}form.logout{display:inline}
.login{max-width:22rem;margin:3rem auto;background:#fff;padding:1.5rem;border-radius:8px;
display:flex;flex-direction:column;gap:.8rem}
"""


def _page(title: str, body: str, principal: Principal | None, logout: str) -> str:
    who = ""
    if principal is not None:
        roles = ", ".join(sorted(principal.roles))
        who = (
            f'<span class="who" id="who">{escape(principal.name)} ({escape(roles)})</span>{logout}'
        )
    return f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)} · egress-guard</title><style>{_CSS}</style></head>
<body><header><strong>egress-guard</strong><a href="/">首页 Home</a>{who}</header>
<main><h1>{escape(title)}</h1>
{body}
</main></body></html>
"""


def _local_time(value: datetime) -> str:
    return evidence.as_utc(value).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


class _Login(_Handler):
    PUBLIC = frozenset({"GET", "POST"})

    def _form(self, message: str = "", status: int = 200) -> None:
        error = f'<p class="error" id="error">{escape(message)}</p>' if message else ""
        body = f"""<form method="post" action="/login" class="login">{error}
{self.xsrf_form_html()}
<label>用户名 User name<input name="username" id="username" autocomplete="username"
 required></label>
<label>密码 Password<input name="password" id="password" type="password"
 autocomplete="current-password" required></label>
<button type="submit" id="submit">登录 Log in</button></form>"""
        self.principal = None
        self.send_page("登录 Log in", body, status)

    def get(self) -> None:
        self._form()

    async def post(self) -> None:
        name = self.get_body_argument("username", "").strip().lower()[:64]
        password = self.get_body_argument("password", "")
        self.principal = None
        if self.ctx.failed_by_account.locked(name):
            metrics.CONSOLE_LOGINS.labels("locked").inc()
            await self.record_quietly("login", "locked", actor=name)
            self.set_status(429)
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
        session = self.ctx.sessions.open(account)  # always a new id: no session fixation
        self.set_cookie(
            SESSION_COOKIE, session.id, path="/", secure=True, httponly=True, samesite="Strict"
        )
        self.principal = Principal(account.name, account.roles, "session")
        metrics.CONSOLE_LOGINS.labels("ok").inc()
        await self.record_quietly("login", "ok")
        self.redirect("/", status=303)


class _Logout(_Handler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"POST": ALL_ROLES}

    async def post(self) -> None:
        if self.session is not None:
            self.ctx.sessions.close(self.session.id)
        self.clear_cookie(SESSION_COOKIE, path="/")
        await self.record_quietly("logout", "ok")
        self.redirect("/login", status=303)


class _Home(_Handler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": ALL_ROLES}

    def get(self) -> None:
        assert self.principal is not None
        items = []
        if "auditor" in self.principal.roles:
            items.append('<li><a href="/requests" id="nav-requests">请求日志 Request log</a></li>')
        if "admin" in self.principal.roles:
            status = self.ctx.status()
            rows = "".join(
                f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>"
                for k, v in status.items()
            )
            items.append(f'<li>网关状态 Gateway status<table id="status">{rows}</table></li>')
        if "approver" in self.principal.roles:
            items.append(
                "<li>审批 Approvals: exceptions are granted as <code>allow</code> rules in the "
                "policy until the approval workflow lands (README, approver guide).</li>"
            )
        self.send_page("控制台 Console", f"<ul>{''.join(items)}</ul>")


class _RequestsPage(_Handler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"auditor"})}

    def _arg(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return value.strip() if value and value.strip() else None

    async def get(self) -> None:
        fields = []
        for name, label in (
            ("user", "用户 User"),
            ("host", "目标 Host"),
            ("since", "起 Since"),
            ("until", "止 Until"),
        ):
            value = escape(self._arg(name) or "", quote=True)
            fields.append(
                f'<label>{label}<input name="{name}" id="f-{name}" value="{value}"></label>'
            )
        decision = self._arg("decision") or ""
        options = "".join(
            f'<option value="{d}"{" selected" if d == decision else ""}>{d or "any"}</option>'
            for d in ("", "allow", "block", "alert")
        )
        limit = escape(self._arg("limit") or "100", quote=True)
        form = (
            f'<form method="get" action="/requests" class="filters">{"".join(fields)}'
            '<label>结果 Decision<select name="decision" id="f-decision">'
            f"{options}</select></label>"
            f'<label>条数 Limit<input name="limit" id="f-limit" value="{limit}" size="6"></label>'
            '<button type="submit" id="search">查询 Search</button></form>'
        )
        if not self.request.query:
            self.send_page("请求日志 Request log", form)
            return
        try:
            flt = request_filter(self._arg, self.ctx.now())
        except ValueError as e:
            self.send_page(
                "请求日志 Request log",
                form + f'<p class="error" id="error">{escape(str(e))}</p>',
                400,
            )
            return
        rows = await self.audited_query(
            "query_requests", _filter_detail(flt), lambda: self.ctx.store.query_requests(flt)
        )
        head = "".join(f"<th>{c}</th>" for c in SUMMARY_COLUMNS)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{escape(_local_time(r[c]) if c == 'ts' else evidence.cell(r[c]))}</td>"
                for c in SUMMARY_COLUMNS
            )
            + "</tr>"
            for r in rows
        )
        export = escape(f"/api/v1/export?{self.request.query}", quote=True)
        table = (
            f'<p id="count">{len(rows)} rows (times in the gateway\'s local time) · '
            f'<a id="export" href="{export}" download>导出证据 Export as evidence (CSV, '
            "SHA-256 recorded)</a></p>"
            f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        )
        self.send_page("请求日志 Request log", form + table)


# --- API ----------------------------------------------------------------------------------------


class _Api(_Handler):
    def arg(self, name: str) -> str | None:
        value = self.get_query_argument(name, None)
        return value if value not in (None, "") else None

    def request_filter(self) -> RequestFilter:
        try:
            return request_filter(self.arg, self.ctx.now())
        except ValueError as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None


class _Requests(_Api):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"auditor"})}

    async def get(self) -> None:
        flt = self.request_filter()
        rows = await self.audited_query(
            "query_requests", _filter_detail(flt), lambda: self.ctx.store.query_requests(flt)
        )
        self.send_json({"rows": rows, "count": len(rows)})


class _Export(_Api):
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
        detail = json.loads(_filter_detail(flt)) | {"rows": len(rows), "sha256": sha256}
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


class _ConsoleEvents(_Api):
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


class _Status(_Api):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": frozenset({"admin"})}

    def get(self) -> None:
        self.send_json(self.ctx.status())


class _WhoAmI(_Api):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = {"GET": ALL_ROLES}

    def get(self) -> None:
        assert self.principal is not None
        p = self.principal
        self.send_json({"name": p.name, "roles": sorted(p.roles), "via": p.via})


class _NotFound(_Handler):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = dict.fromkeys(
        ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"), ALL_ROLES
    )

    def get(self, *args: Any) -> None:
        raise tornado.web.HTTPError(404, reason="no such page")

    head = post = put = patch = delete = get


ROUTES: tuple[tuple[str, type[_Handler]], ...] = (
    (r"/", _Home),
    (r"/login", _Login),
    (r"/logout", _Logout),
    (r"/requests", _RequestsPage),
    (r"/api/v1/requests", _Requests),
    (r"/api/v1/export", _Export),
    (r"/api/v1/console-events", _ConsoleEvents),
    (r"/api/v1/status", _Status),
    (r"/api/v1/whoami", _WhoAmI),
)


def make_app(ctx: ConsoleContext) -> tornado.web.Application:
    args = {"ctx": ctx}
    return tornado.web.Application(
        [(path, handler, args) for path, handler in ROUTES],
        default_handler_class=_NotFound,
        default_handler_args=args,
        compress_response=True,
        xsrf_cookies=True,
        xsrf_cookie_kwargs={"secure": True, "httponly": True, "samesite": "Strict", "path": "/"},
    )


def serve(
    ctx: ConsoleContext, host: str, port: int, tls: ssl.SSLContext | None
) -> tornado.httpserver.HTTPServer:
    """Listen on the running asyncio loop (mitmproxy's)."""
    server = tornado.httpserver.HTTPServer(make_app(ctx), xheaders=False, ssl_options=tls)
    server.listen(port, address=host)
    return server
