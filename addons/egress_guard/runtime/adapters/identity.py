"""Identity adapter: who is asking, for every CONNECT, request and tunnel."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http, tcp

from egress_guard.core.decision import ALLOW
from egress_guard.core.identity import Who, identify

from ..flows import STATE, FlowState, client_ip, proxyauth_user

if TYPE_CHECKING:
    from ..gateway import Gateway


class Identity:
    """Who is asking, for every CONNECT and request."""

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def _who(self, flow: http.HTTPFlow) -> Who:
        user = proxyauth_user(flow)
        if user is None and (known := self.gw.connect_who.get(flow.client_conn.id)):
            return known
        return identify(client_ip(flow.client_conn), user, self.gw.policy)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        who = self._who(flow)
        self.gw.connect_who[flow.client_conn.id] = who
        flow.metadata[STATE] = FlowState(who, ALLOW)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.metadata[STATE] = FlowState(self._who(flow), ALLOW)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        who = self.gw.connect_who.get(flow.client_conn.id) or identify(
            client_ip(flow.client_conn), None, self.gw.policy
        )
        flow.metadata[STATE] = FlowState(who, ALLOW)
