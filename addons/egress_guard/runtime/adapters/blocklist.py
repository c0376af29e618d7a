"""Blocklist adapter: carries out blocklist decisions at CONNECT, at the start of a tunnel, at
request headers and before any upstream connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http, tls
from mitmproxy.proxy import layers, server_hooks
from mitmproxy.proxy.layers.tls import parse_client_hello

from egress_guard.core.decision import (
    Decision,
    RequestFacts,
    decide,
    is_passthrough,
    needs_interception,
)

from .. import bodygate
from ..flows import STATE, FlowState, blocked_response, request_hosts

if TYPE_CHECKING:
    from . import Runtime


class Blocklist:
    """Carries out blocklist decisions at CONNECT, at the start of a tunnel, at request headers
    and, as the last line, before any upstream connection."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _decide(self, flow: http.HTTPFlow, path: str | None) -> Decision:
        state: FlowState = flow.metadata[STATE]
        facts = RequestFacts(
            request_hosts(flow), path, flow.request.method, state.who.user, state.who.groups
        )
        state.decision = decide(facts, self.rt.policy)
        return state.decision

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A blocked CONNECT is still answered 200: the TLS session is then terminated here
        # (certificate from the SNI, no upstream) so the browser can show the block page.
        self._decide(flow, None)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """The SNI is a new fact about the tunnel: decide it again with it (a CONNECT to an
        address may name a blocked host in its ClientHello)."""
        tunnel = self.rt.tunnels.get(data.context.client.id)
        sni = data.client_hello.sni
        if tunnel is None or not sni or tunnel.decision.verdict == "block":
            return
        address = data.context.server.address
        hosts = (address[0], sni) if address else (sni,)
        tunnel.decision = decide(RequestFacts(hosts, None), self.rt.policy)

    def next_layer(self, nextlayer: layers.NextLayer) -> None:
        """Pass-through hosts (pinned apps): relay the tunnel as raw TCP, uninspected but
        counted (a TCP flow, so its client→server bytes meet the upload window).

        mitmproxy's own next-layer addon may run before this one (``egress-guard run``) or
        after it (``mitmdump -s``): either nothing is chosen yet, or it has just chosen TLS
        interception for the inside of a CONNECT tunnel."""
        if not self.rt.policy.passthrough.rule_count:
            return
        context = nextlayer.context
        stack = context.layers
        proposed = nextlayer.layer
        if proposed is None:
            base = len(stack)
        elif isinstance(proposed, layers.ServerTLSLayer) and proposed in stack:
            base = stack.index(proposed)
        else:
            return
        if not base or not isinstance(stack[base - 1], layers.http.HttpStream):
            return  # only the inside of a CONNECT tunnel
        if not context.server.address:
            return
        try:
            client_hello = parse_client_hello(nextlayer.data_client())
        except ValueError:
            return  # not TLS: decided per request
        if client_hello is None:
            return  # not all of the ClientHello yet
        hosts = tuple(h for h in (context.server.address[0], client_hello.sni) if h)
        policy = self.rt.policy
        if decide(RequestFacts(hosts, None), policy).verdict == "block":
            return
        if needs_interception(hosts, policy) or not any(is_passthrough(h, policy) for h in hosts):
            return
        del stack[base:]  # drop the TLS layers mitmproxy had stacked for interception
        nextlayer.layer = layers.TCPLayer(context)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        decision = self._decide(flow, flow.request.path)
        if decision.verdict == "block" and flow.response is None:  # keep proxyauth's 407
            state: FlowState = flow.metadata[STATE]
            bodygate.refuse_at_headers(flow, blocked_response(flow, state, self.rt.clock()))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if not address:
            return
        decision = decide(RequestFacts((address[0], data.server.sni or ""), None), self.rt.policy)
        if decision.verdict == "block":
            data.server.error = f"egress-guard: {address[0]} is blocked by rule {decision.rule_id}"
