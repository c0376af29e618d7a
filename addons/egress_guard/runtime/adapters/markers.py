"""Markers adapter: secret-marker scanning of request bodies and client WebSocket messages."""

from __future__ import annotations

import codecs
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from mitmproxy import http, websocket

from egress_guard import metrics
from egress_guard.core.decode import looks_binary
from egress_guard.core.hosts import normalize_host
from egress_guard.core.scan import MarkerPolicy, ScanResult, StreamScanner

from .. import bodygate
from ..flows import STATE, FlowState, marker_response

if TYPE_CHECKING:
    from . import Runtime


class ScanGate:
    """Watches a streamed body for markers: its raw text as it passes (a marker there stops
    the upload at once), and a copy up to ``max_body`` for the full decode at the end."""

    hold_last = True  # the upstream gets the last chunk only after the end-of-body verdict

    def __init__(self, policy: MarkerPolicy, on_found: Callable[[set[int]], http.Response | None]):
        self.policy = policy
        self.on_found = on_found
        self.buffer: bytearray | None = bytearray()
        self.stream: StreamScanner | None = StreamScanner(policy.markers)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> http.Response | None:
        if self.buffer is not None:
            self.buffer += data
            if len(self.buffer) <= self.policy.limits.max_body:
                return None  # decoded and scanned whole at the end, off the event loop
            # Too big to decode whole: from here on only its raw text is scanned, as it
            # passes (binary has none), and the verdict at the end is `unscannable`.
            buffered, self.buffer = self.buffer, None
            if looks_binary(bytes(buffered[:8192])):
                self.stream = None
                return None
            for at in range(0, len(buffered), self.SLICE):  # bounded memory per step
                found = self._scan(bytes(buffered[at : at + self.SLICE]))
                if found is not None:
                    return found
            return None
        return self._scan(data) if self.stream is not None else None

    SLICE = 256 * 1024

    def _scan(self, data: bytes) -> http.Response | None:
        assert self.stream is not None
        new = self.stream.feed(self.decoder.decode(data))
        return self.on_found(self.stream.found) if new else None


class Markers:
    """Secret-marker scanning of request bodies and client WebSocket messages: buffered
    bodies when complete, streamed ones as they pass and again, whole, at their end."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _policy(self, flow: http.HTTPFlow) -> tuple[FlowState, MarkerPolicy] | None:
        state: FlowState | None = flow.metadata.get(STATE)
        policy = self.rt.policy.markers
        if state is None or not policy.active or state.decision.verdict == "block":
            return None
        return state, policy

    def _apply(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        policy: MarkerPolicy,
        found: set[int],
        unscannable: str = "",
    ) -> http.Response | None:
        """Record the verdict on the flow; the block page when it blocks."""
        who = state.who
        verdict = policy.verdict(
            found,
            unscannable,
            who.user,
            who.groups,
            normalize_host(flow.request.host),
            state.decision.category,
        )
        category = state.decision.category
        for hit in verdict.hits:
            metrics.MARKER_MATCHES.labels(hit.level, category).inc()
        metrics.SCAN_VERDICTS.labels(verdict.action or "clean").inc()
        if verdict.action in ("", "log") and not verdict.hits:
            return None
        kind = (
            "block"
            if verdict.action == "block"
            else ("alert" if verdict.action == "alert" else state.decision.verdict)
        )
        if kind == "alert":
            metrics.MARKER_ALERTS.labels(verdict.level).inc()
        state.decision = replace(state.decision, verdict=kind, reason_kind="marker", scan=verdict)
        if kind == "block":
            return marker_response(flow, state, verdict, self.rt.clock())
        return None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.request.stream:
            return  # refused already, or buffered: scanned whole in `request`
        found = self._policy(flow)
        if found is None:
            return
        state, policy = found
        bodygate.add_gate(
            flow, ScanGate(policy, lambda f: self._refuse_now(flow, state, policy, f))
        )

    def _refuse_now(
        self, flow: http.HTTPFlow, state: FlowState, policy: MarkerPolicy, found: set[int]
    ) -> http.Response | None:
        """Mid-stream: stop at once for a blocking marker; alerts wait for the end."""
        who = state.who
        verdict = policy.verdict(
            found,
            "",
            who.user,
            who.groups,
            normalize_host(flow.request.host),
            state.decision.category,
        )
        if verdict.action != "block":
            return None
        return self._apply(flow, state, policy, found)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response is not None or flow.request.stream:
            return None
        found = self._policy(flow)
        if found is None or not flow.request.raw_content:
            return None  # nothing to scan: no coroutine on the hot path
        return self._scan_buffered(flow, *found)

    async def _scan_buffered(
        self, flow: http.HTTPFlow, state: FlowState, policy: MarkerPolicy
    ) -> None:
        body = flow.request.raw_content
        assert body is not None
        headers = flow.request.headers
        result = await self.rt.scans.scan(
            policy, body, headers.get("content-type", ""), headers.get("content-encoding", "")
        )
        refusal = self._apply(flow, state, policy, result.found, result.unscannable)
        if refusal is not None:
            flow.response = refusal

    async def egress_body_end(self, flow: http.HTTPFlow) -> None:
        gate = next((g for g in bodygate.gates_of(flow) if isinstance(g, ScanGate)), None)
        found = self._policy(flow)
        if gate is None or found is None:
            return
        state, policy = found
        if gate.buffer is None:
            result = ScanResult(
                set(gate.stream.found) if gate.stream else set(),
                f"body over {policy.limits.max_body} bytes: only its text was scanned",
            )
        else:
            headers = flow.request.headers
            result = await self.rt.scans.scan(
                policy,
                gate.buffer,
                headers.get("content-type", ""),
                headers.get("content-encoding", ""),
            )
            gate.buffer = None
        refusal = self._apply(flow, state, policy, result.found, result.unscannable)
        if refusal is not None:
            bodygate.refuse_at_end(flow, refusal)

    def websocket_message(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A client message, complete and not yet forwarded: scanned (a coroutine), or None
        when there is nothing to scan."""
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        found = self._policy(flow)
        if found is None or not message.from_client or message.dropped or found[0].ws_cut:
            return None
        return self._scan_message(flow, message, *found)

    async def _scan_message(
        self,
        flow: http.HTTPFlow,
        message: websocket.WebSocketMessage,
        state: FlowState,
        policy: MarkerPolicy,
    ) -> None:
        result = await self.rt.scans.scan(policy, message.content, "", "")
        if self._apply(flow, state, policy, result.found, result.unscannable) is not None:
            state.ws_cut = True
            bodygate.cut_websocket(flow, message)
