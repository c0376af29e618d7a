"""Uploads adapter: per-request and per-user upload caps for bodies, WebSocket messages and
pass-through tunnels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from mitmproxy import http, tcp

from egress_guard.core.hosts import normalize_host
from egress_guard.core.upload import CapHit, Limits, UploadGate, check, limits_for

from .. import bodygate
from ..flows import PASSTHROUGH, STATE, FlowState, cap_response, window_key
from ..heldbody import HeldBody

if TYPE_CHECKING:
    from . import Runtime


class CapGate:
    """The body gate for upload caps: counts each chunk, a refusal when it crosses a cap."""

    def __init__(self, counter: UploadGate, refuse: Callable[[CapHit], http.Response]):
        self.counter = counter
        self.refuse = refuse

    def feed(self, data: bytes) -> http.Response | None:
        hit = self.counter.feed(data)
        return None if hit is None else self.refuse(hit)

    def overflow(self, held: HeldBody) -> None:
        """Caps do not mind a large body: they keep counting it as it streams."""


class Uploads:
    """Upload caps: per request and per user window, for request bodies, WebSocket messages
    and pass-through tunnels. Decided at the headers when the size is announced, counted as
    the bytes stream otherwise."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _limits(self, state: FlowState, host: str) -> Limits:
        who = state.who
        return limits_for(
            self.rt.policy.uploads, who.user, who.groups, host, state.decision.category
        )

    def _refuse(self, flow: http.HTTPFlow, state: FlowState, hit: CapHit) -> http.Response:
        state.decision = replace(state.decision, verdict="block", reason_kind="upload_cap", cap=hit)
        return cap_response(flow, state, hit, self.rt.clock())

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or flow.response is not None:  # already refused
            return
        limits = state.limits = self._limits(state, normalize_host(flow.request.host))
        key = window_key(state.who, flow.client_conn)
        declared = state.declared = bodygate.declared_length(flow.request)
        windows = self.rt.windows
        reserved = 0
        if declared:
            hit = check(limits, declared, windows.used(key) if limits.per_user is not None else 0)
            if hit is not None:
                bodygate.refuse_at_headers(flow, self._refuse(flow, state, hit))
                return
            if limits.per_user is not None:
                windows.add(key, declared)
                state.window_bytes = reserved = declared
        if declared != 0 and (limits.per_request is not None or limits.per_user is not None):
            # Counted chunk by chunk as it arrives, and held until its verdict (bodygate).
            state.gate = UploadGate(limits, windows, key, reserved)
            refuse = CapGate(state.gate, lambda hit: self._refuse(flow, state, hit))
            bodygate.add_gate(flow, refuse, self.rt.hold)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        state: FlowState | None = flow.metadata.get(STATE)
        message = flow.websocket.messages[-1]
        if state is None or not message.from_client or state.limits is None:
            return
        if state.ws_cut:
            message.drop()
            return
        size = len(message.content)
        key = window_key(state.who, flow.client_conn)
        limits = state.limits
        used = self.rt.windows.used(key) if limits.per_user is not None else 0
        hit = check(limits, size, used)
        if hit is not None:
            state.ws_cut = True
            state.decision = replace(
                state.decision, verdict="block", reason_kind="upload_cap", cap=hit
            )
            bodygate.cut_websocket(flow, message)
        elif limits.per_user is not None:
            self.rt.windows.add(key, size)
            state.window_bytes += size

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        state: FlowState = flow.metadata[STATE]
        if state.decision.verdict == "block":
            return  # refused before it opens (blocklist): nothing to count
        host = normalize_host(flow.server_conn.address[0]) if flow.server_conn.address else ""
        state.limits = limits = self._limits(state, host)
        if flow.metadata.get(PASSTHROUGH):
            # A pinned app's TLS session is many requests: only the user's window applies,
            # not the per-request cap.
            limits = Limits(None, limits.per_user, limits.window_seconds, "", limits.per_user_id)
        # Non-HTTP bytes to a raw-TCP host are one upload, held to both caps.
        state.gate = UploadGate(limits, self.rt.windows, window_key(state.who, flow.client_conn))
        bodygate.add_gate(flow, CapGate(state.gate, self._tunnel_refused(state)))

    @staticmethod
    def _tunnel_refused(state: FlowState) -> Callable[[CapHit], http.Response]:
        def refuse(hit: CapHit) -> http.Response:
            state.decision = replace(
                state.decision, verdict="block", reason_kind="upload_cap", cap=hit
            )
            return http.Response.make(413)  # never sent: a tunnel has no HTTP answer

        return refuse
