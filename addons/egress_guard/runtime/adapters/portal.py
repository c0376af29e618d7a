"""Portal adapter: answers the reserved portal host (``portal.PORTAL_HOST``) itself — the
employees' exception requests and their status page — before any other adapter sees the
request, so it is never forwarded, never blocked and never held."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http

from egress_guard.core.hosts import normalize_host

from ..blockpage import _CSS
from ..flows import STATE, FlowState, client_ip
from ..portal import PORTAL_HOST, render

if TYPE_CHECKING:
    from . import Runtime

_PORTAL = "egress_guard.portal"
MAX_FORM = 64 * 1024
_TITLES_ZH = {
    "Request sent": "申请已提交",
    "My exception requests": "我的例外申请",
    "Form refused": "表单无效",
    "Form expired": "表单已过期",
    "Already requested": "已经申请过",
    "Reason needed": "需要填写理由",
    "Size needed": "需要填写大小",
    "Request refused": "申请被拒绝",
    "Not found": "未找到",
}


class Portal:
    def __init__(self, rt: Runtime):
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> bool:
        """True when the request is the portal's: it is answered here (a GET now, a form
        when its body is in), and the other adapters leave it alone."""
        if normalize_host(flow.request.host) != PORTAL_HOST or self.rt.portal is None:
            return False
        flow.metadata[_PORTAL] = True
        req = flow.request
        if req.method == "POST" and req.path.split("?")[0] == "/request":
            length = req.headers.get("content-length", "")
            if not length.isdigit() or int(length) > MAX_FORM:
                self._answer(flow, 413, "Form refused", "The form is too large.")
            return True  # the form's body comes next: answered in `request`
        if req.method == "GET" and req.path.split("?")[0] == "/":
            state: FlowState = flow.metadata[STATE]
            requests = self.rt.portal.own_requests(state.who.user, client_ip(flow.client_conn))
            self._answer(flow, 200, "My exception requests", "", requests)
        else:
            self._answer(flow, 404, "Not found", "The portal has no such page.")
        return True

    def request(self, flow: http.HTTPFlow) -> bool:
        if not flow.metadata.get(_PORTAL):
            return False
        if flow.response is None:
            assert self.rt.portal is not None
            state: FlowState = flow.metadata[STATE]
            form = {k: v for k, v in flow.request.urlencoded_form.items()}
            status, title, message = self.rt.portal.submit(
                form, state.who.user, state.who.groups, client_ip(flow.client_conn)
            )
            self._answer(flow, status, title, message)
        return True

    @staticmethod
    def _answer(
        flow: http.HTTPFlow, status: int, title: str, message: str, requests: list | None = None
    ) -> None:
        page = render(
            "portal_page.html",
            title=title,
            title_zh=_TITLES_ZH.get(title, title),
            message=message,
            requests=requests,
            host=PORTAL_HOST,
            css=_CSS,
        )
        flow.response = http.Response.make(
            status,
            page,
            {
                "Content-Type": "text/html; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                "X-Frame-Options": "DENY",
            },
        )
