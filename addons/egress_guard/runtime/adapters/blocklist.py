"""Blocklist adapter: where a request may go — the blocklists, the gateway's own sockets and
internal addresses, tunnels that carry something other than HTTP — decided at CONNECT, at the
start of a tunnel, at request headers and on every upstream connection."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING

from mitmproxy import connection, http, tcp, tls
from mitmproxy.proxy import layers, server_hooks
from mitmproxy.proxy.layers.tls import parse_client_hello

from egress_guard import metrics
from egress_guard.core.decision import (
    Decision,
    RequestFacts,
    decide,
    decide_destination,
    decide_raw_tunnel,
    decide_tunnel_target,
    is_passthrough,
    needs_interception,
)
from egress_guard.core.exceptions import BLOCK
from egress_guard.core.identity import identify

from .. import bodygate
from ..flows import (
    PASSTHROUGH,
    STATE,
    FlowState,
    blocked_response,
    client_ip,
    request_hosts,
    tunnel_hosts,
)

if TYPE_CHECKING:
    from . import Runtime


def _inside_tunnel(nextlayer: layers.NextLayer, chosen: type) -> int | None:
    """Where in the layer stack the inside of a CONNECT tunnel starts, when nothing is chosen
    for it yet or mitmproxy's next-layer addon has just chosen ``chosen`` (a layer adds itself
    to the stack when it is made, so it is there already); None otherwise."""
    stack, proposed = nextlayer.context.layers, nextlayer.layer
    if proposed is None:
        base = len(stack)
    elif isinstance(proposed, chosen) and proposed in stack:
        base = stack.index(proposed)
    else:
        return None
    if not base or not isinstance(stack[base - 1], layers.http.HttpStream):
        return None
    return base


class Blocklist:
    """Where a request may go: the blocklists, and the places the gateway never forwards to
    (its own sockets, internal addresses, a request target that disagrees with its tunnel).
    Decided at CONNECT, at the start of a tunnel, at request headers and, as the last line,
    on the address each upstream connection is made to."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        # client connection → (host, exception id) its last request passed by: the upstream
        # connection opened for it is let through the last-line check below
        self._excepted: dict[str, tuple[str, str]] = {}

    def client_disconnected(self, client: connection.Client) -> None:
        self._excepted.pop(client.id, None)

    def _reachable(self, flow: http.HTTPFlow, host: str, port: int) -> Awaitable[None] | None:
        """Refuse a destination the gateway never forwards to: now when the answer is known
        (an address, or a name resolved lately), else after resolving it (a coroutine)."""
        state: FlowState = flow.metadata[STATE]
        if state.decision.verdict == "block":
            return None
        rules = self.rt.policy.destinations
        known, refusal = self.rt.destinations.check_now(host, port, rules)
        if known:
            if refusal is not None:
                state.decision = decide_destination(refusal, host)
            return None
        return self._resolve_then_judge(state, host, port)

    async def _resolve_then_judge(self, state: FlowState, host: str, port: int) -> None:
        refusal, _ = await self.rt.destinations.check(host, port, self.rt.policy.destinations)
        if refusal is not None:
            state.decision = decide_destination(refusal, host)

    def _decide(self, flow: http.HTTPFlow, path: str | None) -> Decision:
        """The blocklists' decision, recorded on the flow; an approved exception that lifts
        the rule which blocks it lets it through (``exception``, its id on the row)."""
        state: FlowState = flow.metadata[STATE]
        who = state.who
        facts = RequestFacts(request_hosts(flow), path, flow.request.method, who.user, who.groups)
        decision = decide(facts, self.rt.policy)
        if decision.verdict == "block" and len(self.rt.exceptions):
            found = self.rt.exceptions.find(
                who.user,
                who.groups,
                client_ip(flow.client_conn),
                BLOCK,
                decision.host,
                path,
                decision.category,
                decision.rule_id,
                self.rt.now_ms(),
            )
            if found is not None:
                metrics.EXCEPTION_USES.labels("block").inc()
                self._excepted[flow.client_conn.id] = (decision.host, found.id)
                decision = replace(
                    decision, verdict="allow", reason_kind="exception", exception_id=found.id
                )
        state.decision = decision
        return decision

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # A blocked CONNECT is still answered 200: the TLS session is then terminated here
        # (certificate from the SNI, no upstream) so the browser can show the block page.
        self._decide(flow, None)
        return self._reachable(flow, flow.request.host, flow.request.port)

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
        self._dns_as_raw_tcp(nextlayer)
        if not self.rt.policy.passthrough.rule_count:
            return
        context = nextlayer.context
        base = _inside_tunnel(nextlayer, layers.ServerTLSLayer)
        if base is None or not context.server.address:
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
        del context.layers[base:]  # drop the TLS layers mitmproxy stacked for interception
        relay = layers.TCPLayer(context)
        assert relay.flow is not None
        relay.flow.metadata[PASSTHROUGH] = True
        nextlayer.layer = relay

    @staticmethod
    def _dns_as_raw_tcp(nextlayer: layers.NextLayer) -> None:
        """mitmproxy would answer a tunnel to port 53 with its DNS layer, which relays the
        queries to the upstream with no hook of ours on the way: take it as raw TCP instead,
        so it is refused (or, to a raw-TCP host, relayed, counted and logged) like any other
        non-HTTP tunnel. Whichever next-layer addon runs first, this one decides."""
        context = nextlayer.context
        address = context.server.address
        if address is None or address[1] not in (53, 5353):
            return
        base = _inside_tunnel(nextlayer, layers.DNSLayer)
        if base is not None:
            del context.layers[base:]
            nextlayer.layer = layers.TCPLayer(context)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Raw TCP inside a tunnel that is not a pass-through: mitmproxy found no HTTP in it (a
        binary protocol, TLS without an HTTP ALPN). It cannot be scanned, so it is refused —
        before any upstream connection — unless the policy lists the host for raw TCP."""
        if flow.metadata.get(PASSTHROUGH):
            return
        state: FlowState = flow.metadata[STATE]
        refusal = state.decision if state.decision.verdict == "block" else None
        if refusal is None:
            refusal = decide_raw_tunnel(
                tunnel_hosts(flow.client_conn, flow.server_conn), self.rt.policy
            )
        if refusal is not None:
            state.decision = refusal
            flow.server_conn.error = f"egress-guard: tunnel refused by rule {refusal.rule_id}"

    def _lifted(self, client: connection.Client, decision: Decision) -> bool:
        """Is a blocked connection's host let through by an exception: the one the client's
        request just passed by, or one that covers the whole host for whoever this is."""
        excepted = self._excepted.get(client.id)
        if excepted is not None and excepted[0] == decision.host:
            return True
        if not len(self.rt.exceptions):
            return False
        tunnel = self.rt.tunnels.get(client.id)
        who = tunnel.who if tunnel else identify(client_ip(client), None, self.rt.policy)
        found = self.rt.exceptions.find(
            who.user,
            who.groups,
            client_ip(client),
            BLOCK,
            decision.host,
            None,
            decision.category,
            decision.rule_id,
            self.rt.now_ms(),
        )
        return found is not None

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The blocklists, then whether the destination may be reached at all (a coroutine
        when its name must be resolved first); ``refuse`` carries the decision out."""
        decision = self._decide(flow, flow.request.path)
        req = flow.request
        if (
            decision.verdict != "block"
            and req.authority
            and req.http_version.startswith("HTTP/1")
            and flow.client_conn.id in self.rt.tunnels
        ):
            # Absolute form inside a tunnel: the upstream routes by the URL's host.
            mismatch = decide_tunnel_target(req.authority, req.host)
            if mismatch is not None:
                flow.metadata[STATE].decision = mismatch
        return self._reachable(flow, req.host, req.port)

    def refuse(self, flow: http.HTTPFlow) -> None:
        """After ``requestheaders``: a blocked request gets its block page, with no upstream
        contact and without reading its body."""
        state: FlowState = flow.metadata[STATE]
        if state.decision.verdict == "block" and flow.response is None:  # keep proxyauth's 407
            refusal = blocked_response(flow, state, self.rt.clock(), self.rt.portal)
            bodygate.refuse_at_headers(flow, refusal)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """The last line, on every upstream connection: the blocklists for its address and
        SNI, and the addresses its name resolves to, now. mitmproxy then connects to exactly
        the addresses just checked (``resolver``), so a name that resolves elsewhere a moment
        later (DNS rebinding) reaches nothing it should not."""
        server = data.server
        if not server.address or server.via is not None:  # a parent proxy resolves itself
            return
        host, port = server.address[0], server.address[1]
        decision = decide(RequestFacts((host, server.sni or ""), None), self.rt.policy)
        if decision.verdict == "block" and not self._lifted(data.client, decision):
            server.error = f"egress-guard: {host} is blocked by rule {decision.rule_id}"
            return
        refusal, _ = await self.rt.destinations.check(host, port, self.rt.policy.destinations)
        if refusal is not None:
            server.error = (
                f"egress-guard: {host} ({refusal.address}) may not be reached through the "
                f"gateway (rule {refusal.rule_id})"
            )
