"""The console and admin API in-process: ``make_app`` over a fake store, served over TLS with
the console's own certificate (from a throwaway gateway CA) on a loop in a thread, and called
the way a browser or the CLI calls it. Roles on every action, CSRF, cookie flags, security
headers, login throttling, the console's own audit trail, and what each page shows."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import re
import shutil
import ssl
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.testing
import tornado.web

from egress_guard.console.accounts import AccountBook
from egress_guard.console.api import ApiHandler
from egress_guard.console.app import ROUTES, make_app
from egress_guard.console.auth import CONTENT_SECURITY_POLICY, BaseHandler
from egress_guard.console.certs import tls_context
from egress_guard.console.context import ConsoleContext
from egress_guard.console.display import LOG_COLUMNS
from egress_guard.console.journal import watch_accounts
from egress_guard.console.tokens import ensure_admin_token
from egress_guard.requestlog.store import CONSOLE_EVENT_NAMES, READ_COLUMN_NAMES, RequestFilter
from exception_fixtures import ACTIVE_ID, PENDING_ID, RULES, WallClock, seeded_book

PASSWORD = "a long enough password"
ROLE_ACCOUNTS = {"admin": "ann", "auditor": "aud", "approver": "appr"}
BOOTSTRAP = "the-bootstrap-token"
STATUS = {"node": "unit-node", "policy": {"source": "/etc/egress/policies"}, "store_ok": True}


# --- the fake store and the in-process console ---------------------------------------------------


class FakeStore:
    """The store calls the console makes (``context.ConsoleStore``), over lists in memory.
    ``failing``: the calls that fail as on a store that cannot be reached, ``"insert"``
    (console events cannot be recorded) and/or ``"query"``."""

    def __init__(self, rows: list[dict[str, Any]] | None = None):
        self.rows = rows or []
        self.events: list[dict[str, Any]] = []
        self.queries: list[RequestFilter] = []
        self.failing: set[str] = set()

    def _reachable(self, call: str) -> None:
        if call in self.failing:
            raise ConnectionError(f"store down (fake, {call})")

    def insert_console_event(self, row: list[Any]) -> None:
        self._reachable("insert")
        self.events.append(dict(zip(CONSOLE_EVENT_NAMES, row, strict=True)))

    def query_requests(self, f: RequestFilter) -> list[dict[str, Any]]:
        self._reachable("query")
        self.queries.append(f)
        hits = [
            r
            for r in self.rows
            if (f.user is None or r["user"] == f.user)
            and (f.host is None or r["host"] == f.host or r["host"].endswith("." + f.host))
            and (f.decision is None or r["decision"] == f.decision)
            and (f.since is None or r["ts"] >= f.since)
            and (f.until is None or r["ts"] < f.until)
        ]
        return sorted(hits, key=lambda r: r["ts"], reverse=True)[: f.limit]

    def query_console_events(
        self, since: datetime | None, actor: str | None, limit: int, contains: str | None = None
    ) -> list[dict[str, Any]]:
        self._reachable("query")
        hits = [
            e
            for e in self.events
            if (since is None or e["ts"] >= since)
            and (actor is None or e["actor"] == actor)
            and (contains is None or contains in e["detail"])
        ]
        return list(reversed(hits))[:limit]


def request_row(**values: Any) -> dict[str, Any]:
    """A row with every column the store hands back."""
    row: dict[str, Any] = {
        "ts": datetime.now(UTC) - timedelta(minutes=5),
        "node": "unit-node",
        "request_id": "req-1",
        "client_ip": "10.1.2.3",
        "user": "zhang.wei",
        "groups": [],
        "method": "GET",
        "scheme": "http",
        "host": "example.com",
        "port": 80,
        "path": "/",
        "query": "",
        "http_version": "HTTP/1.1",
        "kind": "http",
        "status": 200,
        "decision": "allow",
        "reason_kind": "",
        "rule_id": "",
        "category": "",
        "marker_ids": [],
        "marker_levels": [],
        "exception_id": "",
        "request_bytes": 0,
        "upload_bytes": 0,
        "response_bytes": 0,
        "content_type": "",
        "user_agent": "",
        "duration_ms": 0,
        "tls_intercepted": False,
        "error": "",
        "declared_bytes": 0,
        "window_bytes": 0,
        "forwarded_bytes": 0,
        "connection_id": "",
    }
    assert tuple(row) == READ_COLUMN_NAMES
    return row | values


class FakeAudit:
    """The auditor's queries (``requestlog.investigation.Investigation``) with canned answers
    shaped as the real ones: what the pages and the API do with them is tested here, the SQL
    against the real store (test_console_audit.py)."""

    def __init__(self, store: FakeStore):
        self.store = store
        self.calls: list[str] = []
        self.updates: list[tuple[str, Any]] = []

    def _called(self, name: str) -> None:
        self.store._reachable("query")
        self.calls.append(name)

    def connection(self, request_id: str) -> dict[str, Any] | None:
        self._called("connection")
        rows = [r for r in self.store.rows if r["request_id"] == request_id]
        if not rows:
            return None
        return {"row": rows[0], "connection_id": "", "approximate": True, "rows": rows}

    def timeline(self, subject: str, since: datetime, until: datetime, **kw: Any) -> Any:
        self._called("timeline")
        events = [r for r in self.store.rows if r["user"] == subject]
        return {
            "subject": subject,
            "since": since,
            "until": until,
            "timezone": "UTC",
            "days": [],
            "sites": [],
            "exceptions": [],
            "events": events,
            "everything": kw.get("everything", False),
            "next": None,
        }

    def report(self, since: datetime, until: datetime) -> dict[str, Any]:
        self._called("report")
        empty: list[Any] = []
        return {
            "since": since,
            "until": until,
            "bucket": "day",
            "timezone": "UTC",
            "totals": dict.fromkeys(
                (
                    "requests",
                    "blocked",
                    "alerts",
                    "users",
                    "hosts",
                    "upload_bytes",
                    "forwarded_bytes",
                    "marker_hits",
                ),
                0,
            ),
            **dict.fromkeys(
                (
                    "requests_over_time",
                    "top_blocked_users",
                    "top_blocked_hosts",
                    "top_blocked_categories",
                    "upload_per_user_day",
                    "marker_hits_over_time",
                    "exception_usage",
                    "busiest_destinations",
                ),
                empty,
            ),
        }

    def incidents(self, **kw: Any) -> list[dict[str, Any]]:
        self._called("incidents")
        return []

    def incident(self, request_id: str) -> dict[str, Any] | None:
        self._called("incident")
        rows = [r for r in self.store.rows if r["request_id"] == request_id]
        if not rows:
            return None
        return {
            "row": rows[0],
            "severity": "high",
            "kind": "marker",
            "status": "new",
            "assignee": "",
            "classification": "",
            "history": [],
        }

    def update_incident(self, request_id: str, change: Any, **kw: Any) -> dict[str, Any]:
        self._called("update_incident")
        self.updates.append((request_id, change))
        found = self.incident(request_id)
        if found is None:
            raise LookupError(request_id)
        return found

    def console_events(self, f: Any) -> list[dict[str, Any]]:
        self._called("console_events")
        return [e | {"key": 1} for e in self.store.events][: f.limit]

    def retention(self, now: datetime) -> dict[str, Any]:
        self._called("retention")
        return {"now": now, "months": [], "tables": []}


class Clock:
    """The console's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; repeated ones (Set-Cookie) joined by newlines
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class InProcessConsole:
    """``make_app(ctx)`` behind an HTTPS server on its own event loop in a thread, on a free
    loopback port; ``call`` is one request, from another loopback address if asked."""

    def __init__(
        self,
        ctx: ConsoleContext,
        store: FakeStore,
        tokens: dict[str, str],
        tls: tuple[ssl.SSLContext, ssl.SSLContext],
    ):
        self.ctx, self.store, self.tokens, self.book = ctx, store, tokens, ctx.accounts
        self.clock: Clock = ctx.clock  # type: ignore[assignment]
        server_tls, self.client = tls
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]

        async def start() -> tornado.httpserver.HTTPServer:
            server = tornado.httpserver.HTTPServer(make_app(ctx), ssl_options=server_tls)
            server.add_sockets(sockets)
            return server

        self.server = self.run(start())

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(
        self,
        path: str,
        token: str | None = None,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        source: str | None = None,
        server_hostname: str = "127.0.0.1",
    ) -> Reply:
        conn = http.client.HTTPSConnection(
            server_hostname,
            self.port,
            timeout=30,
            context=self.client,
            source_address=(source, 0) if source else None,
        )
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            got: dict[str, str] = {}
            for key, value in resp.getheaders():
                key = key.lower()
                got[key] = f"{got[key]}\n{value}" if key in got else value
            return Reply(resp.status, got, resp.read())
        finally:
            conn.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.stop()
            await self.server.close_all_connections()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts: the console's certificate from a new gateway CA, and a
    client that trusts only that CA and checks the name, as the CLI does."""
    confdir = tmp_path_factory.mktemp("mitmproxy")
    server = tls_context(confdir, tmp_path_factory.mktemp("certs"), "127.0.0.1")
    client = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
    return server, client


@pytest.fixture(scope="module")
def accounts_file(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One account per role with a password and an API token, made once (scrypt is slow on
    purpose); each test works on its own copy."""
    book = AccountBook(tmp_path_factory.mktemp("accounts") / "accounts.json")
    tokens = {}
    for role, name in ROLE_ACCOUNTS.items():
        book.add(name, [role], PASSWORD)
        tokens[role] = book.issue_token(name)
    book.add("li.all", ["admin", "auditor", "approver"], PASSWORD)
    tokens["bootstrap"] = BOOTSTRAP
    return book.path, tokens


@pytest.fixture
def console(tls, accounts_file, tmp_path) -> Iterator[InProcessConsole]:
    path, tokens = accounts_file
    shutil.copy(path, tmp_path / "accounts.json")
    store = FakeStore()
    ctx = ConsoleContext(
        bootstrap_token=BOOTSTRAP,
        accounts=AccountBook(tmp_path / "accounts.json"),
        store=store,
        status=lambda: dict(STATUS),
        node="unit-node",
        clock=Clock(),
        audit=FakeAudit(store),
        # The approvers' workflow: a pending request and an active grant (exception_fixtures).
        exceptions=seeded_book(tmp_path, wall := WallClock()),
        approval_rules=lambda: RULES,
        wall_ms=wall,
    )
    c = InProcessConsole(ctx, store, tokens, tls)
    yield c
    c.close()


# --- a browser's steps ----------------------------------------------------------------------------


@dataclass
class Login:
    session: str
    xsrf_cookie: str
    xsrf_field: str

    @property
    def cookie(self) -> str:
        return f"egress_session={self.session}; _xsrf={self.xsrf_cookie}"


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def cookies_of(reply: Reply) -> dict[str, str]:
    """name → the whole Set-Cookie line."""
    lines = reply.headers.get("set-cookie", "").split("\n")
    return {line.split("=", 1)[0]: line for line in lines if "=" in line}


def login_form(c: InProcessConsole) -> tuple[str, str]:
    """(xsrf cookie, xsrf form field) from the login page."""
    page = c.call("/login")
    assert page.status == 200
    cookie = cookies_of(page)["_xsrf"].split(";")[0].split("=", 1)[1]
    field = re.search(rb'name="_xsrf" value="([^"]+)"', page.body).group(1).decode()
    return cookie, field


def post_login(
    c: InProcessConsole,
    name: str,
    password: str,
    source: str | None = None,
    session: str | None = None,
    form: tuple[str, str] | None = None,
) -> Reply:
    cookie, field = form or login_form(c)
    body = urllib.parse.urlencode({"username": name, "password": password, "_xsrf": field})
    jar = f"_xsrf={cookie}" + (f"; egress_session={session}" if session else "")
    return c.call(
        "/login", method="POST", body=body.encode(), headers={"Cookie": jar, **FORM}, source=source
    )


def session_of(reply: Reply) -> str:
    return cookies_of(reply)["egress_session"].split(";")[0].split("=", 1)[1]


def login(c: InProcessConsole, name: str) -> Login:
    form = login_form(c)
    reply = post_login(c, name, PASSWORD, form=form)
    assert reply.status == 303 and reply.headers["location"] == "/", reply.body[:300]
    return Login(session_of(reply), *form)


def page(c: InProcessConsole, path: str, who: Login) -> str:
    reply = c.call(path, headers={"Cookie": who.cookie})
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    return reply.body.decode()


# --- who may do what ------------------------------------------------------------------------------


def implemented_methods(handler: type) -> set[str]:
    own = set()
    for klass in handler.__mro__:
        if klass in (BaseHandler, ApiHandler) or not issubclass(klass, BaseHandler):
            continue
        own |= {m for m in handler.SUPPORTED_METHODS if m.lower() in vars(klass)}
    return own


# Who may do what, written out: a change to a handler's roles must change this table too.
EVERYONE = {"admin", "auditor", "approver"}
WHO_MAY = {
    "/": {"GET": EVERYONE},
    "/login": {},  # public: GET the form, POST credentials
    "/logout": {"POST": EVERYONE},
    "/requests": {"GET": {"auditor"}},
    "/request": {"GET": {"auditor"}},
    "/timeline": {"GET": {"auditor"}},
    "/reports": {"GET": {"auditor"}},
    "/incidents": {"GET": {"auditor"}},
    "/incident": {"GET": {"auditor"}, "POST": {"auditor"}},
    "/events": {"GET": {"admin", "auditor"}},
    "/retention": {"GET": {"admin", "auditor"}},
    # Exceptions: approvers decide; approvers and auditors read; admin is not an approver.
    "/exceptions": {"GET": {"approver", "auditor"}},
    "/exceptions/active": {"GET": {"approver", "auditor"}},
    "/exceptions/history": {"GET": {"approver", "auditor"}},
    "/exceptions/grant": {"GET": {"approver"}, "POST": {"approver"}},
    "/exceptions/([^/]+)": {"GET": {"approver", "auditor"}},
    "/exceptions/([^/]+)/approve": {"POST": {"approver"}},
    "/exceptions/([^/]+)/deny": {"POST": {"approver"}},
    "/exceptions/([^/]+)/revoke": {"POST": {"approver"}},
    "/api/v1/requests": {"GET": {"auditor"}},
    "/api/v1/request": {"GET": {"auditor"}},
    "/api/v1/timeline": {"GET": {"auditor"}},
    "/api/v1/report": {"GET": {"auditor"}},
    "/api/v1/incidents": {"GET": {"auditor"}},
    "/api/v1/incident": {"GET": {"auditor"}, "POST": {"auditor"}},
    "/api/v1/retention": {"GET": {"admin", "auditor"}},
    "/api/v1/exceptions": {"GET": {"approver", "auditor"}, "POST": {"approver"}},
    "/api/v1/exceptions/([^/]+)": {"GET": {"approver", "auditor"}},
    "/api/v1/exceptions/([^/]+)/approve": {"POST": {"approver"}},
    "/api/v1/exceptions/([^/]+)/deny": {"POST": {"approver"}},
    "/api/v1/exceptions/([^/]+)/revoke": {"POST": {"approver"}},
    "/api/v1/exceptions/([^/]+)/request": {"GET": {"approver", "auditor"}},
    "/api/v1/openapi.json": {"GET": EVERYONE},
    "/api/v1/export": {"GET": {"auditor"}},
    "/api/v1/console-events": {"GET": {"admin", "auditor"}},
    "/api/v1/status": {"GET": {"admin"}},
    "/api/v1/whoami": {"GET": EVERYONE},
}


def test_the_roles_of_every_route_are_the_ones_intended():
    declared = {path: {m: set(r) for m, r in h.ROLES.items()} for path, h in ROUTES}
    assert declared == WHO_MAY
    assert {path for path, h in ROUTES if h.PUBLIC} == {"/login"}


def test_every_handler_declares_who_may_call_each_method_it_implements():
    for path, handler in ROUTES:
        methods = implemented_methods(handler)
        assert methods, path
        undeclared = methods - set(handler.ROLES) - handler.PUBLIC
        assert not undeclared, f"{path}: {undeclared} implemented without roles"
        assert set(handler.ROLES) <= methods, f"{path}: roles for methods it does not have"


def role_matrix():
    for path, handler in ROUTES:
        for method, allowed in handler.ROLES.items():
            yield path, method, allowed


# What an allowed caller sends so that the call succeeds: (query, form or JSON fields).
SAMPLE_ARGS: dict[tuple[str, str], tuple[str, dict[str, str]]] = {
    ("/incident", "POST"): ("", {"id": "req-1", "comment": "looked at it"}),
    ("/api/v1/request", "GET"): ("?id=req-1", {}),
    ("/api/v1/timeline", "GET"): ("?user=zhang.wei", {}),
    ("/api/v1/incident", "GET"): ("?id=req-1", {}),
    ("/api/v1/incident", "POST"): ("", {"id": "req-1", "comment": "looked at it"}),
    ("/exceptions/grant", "POST"): (
        "",
        {"subject_value": "li.na", "target": "example.org", "duration": "1d", "reason": "x"},
    ),
    ("/exceptions/([^/]+)/deny", "POST"): ("", {"reason": "not for work"}),
    ("/exceptions/([^/]+)/revoke", "POST"): ("", {"reason": "project over"}),
    ("/api/v1/exceptions", "POST"): (
        "",
        {"subject": "user:li.na", "host": "example.org", "duration": "1d", "reason": "x"},
    ),
    ("/api/v1/exceptions/([^/]+)/deny", "POST"): ("", {"reason": "not for work"}),
    ("/api/v1/exceptions/([^/]+)/revoke", "POST"): ("", {"reason": "project over"}),
}
# The path an allowed caller calls for a route with an id in it: the fixture's exceptions.
SAMPLE_PATHS = {
    path: path.replace("([^/]+)", ACTIVE_ID if path.endswith("/revoke") else PENDING_ID)
    for path, _ in ROUTES
    if "([^/]+)" in path
}


@pytest.mark.parametrize(("path", "method", "allowed"), list(role_matrix()))
@pytest.mark.parametrize("via", ["token", "session"])
def test_every_action_is_refused_to_roles_it_is_not_for(console, path, method, allowed, via):
    console.store.rows = [request_row()]
    query, fields = SAMPLE_ARGS.get((path, method), ("", {}))
    for role, name in ROLE_ACCOUNTS.items():
        headers = {"Origin": console.origin}
        if via == "token":
            token, body = console.tokens[role], None
            if method == "POST" and path.startswith("/api/"):
                body = json.dumps(fields).encode()
            elif method == "POST":
                body = urllib.parse.urlencode(fields).encode()
                headers.update(FORM)
        else:
            session = login(console, name)
            token, headers["Cookie"] = None, session.cookie
            body = urllib.parse.urlencode({"_xsrf": session.xsrf_field, **fields}).encode()
            headers.update(FORM)
        if via == "session" and path.startswith("/api/") and method == "POST":
            headers["Content-Type"] = "application/json"
            body = json.dumps(fields).encode()
            headers["X-XSRFToken"] = session.xsrf_field
        concrete = SAMPLE_PATHS.get(path, path)
        reply = console.call(concrete + query, token, method=method, body=body, headers=headers)
        if role in allowed:
            assert reply.status in (200, 303), (role, path, method, reply.status, reply.body)
        else:
            assert reply.status == 403, (role, path, method, reply.status)
            assert b"rows" not in reply.body and b"zhang.wei" not in reply.body


API_PATHS = [path for path, _ in ROUTES if path.startswith("/api/")]


@pytest.mark.parametrize("path", [*API_PATHS, "/api/v1/no/such/thing"])
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_the_api_never_answers_strangers(console, path, token):
    reply = console.call(path, token)
    assert reply.status == 401 and reply.json() == {"error": "authentication required"}
    assert console.store.queries == []


@pytest.mark.parametrize("path", ["/", "/requests", "/requests?user=alice", "/no/such/page"])
def test_console_pages_send_strangers_to_the_login_page(console, path):
    reply = console.call(path)
    assert reply.status == 302 and reply.headers["location"] == "/login"
    assert reply.body == b""


def test_the_bootstrap_token_is_an_admin_and_nothing_more(console):
    token = console.tokens["bootstrap"]
    assert console.call("/api/v1/status", token).status == 200
    assert console.call("/api/v1/whoami", token).json()["roles"] == ["admin"]
    assert console.call("/api/v1/requests", token).status == 403  # reading traffic: auditors


def test_a_revoked_role_or_removed_account_stops_working_at_the_next_request(console):
    book = console.book
    book.add("temp-aud", ["auditor"], PASSWORD)
    token = book.issue_token("temp-aud")
    session = login(console, "temp-aud")
    assert console.call("/api/v1/requests", token).status == 200
    assert console.call("/requests?user=x", headers={"Cookie": session.cookie}).status == 200
    book.set_roles("temp-aud", ["approver"])
    assert console.call("/api/v1/requests", token).status == 403
    assert console.call("/requests?user=x", headers={"Cookie": session.cookie}).status == 403
    book.remove("temp-aud")
    assert console.call("/api/v1/whoami", token).status == 401
    reply = console.call("/", headers={"Cookie": session.cookie})
    assert reply.status == 302 and reply.headers["location"] == "/login"


def test_an_idle_session_ends_and_its_cookie_is_cleared(console):
    session = login(console, "aud")
    console.clock.t += 29 * 60
    assert console.call("/", headers={"Cookie": session.cookie}).status == 200
    console.clock.t += 30 * 60
    reply = console.call("/", headers={"Cookie": session.cookie})
    assert reply.status == 302 and reply.headers["location"] == "/login"
    assert cookies_of(reply)["egress_session"].startswith('egress_session="";')


# --- cookies, CSRF, headers -----------------------------------------------------------------------


def test_session_and_xsrf_cookies_carry_secure_flags(console):
    reply = post_login(console, "aud", PASSWORD)
    assert reply.status == 303
    session = cookies_of(reply)["egress_session"].lower()
    for flag in ("secure", "httponly", "samesite=strict", "path=/"):
        assert flag in session.split("; "), session
    assert "expires" not in session and "max-age" not in session  # gone with the browser
    xsrf = cookies_of(console.call("/login"))["_xsrf"].lower()
    for flag in ("secure", "httponly", "samesite=strict"):
        assert flag in xsrf.split("; "), xsrf
    for name in ("strict-transport-security", "content-security-policy", "x-frame-options"):
        assert name in reply.headers


def test_every_answer_carries_the_security_headers(console):
    s = login(console, "appr")
    answers = {
        "login page": console.call("/login"),
        "stranger redirected": console.call("/"),
        "home": console.call("/", headers={"Cookie": s.cookie}),
        "403 page": console.call("/requests", headers={"Cookie": s.cookie}),
        "404 page": console.call("/nowhere", headers={"Cookie": s.cookie}),
        "api": console.call("/api/v1/whoami", console.tokens["approver"]),
        "api 401": console.call("/api/v1/whoami", "wrong"),
        "api 404": console.call("/api/v1/nowhere", console.tokens["approver"]),
    }
    for what, reply in answers.items():
        h = reply.headers
        assert h["content-security-policy"] == CONTENT_SECURITY_POLICY, what
        assert "script-src" not in h["content-security-policy"]  # default-src 'none' covers it
        assert "frame-ancestors 'none'" in h["content-security-policy"], what
        assert h["x-frame-options"] == "DENY", what
        assert h["referrer-policy"] == "same-origin", what
        assert h["x-content-type-options"] == "nosniff", what
        assert h["cache-control"] == "no-store", what
        assert h["strict-transport-security"] == "max-age=31536000", what


def test_pages_carry_no_script_and_every_form_its_xsrf_token(console):
    console.store.rows = [request_row(path="/<script>x</script>")]
    s = login(console, "li.all")
    pages = [
        console.call("/login").body.decode(),
        post_login(console, "li.all", "no").body.decode(),
    ]
    for path in ("/", "/requests", "/requests?host=example.com", "/requests?limit=0", "/x"):
        pages.append(page(console, path, s))
    posts = 0
    for text in pages:
        assert "<script" not in text.lower()
        assert not re.search(r"<[^>]+\son[a-z]+=", text, re.I)  # no inline event handlers
        for form in re.findall(r'<form\b[^>]*\bmethod="post".*?</form>', text, re.S | re.I):
            assert re.search(r'<input type="hidden" name="_xsrf" value="[^"]+"', form), form
            posts += 1
    assert posts == len(pages) - 1  # a login or logout form on each, but the 404 page


def test_state_changes_need_the_xsrf_token_and_a_same_origin(console):
    s = login(console, "aud")

    def logout(body: dict[str, str], **headers: str) -> int:
        return console.call(
            "/logout",
            method="POST",
            body=urllib.parse.urlencode(body).encode(),
            headers={**FORM, "Cookie": s.cookie, **headers},
        ).status

    def still_logged_in() -> bool:
        return console.call("/", headers={"Cookie": s.cookie}).status == 200

    assert logout({}) == 403 and still_logged_in()  # no token
    _, other_field = login_form(console)  # a token that belongs to another cookie
    assert logout({"_xsrf": other_field}) == 403 and still_logged_in()
    assert logout({"_xsrf": s.xsrf_field}, Origin="https://evil.example") == 403
    assert still_logged_in()
    assert logout({"_xsrf": s.xsrf_field}, Origin=console.origin) == 303
    assert not still_logged_in()
    # Login itself is protected, so nobody can log a victim into the attacker's account.
    body = urllib.parse.urlencode({"username": "aud", "password": PASSWORD}).encode()
    assert console.call("/login", method="POST", body=body, headers=FORM).status == 403


def test_a_login_gets_a_fresh_session_id(console):
    first = login(console, "aud")
    second = session_of(post_login(console, "aud", PASSWORD, session=first.session))
    assert second != first.session
    assert console.call("/", headers={"Cookie": first.cookie}).status == 302  # the old one ended


def test_failed_logins_are_throttled_per_address_and_per_account(console):
    # Per address: ten failures lock that address, right password or not; others are fine.
    for _ in range(10):
        assert post_login(console, "ann", "wrong password!", source="127.0.0.5").status == 401
    assert post_login(console, "aud", PASSWORD, source="127.0.0.5").status == 429
    assert console.call("/login", source="127.0.0.5").status == 429
    assert post_login(console, "aud", PASSWORD, source="127.0.0.6").status == 303
    # Per account: twenty failures from many addresses lock the account name.
    for i in range(20):
        assert post_login(console, "appr", "wrong password!", source=f"127.0.1.{i}").status == 401
    locked = post_login(console, "appr", PASSWORD, source="127.0.0.7")
    assert locked.status == 429 and b"Too many failed logins" in locked.body
    assert post_login(console, "ann", PASSWORD, source="127.0.0.7").status == 303
    # The locks last their window, then the right password works again.
    console.clock.t += 60
    assert post_login(console, "aud", PASSWORD, source="127.0.0.5").status == 303
    assert post_login(console, "appr", PASSWORD, source="127.0.0.8").status == 429
    console.clock.t += 900
    assert post_login(console, "appr", PASSWORD, source="127.0.0.8").status == 303


def test_wrong_tokens_count_as_failed_logins_of_the_address(console):
    for _ in range(10):
        assert console.call("/api/v1/whoami", "guessed", source="127.0.0.9").status == 401
    refused = console.call("/api/v1/whoami", console.tokens["admin"], source="127.0.0.9")
    assert refused.status == 429 and "error" in refused.json()
    assert console.call("/api/v1/whoami", console.tokens["admin"]).status == 200


# --- the console's own audit trail ----------------------------------------------------------------


def test_reads_logins_and_refusals_are_recorded_without_secrets(console):
    aud = console.tokens["auditor"]
    assert console.call("/api/v1/requests?user=someone&host=Example.COM.", aud).status == 200
    assert post_login(console, "aud", "not the password").status == 401
    assert console.call("/api/v1/status", aud).status == 403
    s = login(console, "aud")
    assert console.call("/requests?decision=block", headers={"Cookie": s.cookie}).status == 200
    events = console.call("/api/v1/console-events?limit=1000", console.tokens["admin"]).json()
    rows = events["rows"]
    assert events["count"] == len(rows) and set(rows[0]) == set(CONSOLE_EVENT_NAMES)
    query = [e for e in rows if e["action"] == "query_requests" and e["via"] == "token"]
    assert json.loads(query[0]["detail"]) == {
        "host": "example.com",
        "limit": 100,
        "user": "someone",
    }
    assert query[0]["actor"] == "aud" and query[0]["roles"] == ["auditor"]
    assert query[0]["node"] == "unit-node" and query[0]["ts"].endswith("Z")
    page_read = [e for e in rows if e["action"] == "query_requests" and e["via"] == "session"]
    assert json.loads(page_read[0]["detail"]) == {"decision": "block", "limit": 100}
    failed = [e for e in rows if e["action"] == "login" and e["outcome"] == "failed"]
    assert failed[0]["actor"] == "aud" and failed[0]["client_ip"] == "127.0.0.1"
    assert failed[0]["via"] == "login" and failed[0]["roles"] == []
    denied = [e for e in rows if e["outcome"] == "denied" and e["actor"] == "aud"]
    assert [e["detail"] for e in denied] == ["/api/v1/status"]
    assert [e["actor"] for e in rows if e["action"] == "login" and e["outcome"] == "ok"] == ["aud"]
    assert all("not the password" not in json.dumps(e) for e in rows)
    assert all(PASSWORD not in json.dumps(e) for e in rows)


def test_a_read_the_store_cannot_record_is_not_run(console):
    aud = console.tokens["auditor"]
    s = login(console, "aud")
    console.store.failing = {"insert"}  # reads would work, but could not be recorded
    reply = console.call("/api/v1/requests?user=alice", aud)
    assert reply.status == 503 and "rows" not in reply.json()
    assert reply.json()["error"].startswith("store unavailable")
    shown = console.call("/requests?user=alice", headers={"Cookie": s.cookie})
    assert shown.status == 503 and b'id="results"' not in shown.body
    # A refusal is still a refusal while its event cannot be kept: 403, not an error.
    assert console.call("/api/v1/status", aud).status == 403
    assert console.store.queries == []  # nothing was read while nothing could be recorded
    console.store.failing = set()
    assert console.call("/api/v1/requests?user=alice", aud).status == 200


def test_the_account_journal_is_copied_once_and_waits_while_the_store_is_down(console):
    book = console.book
    console.store.failing = {"insert"}
    book.add("new.aud", ["auditor"], PASSWORD)
    watcher = asyncio.run_coroutine_threadsafe(
        watch_accounts(console.ctx, every=0.01), console.loop
    )
    try:
        time.sleep(0.2)
        assert book.unrecorded_changes()  # not lost, not marked while the store is down
        console.store.failing = set()
        book.set_roles("new.aud", ["approver"])

        def changes() -> list[dict[str, str]]:
            return [json.loads(e["detail"]) for e in console.store.events]

        deadline = time.monotonic() + 10
        while len(changes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # a few more rounds: nothing is copied twice
    finally:
        watcher.cancel()
    assert [(c["account"], c["change"]) for c in changes()] == [
        ("new.aud", "added"),
        ("new.aud", "roles auditor -> approver"),
    ]
    assert {e["action"] for e in console.store.events} == {"account_change"}
    assert {e["via"] for e in console.store.events} == {"cli"}
    assert book.unrecorded_changes() == []


# --- what the pages show --------------------------------------------------------------------------


def test_the_home_page_shows_each_role_its_part(console):
    admin = page(console, "/", login(console, "ann"))
    assert 'id="status"' in admin and "unit-node" in admin and "/etc/egress/policies" in admin
    assert 'id="nav-requests"' not in admin and "Approvals" not in admin
    assert 'id="who">ann (admin)<' in admin and 'id="logout"' in admin
    auditor = page(console, "/", login(console, "aud"))
    assert 'id="nav-requests"' in auditor and 'id="status"' not in auditor
    approver = page(console, "/", login(console, "appr"))
    assert "Approvals" in approver and 'id="nav-exceptions-grant"' in approver
    assert 'id="status"' not in approver and 'id="nav-requests"' not in approver
    everyone = page(console, "/", login(console, "li.all"))
    assert all(m in everyone for m in ('id="status"', 'id="nav-requests"', "Approvals"))
    assert 'id="who">li.all (admin, approver, auditor)<' in everyone


def test_the_request_log_page_filters_shows_rows_and_links_the_export(console):
    now = datetime.now(UTC)
    console.store.rows = [
        request_row(ts=now - timedelta(hours=1), host="mail.example.com", decision="block"),
        request_row(ts=now - timedelta(hours=2), host="example.com", path="/older"),
        request_row(ts=now - timedelta(days=3), host="example.com", path="/too-old"),
        request_row(ts=now - timedelta(hours=1), host="example.org", path="/elsewhere"),
    ]
    s = login(console, "aud")
    form = page(console, "/requests", s)
    assert 'id="f-user"' in form and 'id="f-limit" value="100"' in form
    assert 'id="results"' not in form and console.store.queries == []  # nothing read yet
    assert not [e for e in console.store.events if e["action"] == "query_requests"]

    query = "user=zhang.wei&host=Example.com.&since=24h&until=&limit=50"
    shown = page(console, f"/requests?{query}", s)
    (flt,) = console.store.queries
    assert (flt.user, flt.host, flt.decision, flt.until, flt.limit) == (
        "zhang.wei",
        "example.com",
        None,
        None,
        50,
    )
    assert flt.since is not None and abs(now - timedelta(hours=24) - flt.since).total_seconds() < 60
    assert '<p id="count">2 rows' in shown
    table = shown.split('<table id="results" class="log wide">')[1]
    assert re.findall(r"<th>([^<]*)</th>", table) == [h for _, h in LOG_COLUMNS]
    assert table.index("mail.example.com") < table.index("/older") and "/too-old" not in table
    hour_ago = now - timedelta(hours=1)
    local = hour_ago.astimezone().strftime("%Y-%m-%d %H:%M")
    utc = hour_ago.strftime("%Y-%m-%dT%H:%M")
    # Times in the gateway's local time, UTC on hover.
    assert re.search(f'<td class="c-ts" title="UTC {utc}[^"]*Z">{local}', table)
    export = re.search(r'<a id="export" href="([^"]+)" download>', shown).group(1)
    path, _, args = export.replace("&amp;", "&").partition("?")
    assert path == "/api/v1/export"
    assert urllib.parse.parse_qs(args) == urllib.parse.parse_qs(query)  # until= is left out
    for name, value in (("user", "zhang.wei"), ("host", "Example.com."), ("since", "24h")):
        assert f'id="f-{name}" value="{value}"' in shown  # the form keeps what was asked

    blocked = page(console, "/requests?decision=block", s)
    assert '<option value="block" selected>' in blocked and '<p id="count">1 rows' in blocked

    bad = console.call("/requests?limit=lots", headers={"Cookie": s.cookie})
    assert bad.status == 400 and b"limit must be a number, got &#x27;lots&#x27;" in bad.body
    assert b'id="f-limit" value="lots"' in bad.body and len(console.store.queries) == 2


def test_values_on_pages_are_escaped(console):
    hostile = '"><script>alert(1)</script>'
    console.store.rows = [request_row(user=hostile, path=f"/{hostile}", rule_id="a&b")]
    console.ctx.status = lambda: {"node": hostile}
    s = login(console, "li.all")
    home = page(console, "/", s)
    results = page(console, f"/requests?user={urllib.parse.quote(hostile)}", s)
    for text in (home, results):
        assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert f'value="{hostile}"' not in results and 'value="&quot;&gt;&lt;script&gt;' in results
    assert 'title="a&amp;b">a&amp;b</td>' in results
    assert "&lt;script&gt;" in page(console, f"/requests?limit={urllib.parse.quote(hostile)}", s)


# --- the API's answers ----------------------------------------------------------------------------


def test_api_answers_keep_their_json_shape(console):
    ts = datetime(2026, 11, 21, 8, 30, 0, 123000, tzinfo=UTC)
    console.store.rows = [request_row(ts=ts, user="张伟", marker_levels=["block"])]
    aud = console.tokens["auditor"]
    got = console.call("/api/v1/requests?user=%E5%BC%A0%E4%BC%9F", aud)
    assert got.headers["content-type"] == "application/json; charset=utf-8"
    expected = {
        "rows": [request_row(ts=ts, user="张伟", marker_levels=["block"])],
        "count": 1,
        "next": None,  # the cursor of the next page (after=…); none after the last
    }
    expected["rows"][0]["ts"] = "2026-11-21T08:30:00.123Z"
    assert got.json() == expected
    assert "张伟".encode() in got.body  # UTF-8 as is, not \u escapes
    assert list(got.json()) == ["rows", "count", "next"]

    assert console.call("/api/v1/whoami", aud).json() == {
        "name": "aud",
        "roles": ["auditor"],
        "via": "token",
    }
    assert console.call("/api/v1/status", console.tokens["admin"]).json() == STATUS
    events = console.call("/api/v1/console-events?actor=aud", console.tokens["admin"]).json()
    assert list(events) == ["rows", "count"] and events["count"] >= 1
    for path, error in (
        ("/api/v1/requests?limit=0", "limit must be between 1 and 100000"),
        ("/api/v1/requests?decision=maybe", "decision must be allow, block or alert"),
        ("/api/v1/requests?since=soon", None),
        ("/api/v1/console-events?limit=x", None),
        ("/api/v1/nowhere", "no such page"),
    ):
        reply = console.call(path, aud)
        assert reply.status in (400, 404) and list(reply.json()) == ["error"], path
        assert error is None or reply.json()["error"] == error


def test_an_export_is_hashed_and_recorded_before_it_is_sent(console):
    console.store.rows = [request_row(path=f"/evidence-{i}", request_id=f"r{i}") for i in range(3)]
    aud = console.tokens["auditor"]
    got = console.call("/api/v1/export?host=example.com", aud)
    assert got.status == 200 and got.headers["content-type"] == "text/csv; charset=utf-8"
    sha256 = hashlib.sha256(got.body).hexdigest()
    assert got.headers["x-egress-guard-sha256"] == sha256
    assert got.headers["x-egress-guard-rows"] == "3"
    assert re.fullmatch(
        r'attachment; filename="egress-\d{8}T\d{6}Z\.csv"', got.headers["content-disposition"]
    )
    lines = got.body.decode().split("\r\n")
    assert lines[0].startswith("ts,node,request_id,client_ip,user,")
    (event,) = [e for e in console.store.events if e["action"] == "export_requests"]
    assert json.loads(event["detail"]) == {
        "host": "example.com",
        "limit": 100,
        "rows": 3,
        "sha256": sha256,
    }
    # An export whose hash cannot be recorded is not handed out; nor one that cannot be read.
    for failing in ({"insert"}, {"query"}):
        console.store.failing = failing
        refused = console.call("/api/v1/export?host=example.com", aud)
        assert refused.status == 503 and b"evidence-" not in refused.body, failing
        assert refused.json()["error"].startswith("store unavailable")
        assert "x-egress-guard-sha256" not in refused.headers


# --- the pieces start_servers uses ----------------------------------------------------------------


def test_the_console_certificate_covers_its_names_and_comes_from_the_gateway_ca(console):
    for name in ("127.0.0.1", "localhost"):  # the client checks the name against the CA's cert
        assert console.call("/login", server_hostname=name).status == 200
    stranger = ssl.create_default_context()  # the system's CAs: the gateway CA is not one
    conn = http.client.HTTPSConnection("127.0.0.1", console.port, timeout=10, context=stranger)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/login")
    conn.close()


def test_the_bootstrap_token_is_made_once_and_kept_private(tmp_path):
    token, created = ensure_admin_token(tmp_path / "data")
    assert created and len(token) >= 40
    path = tmp_path / "data" / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_admin_token(tmp_path / "data") == (token, False)


class TestTheFactoryUnderTornadoTesting(tornado.testing.AsyncHTTPTestCase):
    """``make_app`` is an ordinary tornado application: tornado's own test case drives it
    (plain HTTP here, so this checks the app, not the TLS around it)."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.store = FakeStore()
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        self._tmp.cleanup()

    def get_app(self) -> tornado.web.Application:
        ctx = ConsoleContext(
            bootstrap_token=BOOTSTRAP,
            accounts=AccountBook(Path(self._tmp.name) / "accounts.json"),
            store=self.store,
            status=lambda: dict(STATUS),
        )
        return make_app(ctx)

    def test_the_login_page_and_the_bootstrap_token(self) -> None:
        login_page = self.fetch("/login")
        assert login_page.code == 200 and b'name="_xsrf"' in login_page.body
        assert login_page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        status = self.fetch("/api/v1/status", headers={"Authorization": f"Bearer {BOOTSTRAP}"})
        assert json.loads(status.body) == STATUS
        assert self.fetch("/api/v1/status").code == 401
        assert self.fetch("/", follow_redirects=False).headers["Location"] == "/login"
        assert [e["outcome"] for e in self.store.events] == []  # nothing denied, nothing read
