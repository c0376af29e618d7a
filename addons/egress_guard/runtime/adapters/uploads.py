"""Uploads adapter: per-request and per-user upload caps for bodies, WebSocket messages and
pass-through tunnels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from mitmproxy import http, tcp

from egress_guard import metrics
from egress_guard.core.exceptions import UPLOAD, raised_limits
from egress_guard.core.hosts import normalize_host
from egress_guard.core.upload import CapHit, Limits, UploadGate, check, limits_for

from .. import bodygate
from ..flows import PASSTHROUGH, STATE, FlowState, cap_response, client_ip, window_key
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

    def _limits(self, flow: http.HTTPFlow | tcp.TCPFlow, state: FlowState, host: str) -> Limits:
        """The caps in force: the policy's, raised to exactly what an approved upload
        exception grants (kept on the flow, to tell whether a request needed it)."""
        who = state.who
        base = limits_for(
            self.rt.policy.uploads, who.user, who.groups, host, state.decision.category
        )
        state.base_limits = base
        if not len(self.rt.exceptions):
            return base
        path = flow.request.path if isinstance(flow, http.HTTPFlow) else None
        found = self.rt.exceptions.find(
            who.user,
            who.groups,
            client_ip(flow.client_conn),
            UPLOAD,
            host,
            path,
            state.decision.category,
            state.decision.rule_id,
            self.rt.now_ms(),
        )
        if found is None:
            return base
        state.upload_exception = found.id
        return raised_limits(base, found)

    def _passed_by_exception(self, state: FlowState, size: int, window_before: int) -> None:
        """A request within the raised caps that the policy's own would have refused passed
        only because of the exception: its id goes on the row, and it is counted."""
        if not state.upload_exception or state.base_limits is None:
            return
        if check(state.base_limits, size, window_before) is None:
            return
        metrics.EXCEPTION_USES.labels("upload").inc()
        decision = state.decision
        state.decision = replace(
            decision,
            exception_id=state.upload_exception,
            reason_kind=decision.reason_kind or "exception",
        )

    def _refuse(self, flow: http.HTTPFlow, state: FlowState, hit: CapHit) -> http.Response:
        state.decision = replace(state.decision, verdict="block", reason_kind="upload_cap", cap=hit)
        return cap_response(flow, state, hit, self.rt.clock(), self.rt.portal)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or flow.response is not None:  # already refused
            return
        limits = state.limits = self._limits(flow, state, normalize_host(flow.request.host))
        key = window_key(state.who, flow.client_conn)
        declared = state.declared = bodygate.declared_length(flow.request)
        windows = self.rt.windows
        reserved = 0
        state.window_before = windows.used(key)
        if declared:
            hit = check(limits, declared, state.window_before if limits.per_user is not None else 0)
            if hit is not None:
                bodygate.refuse_at_headers(flow, self._refuse(flow, state, hit))
                return
            self._passed_by_exception(state, declared, state.window_before)
            if limits.per_user is not None:
                windows.add(key, declared)
                state.window_bytes = reserved = declared
        if declared != 0 and (limits.per_request is not None or limits.per_user is not None):
            # Counted chunk by chunk as it arrives, and held until its verdict (bodygate).
            state.gate = UploadGate(limits, windows, key, reserved)
            refuse = CapGate(state.gate, lambda hit: self._refuse(flow, state, hit))
            bodygate.add_gate(flow, refuse, self.rt.hold)

    def request(self, flow: http.HTTPFlow) -> None:
        """A held body is complete and within the caps in force: did it need an exception?"""
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or state.gate is None or flow.response is not None:
            return
        if not state.declared:  # an announced size was judged at the headers
            self._passed_by_exception(state, state.gate.seen, state.window_before)

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
        state.limits = limits = self._limits(flow, state, host)
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
