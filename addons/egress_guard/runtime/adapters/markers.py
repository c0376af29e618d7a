"""Markers adapter: secret-marker scanning of request bodies and client WebSocket messages.

A body is held (``bodygate``) and scanned whole — every decoding, off the event loop when it is
large — in ``request``, before any of it is forwarded. One that outgrows the hold cannot be
decoded whole: its verdict is ``unscannable`` and the policy decides at that moment; if the
policy lets it through, its raw text is scanned as it streams and a blocking marker cuts it.
"""

from __future__ import annotations

import codecs
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mitmproxy import http, websocket

from egress_guard import metrics
from egress_guard.core.channels import head_findings
from egress_guard.core.decode import looks_binary
from egress_guard.core.exceptions import UNSCANNABLE, ActiveException, Control
from egress_guard.core.exceptions import marker as marker_control
from egress_guard.core.hosts import normalize_host
from egress_guard.core.scan import (
    ACTION_RANK,
    MarkerPolicy,
    ScanResult,
    StreamScanner,
    Verdict,
)

from .. import bodygate
from ..flows import STATE, FlowState, client_ip, marker_response
from ..heldbody import HeldBody

if TYPE_CHECKING:
    from . import Runtime


class ScanGate:
    """The body gate for markers. While the body is held it has nothing to do (the whole body
    is scanned at its end); when the body outgrows the hold it gives the ``unscannable``
    verdict and, if that lets the body stream, scans its raw text as it passes."""

    def __init__(self, markers: Markers, flow: http.HTTPFlow, state: FlowState):
        self.markers = markers
        self.flow = flow
        self.state = state
        self.stream: StreamScanner | None = None
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.unscannable = ""

    def feed(self, data: bytes) -> http.Response | None:
        return None if self.stream is None else self._scan(data)

    def overflow(self, held: HeldBody) -> http.Response | None:
        policy = self.markers.rt.policy.markers
        self.unscannable = (
            f"body over {policy.limits.max_body} bytes: only its text was scanned as it passed"
        )
        verdict = self.markers.verdict(self.flow, self.state, policy, set(), self.unscannable)
        if verdict.action == "block":
            return self.markers.apply(self.flow, self.state, verdict)
        first = next(held.chunks(), b"")
        if looks_binary(first[:8192]):
            return None  # no text to scan as it streams
        self.stream = StreamScanner(policy.markers)
        for chunk in held.chunks():  # what is held goes out first: scan it first
            refusal = self._scan(chunk)
            if refusal is not None:
                return refusal
        return None

    def _scan(self, data: bytes) -> http.Response | None:
        assert self.stream is not None
        if not self.stream.feed(self.decoder.decode(data)):
            return None
        policy = self.markers.rt.policy.markers
        verdict = self.markers.verdict(self.flow, self.state, policy, self.stream.found)
        if verdict.action != "block":
            return None  # alerts are recorded with the end-of-body verdict
        return self.markers.apply(self.flow, self.state, verdict)

    def result(self) -> ScanResult:
        return ScanResult(set(self.stream.found) if self.stream else set(), self.unscannable)


class Markers:
    """Secret-marker scanning of request bodies and client WebSocket messages, each judged
    before it is forwarded."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _policy(self, flow: http.HTTPFlow) -> tuple[FlowState, MarkerPolicy] | None:
        state: FlowState | None = flow.metadata.get(STATE)
        policy = self.rt.policy.markers
        if state is None or not policy.active or state.decision.verdict == "block":
            return None
        return state, policy

    def verdict(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        policy: MarkerPolicy,
        found: set[int],
        unscannable: str = "",
    ) -> Verdict:
        """What the policy says of what a scan found, for this user and destination, with an
        approved exception's lowered action in force for the levels (or the unscannable
        verdict) it covers."""
        host = normalize_host(flow.request.host)
        who, category = state.who, state.decision.category
        verdict = policy.verdict(found, unscannable, who.user, who.groups, host, category)
        if verdict.action != "block" or not len(self.rt.exceptions):
            return verdict

        def lifted(control: Control) -> ActiveException | None:
            return self.rt.exceptions.find(
                who.user,
                who.groups,
                client_ip(flow.client_conn),
                control,
                host,
                flow.request.path,
                category,
                state.decision.rule_id,
                self.rt.now_ms(),
            )

        used = ""
        hits = []
        for hit in verdict.hits:
            if hit.action == "block" and (ex := lifted(marker_control(hit.level))):
                hit, used = replace(hit, action=ex.lowered_to), ex.id  # type: ignore[arg-type]
            hits.append(hit)
        rest = policy.verdict(set(), unscannable, who.user, who.groups, host, category).action
        if rest == "block" and (ex := lifted(UNSCANNABLE)):
            rest, used = ex.lowered_to, ex.id  # type: ignore[assignment]
        action = max((h.action for h in hits), key=ACTION_RANK.__getitem__, default="")
        action = max(action, rest, key=ACTION_RANK.__getitem__)
        if not used or action == "block":
            return verdict  # lifted nothing that decides: the request does not pass by it
        control = "unscannable" if tuple(hits) == verdict.hits else "marker"
        metrics.EXCEPTION_USES.labels(control).inc()
        return replace(verdict, action=action, hits=tuple(hits), exception_id=used)  # type: ignore[arg-type]

    def apply(
        self, flow: http.HTTPFlow, state: FlowState, verdict: Verdict
    ) -> http.Response | None:
        """Record the verdict on the flow (and in the metrics, each hit once per flow); the
        block page when it blocks."""
        category = state.decision.category
        counted = {h.marker_id for h in state.decision.scan.hits} if state.decision.scan else set()
        for hit in verdict.hits:
            if hit.marker_id not in counted:
                metrics.MARKER_MATCHES.labels(hit.level, category).inc()
        metrics.SCAN_VERDICTS.labels(verdict.action or "clean").inc()
        if verdict.action in ("", "log") and not verdict.hits:
            return None
        if verdict.action == "block":
            kind = "block"
        elif verdict.action == "alert":
            kind = "alert"
            metrics.MARKER_ALERTS.labels(verdict.level).inc()
        else:
            kind = state.decision.verdict
        state.decision = replace(
            state.decision,
            verdict=kind,
            reason_kind="marker",
            scan=verdict,
            exception_id=verdict.exception_id or state.decision.exception_id,
        )
        if kind == "block":
            return marker_response(flow, state, verdict, self.rt.clock(), self.rt.portal)
        return None

    def _judge(self, flow: http.HTTPFlow, state: FlowState, result: ScanResult) -> None:
        """The verdict on the body's scan, its trailers (held with it, sent after it) and its
        head (an alert there is kept; a block there never got this far)."""
        found = result.found
        unscannable = result.unscannable
        if state.head is not None:
            found = found | state.head.markers
            unscannable = unscannable or state.head.unscannable
        if flow.request.trailers:  # decoded as a server would a header (percent, base64…)
            trailers = head_findings(
                self.rt.policy.markers.markers, "", flow.request.trailers.items(multi=True)
            )
            found = found | trailers.markers
            unscannable = unscannable or trailers.unscannable
        verdict = self.verdict(flow, state, self.rt.policy.markers, found, unscannable)
        refusal = self.apply(flow, state, verdict)
        if refusal is not None:
            flow.response = refusal  # bodygate answers it; nothing of the body has left

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """The head first (path, query, headers, cookies: refused here, before any upstream
        contact, when they carry a blocking marking), then the body is held for its scan."""
        found = self._policy(flow)
        if flow.response is not None or found is None:
            return  # refused already, or nothing to scan for
        state, policy = found
        req = flow.request
        head = state.head = head_findings(policy.markers, req.path, req.headers.items(multi=True))
        if head.found or head.unscannable:
            verdict = self.verdict(flow, state, policy, head.markers, head.unscannable)
            refusal = self.apply(flow, state, verdict)
            if refusal is not None:
                bodygate.refuse_at_headers(flow, refusal)
                return
        if bodygate.declared_length(req) != 0:
            bodygate.add_gate(flow, ScanGate(self, flow, state), self.rt.hold)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        """Control frames (ping, pong, a close reason) carry up to 125 bytes each way, past the
        message hook: the client's are judged before they are relayed."""
        found = self._policy(flow)
        if found is None:
            return
        state, policy = found

        def refuses(payload: bytes) -> bool:
            text = payload.decode("utf-8", "replace")
            verdict = self.verdict(flow, state, policy, policy.markers.find(text))
            if self.apply(flow, state, verdict) is None:
                return False
            state.ws_cut = True
            return True

        bodygate.watch_control_frames(flow, refuses)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The body is complete and none of it forwarded (or, past its hold, streamed): its
        verdict. A coroutine when there is something to scan, None otherwise."""
        if flow.response is not None:
            return None
        found = self._policy(flow)
        if found is None:
            return None
        state, _ = found
        gate = next((g for g in bodygate.gates_of(flow) if isinstance(g, ScanGate)), None)
        if gate is not None and bodygate.streamed(flow):
            self._judge(flow, state, gate.result())
            return None
        held = bodygate.held_body(flow)
        if held is not None:
            if held.size:
                return self._scan(flow, state, held.content())
            if flow.request.trailers:
                self._judge(flow, state, ScanResult(set()))
            return None
        body = flow.request.raw_content  # a body no gate held (none should reach here)
        return self._scan(flow, state, body) if body else None

    async def _scan(self, flow: http.HTTPFlow, state: FlowState, body: bytes | Path) -> None:
        headers = flow.request.headers
        result = await self.rt.scans.scan(
            self.rt.policy.markers,
            body,
            headers.get("content-type", ""),
            headers.get("content-encoding", ""),
        )
        self._judge(flow, state, result)

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
        verdict = self.verdict(flow, state, policy, result.found, result.unscannable)
        if self.apply(flow, state, verdict) is not None:
            state.ws_cut = True
            bodygate.cut_websocket(flow, message, bodygate.WS_POLICY_VIOLATION)
