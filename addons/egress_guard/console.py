"""Console: the admin HTTP API (tornado, which mitmproxy already ships) on the proxy's event loop.

Every path requires the bearer token; unknown paths answer 401 to strangers and 404 to the
authenticated. Store queries run in a worker thread so the proxy's loop never waits on them.
Errors are JSON ``{"error": ...}``, never a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.web

from .store import MAX_QUERY_ROWS, RequestFilter, Store
from .units import parse_time

TOKEN_FILE = "admin-token"


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


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # the store hands back UTC as naive
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class FailedLogins:
    """Failed authentications per client address: after ``limit`` within ``window`` seconds
    the address is refused (429) until the window has passed, right token or not — guessing
    a token is not a rate anyone gets."""

    def __init__(
        self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        times = self._failures.get(address)
        if times is None:
            return deque()
        horizon = self.clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def locked(self, address: str) -> bool:
        return len(self._recent(address)) >= self.limit

    def failed(self, address: str) -> None:
        self._recent(address)
        self._failures.setdefault(address, deque()).append(self.clock())
        if len(self._failures) > 10_000:  # bounded: forget the oldest addresses
            self._failures.pop(next(iter(self._failures)))


@dataclass
class AdminContext:
    token: str
    store: Store
    status: Callable[[], dict[str, Any]]
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    failed_logins: FailedLogins = field(default_factory=FailedLogins)


class _Authenticated(tornado.web.RequestHandler):
    def initialize(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def prepare(self) -> None:
        # The token travels only in the Authorization header, never in a cookie: a page on
        # another site cannot make a browser send it, so there is no CSRF to forge.
        address = self.request.remote_ip or ""
        if self.ctx.failed_logins.locked(address):
            raise tornado.web.HTTPError(429, reason="too many failed authentications; wait")
        given = self.request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.ctx.token.encode()
        ):
            if given:  # a wrong credential, not a missing one
                self.ctx.failed_logins.failed(address)
            self.set_header("WWW-Authenticate", 'Bearer realm="egress-guard admin"')
            raise tornado.web.HTTPError(401, reason="authentication required")

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    def options(self, *args: Any) -> None:
        raise tornado.web.HTTPError(405, reason="no cross-origin access")

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(payload, default=_json_default, ensure_ascii=False))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = (
            exc.reason if isinstance(exc, tornado.web.HTTPError) and exc.reason else (self._reason)
        )
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}))


class _NotFound(_Authenticated):
    def get(self, *args: Any) -> None:
        raise tornado.web.HTTPError(404, reason="no such endpoint")

    post = put = delete = get


class _Requests(_Authenticated):
    async def get(self) -> None:
        def arg(name: str) -> str | None:
            value = self.get_query_argument(name, None)
            return value if value not in (None, "") else None

        now = self.ctx.now()
        try:
            limit = int(arg("limit") or 100)
            if not 1 <= limit <= MAX_QUERY_ROWS:
                raise ValueError(f"limit must be between 1 and {MAX_QUERY_ROWS}")
            decision = arg("decision")
            if decision is not None and decision not in ("allow", "block", "alert"):
                raise ValueError("decision must be allow, block or alert")
            since, until = arg("since"), arg("until")
            flt = RequestFilter(
                user=arg("user"),
                host=arg("host").lower().rstrip(".") if arg("host") else None,
                decision=decision,
                since=parse_time(since, now) if since else None,
                until=parse_time(until, now) if until else None,
                limit=limit,
            )
        except ValueError as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(None, self.ctx.store.query_requests, flt)
        except Exception as e:
            raise tornado.web.HTTPError(503, reason=f"store query failed: {e}") from None
        self.send_json({"rows": rows, "count": len(rows)})


class _Status(_Authenticated):
    def get(self) -> None:
        self.send_json(self.ctx.status())


def make_app(ctx: AdminContext) -> tornado.web.Application:
    args = {"ctx": ctx}
    return tornado.web.Application(
        [
            (r"/api/v1/requests", _Requests, args),
            (r"/api/v1/status", _Status, args),
        ],
        default_handler_class=_NotFound,
        default_handler_args=args,
        compress_response=True,
    )


def serve(ctx: AdminContext, host: str, port: int) -> tornado.httpserver.HTTPServer:
    """Listen on the running asyncio loop (mitmproxy's)."""
    server = tornado.httpserver.HTTPServer(make_app(ctx), xheaders=False)
    server.listen(port, address=host)
    return server
