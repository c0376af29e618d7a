"""Identity adapter: who is asking, decided once per CONNECT, request and tunnel and recorded
on the flow (``FlowState.who``); everything after reads it from there."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import connection, http, tcp

from egress_guard.core.decision import ALLOW
from egress_guard.core.identity import Who, identify

from ..flows import STATE, FlowState, client_ip, proxyauth_user

if TYPE_CHECKING:
    from . import Runtime


class Identity:
    """Who is asking: mitmproxy's proxyauth user, else the client network's identity from the
    policy. Requests inside a tunnel are whoever opened the CONNECT."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _who(self, flow: http.HTTPFlow) -> Who:
        user = proxyauth_user(flow)
        if user is None and (tunnel := self.rt.tunnels.get(flow.client_conn.id)):
            return tunnel.who
        return identify(client_ip(flow.client_conn), user, self.rt.policy)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata[STATE] = FlowState(self._who(flow), ALLOW)
        self.rt.tunnels[flow.client_conn.id] = state

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.metadata[STATE] = FlowState(self._who(flow), ALLOW)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        tunnel = self.rt.tunnels.get(flow.client_conn.id)
        who = tunnel.who if tunnel else identify(client_ip(flow.client_conn), None, self.rt.policy)
        flow.metadata[STATE] = FlowState(who, tunnel.decision if tunnel else ALLOW)

    def client_disconnected(self, client: connection.Client) -> None:
        self.rt.tunnels.pop(client.id, None)
