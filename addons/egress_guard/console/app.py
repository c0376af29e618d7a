"""The console's application: the route table, the factory ``make_app`` (the gateway serves
it; tests drive it in-process with a fake store), and ``serve`` on the running loop.

The gateway's ``start_servers`` uses this module alone, so the names it needs from the other
modules are here too (``__all__``)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import tornado.httpserver
import tornado.web

from . import api, pages
from .auth import ALL_ROLES, BaseHandler
from .certs import tls_context
from .context import ConsoleContext
from .journal import watch_accounts
from .sessions import COOKIE_FLAGS
from .tokens import ensure_admin_token, token_path

__all__ = [
    "ROUTES",
    "ConsoleContext",
    "ensure_admin_token",
    "make_app",
    "serve",
    "tls_context",
    "token_path",
    "watch_accounts",
]

TEMPLATES = Path(__file__).with_name("templates")


class NotFound(BaseHandler):
    """Every other path: 404 to the logged-in, while strangers still get 401 or the login
    page, so nobody learns which paths exist without logging in."""

    ROLES: ClassVar[Mapping[str, frozenset[str]]] = dict.fromkeys(
        ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"), ALL_ROLES
    )

    def get(self, *args: Any) -> None:
        raise tornado.web.HTTPError(404, reason="no such page")

    head = post = put = patch = delete = get


# Every route and its handler; each handler declares who may call which method.
ROUTES: tuple[tuple[str, type[BaseHandler]], ...] = (
    (r"/", pages.Home),
    (r"/login", pages.Login),
    (r"/logout", pages.Logout),
    (r"/requests", pages.RequestLog),
    (r"/api/v1/requests", api.Requests),
    (r"/api/v1/export", api.Export),
    (r"/api/v1/console-events", api.ConsoleEvents),
    (r"/api/v1/status", api.Status),
    (r"/api/v1/whoami", api.WhoAmI),
)


def make_app(ctx: ConsoleContext) -> tornado.web.Application:
    """The console and the admin API over ``ctx``; nothing listens until it is served."""
    args = {"ctx": ctx}
    return tornado.web.Application(
        [(path, handler, args) for path, handler in ROUTES],
        default_handler_class=NotFound,
        default_handler_args=args,
        compress_response=True,
        xsrf_cookies=True,
        xsrf_cookie_kwargs=dict(COOKIE_FLAGS),
        # tornado's default autoescape (xhtml_escape) stays on: every {{ }} is escaped.
        template_path=str(TEMPLATES),
    )


def serve(
    ctx: ConsoleContext, host: str, port: int, tls: ssl.SSLContext | None
) -> tornado.httpserver.HTTPServer:
    """Listen on the running asyncio loop (mitmproxy's)."""
    server = tornado.httpserver.HTTPServer(make_app(ctx), xheaders=False, ssl_options=tls)
    server.listen(port, address=host)
    return server
