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

from . import api, audit_api, incidents, investigate, pages, records, reports
from . import exceptions_api as ex_api
from . import exceptions_pages as ex_pages
from .auth import ALL_ROLES, BaseHandler
from .certs import tls_context
from .context import ConsoleContext
from .exception_ops import category_of, groups_of
from .journal import watch_accounts
from .sessions import COOKIE_FLAGS
from .tokens import ensure_admin_token, token_path

__all__ = [
    "ROUTES",
    "ConsoleContext",
    "category_of",
    "ensure_admin_token",
    "groups_of",
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
    (r"/requests", investigate.RequestLog),
    (r"/request", investigate.RequestDetail),
    (r"/timeline", investigate.Timeline),
    (r"/reports", reports.Reports),
    (r"/incidents", incidents.IncidentQueue),
    (r"/incident", incidents.Incident),
    (r"/events", records.EventLog),
    (r"/retention", records.Retention),
    (r"/exceptions", ex_pages.ExceptionQueue),
    (r"/exceptions/active", ex_pages.ActiveList),
    (r"/exceptions/history", ex_pages.HistoryList),
    (r"/exceptions/grant", ex_pages.GrantForm),
    (r"/exceptions/([^/]+)", ex_pages.ExceptionDetail),
    (r"/exceptions/([^/]+)/approve", ex_pages.ApproveForm),
    (r"/exceptions/([^/]+)/deny", ex_pages.DenyForm),
    (r"/exceptions/([^/]+)/revoke", ex_pages.RevokeForm),
    (r"/api/v1/requests", api.Requests),
    (r"/api/v1/request", audit_api.RequestApi),
    (r"/api/v1/timeline", audit_api.TimelineApi),
    (r"/api/v1/report", audit_api.ReportApi),
    (r"/api/v1/incidents", audit_api.IncidentsApi),
    (r"/api/v1/incident", audit_api.IncidentApi),
    (r"/api/v1/retention", audit_api.RetentionApi),
    (r"/api/v1/exceptions", ex_api.ExceptionsCollection),
    (r"/api/v1/exceptions/([^/]+)", ex_api.ExceptionItem),
    (r"/api/v1/exceptions/([^/]+)/approve", ex_api.ApproveApi),
    (r"/api/v1/exceptions/([^/]+)/deny", ex_api.DenyApi),
    (r"/api/v1/exceptions/([^/]+)/revoke", ex_api.RevokeApi),
    (r"/api/v1/exceptions/([^/]+)/request", ex_api.BlockedRequestApi),
    (r"/api/v1/openapi.json", ex_api.OpenApi),
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
