"""Audit adapter: one log row per CONNECT, request, WebSocket and tunnel; fail closed."""

from __future__ import annotations

import asyncio
import codecs
import uuid
from collections.abc import Awaitable
from concurrent.futures import Future
from dataclasses import replace
from typing import TYPE_CHECKING

from mitmproxy import connection, http, tcp, tls, websocket

from egress_guard import metrics
from egress_guard.core.decision import ALLOW
from egress_guard.core.hosts import normalize_host
from egress_guard.core.identity import Who, identify
from egress_guard.core.scan import TooManyCandidates
from egress_guard.requestlog.auditlog import RequestRow, bounded, utc_from_timestamp

from .. import bodygate
from ..flows import (
    PASSTHROUGH,
    STATE,
    FlowState,
    audit_unavailable_response,
    client_ip,
    header_bytes,
)

if TYPE_CHECKING:
    from ..protocol_errors import ProtocolErrorData
    from . import Runtime


REDACTABLE = ("path", "query", "user_agent", "content_type", "error")
REDACTED = "[redacted: carries a secret marking]"
HEAD_COLUMNS = {
    "path": "path",
    "query": "query",
    "header:user-agent": "user_agent",
    "header:content-type": "content_type",
}


def _unescaped(text: str) -> str:
    """A text and, when it holds backslash escapes (mitmproxy quotes a request line it could
    not parse as ``b'GET /\\xe6…'``), what they stand for, decoded as UTF-8."""
    if "\\x" not in text and "\\u" not in text:
        return text
    try:
        raw = codecs.escape_decode(text.encode("utf-8", "backslashreplace"))[0]
    except ValueError:  # a stray backslash: nothing escaped to look at
        return text
    return f"{text}\n{raw.decode('utf-8', 'replace')}"


def path_and_query(target: str) -> dict[str, str]:
    """The row's path and query columns from a request target, each bounded."""
    path, _, query = target.partition("?")
    return {"path": bounded(path, "path"), "query": bounded(query, "query")}


class Audit:
    """One row per CONNECT, request, WebSocket and failed or passed-through tunnel."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def _http_row(self, flow: http.HTTPFlow, state: FlowState | None, kind: str) -> RequestRow:
        req = flow.request
        resp = flow.response
        who = state.who if state else Who("")
        decision = state.decision if state else ALLOW
        end = (resp.timestamp_end if resp and resp.timestamp_end else None) or self.rt.clock()
        body = bodygate.received_bytes(flow)
        forwarded = bodygate.forwarded_bytes(flow)
        if body is None:  # not gated: mitmproxy buffered it (or there was none)
            body = len(req.raw_content) if req.raw_content else 0
            sent = decision.verdict != "block" and flow.server_conn.timestamp_start is not None
            forwarded = body if sent else 0
        first_line = len(req.method) + len(req.path) + len(req.http_version) + 4
        error = flow.error.msg if flow.error else ""
        if decision.scan and decision.scan.unscannable:
            error = f"unscannable: {decision.scan.unscannable}" + (f"; {error}" if error else "")
        row = RequestRow(
            ts=utc_from_timestamp(req.timestamp_start),
            request_id=flow.id,
            client_ip=client_ip(flow.client_conn),
            user=who.user,
            groups=list(who.groups),
            method=req.method,
            scheme=req.scheme,
            host=normalize_host(req.host),
            port=req.port,
            **path_and_query(req.path),
            http_version=req.http_version,
            kind=kind,
            status=resp.status_code if resp else (502 if error else 0),
            decision=decision.verdict,
            reason_kind=decision.reason_kind or ("error" if error else ""),
            rule_id=decision.rule_id,
            category=decision.category,
            exception_id=decision.exception_id,
            connection_id=flow.client_conn.id,
            request_bytes=header_bytes(req, first_line) + body,
            upload_bytes=body,
            response_bytes=len(resp.raw_content) if resp and resp.raw_content else 0,
            content_type=bounded(req.headers.get("content-type", ""), "content_type"),
            user_agent=bounded(req.headers.get("user-agent", ""), "user_agent"),
            duration_ms=max(0, int((end - req.timestamp_start) * 1000)),
            tls_intercepted=flow.client_conn.tls_established,
            error=bounded(error, "error"),
            marker_ids=[h.marker_id for h in decision.scan.hits] if decision.scan else [],
            marker_levels=[h.level for h in decision.scan.hits] if decision.scan else [],
            declared_bytes=(state.declared or 0) if state else 0,
            window_bytes=(state.window_bytes + (state.gate.counted if state.gate else 0))
            if state
            else 0,
            forwarded_bytes=forwarded or 0,
        )
        if state is not None and state.head is not None:
            for channel in state.head.found:  # found encoded, so the raw text may not show it
                if column := HEAD_COLUMNS.get(channel):
                    setattr(row, column, REDACTED)
        return row

    def _record(self, row: RequestRow) -> Future[None] | None:
        return self.rt.record(self._redact(row))

    def _redact(self, row: RequestRow) -> RequestRow:
        """The log keeps no text a marker matched: a free-text column that carries one (a
        marked query string, a path, a header, a file name in an error) is stored redacted.
        One pass over them all; a column at a time only when there is something."""
        markers = self.rt.policy.markers.markers
        texts = [_unescaped(getattr(row, name)) for name in REDACTABLE]
        try:
            if not markers.markers or not markers.find("\n".join(texts)):
                return row
            hits = [markers.find(text) for text in texts]
        except TooManyCandidates:  # built to stall the scanner: keep none of it
            for name in REDACTABLE:
                setattr(row, name, REDACTED)
            return row
        for name, found in zip(REDACTABLE, hits, strict=True):
            if found:
                setattr(row, name, REDACTED)
        if not row.marker_ids:  # e.g. a request mitmproxy refused that carried a marking
            carried = markers.hits(set().union(*hits))
            row.marker_ids = [h.marker_id for h in carried]
            row.marker_levels = [h.level for h in carried]
            if row.reason_kind in ("", "error") and carried:
                row.reason_kind, row.rule_id = "marker", carried[0].marker_id
        return row

    def _finish(self, flow: http.HTTPFlow, kind: str = "http") -> Future[None] | None:
        bodygate.release(flow)  # the flow is over: a held body's file goes
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None and state.logged:
            return None
        if state is not None:
            state.logged = True
        return self._record(self._http_row(flow, state, kind))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Fail closed: when the log cannot keep rows, nothing passes unlogged."""
        if self.rt.refuses_for_audit() and flow.response is None:
            metrics.AUDIT_REFUSED.inc()
            state = flow.metadata.get(STATE) or FlowState(Who(""), ALLOW)
            state.decision = replace(state.decision, verdict="block", reason_kind="error")
            bodygate.refuse_at_headers(
                flow, audit_unavailable_response(flow, state, self.rt.clock())
            )

    def http_connect(self, flow: http.HTTPFlow) -> None:
        row = self._http_row(flow, flow.metadata.get(STATE), "connect")
        row.status = flow.response.status_code if flow.response else 200  # 407 from proxyauth
        self._record(row)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        durable = self._finish(flow)
        # A coroutine only in sync mode: mitmproxy awaits what a hook returns, and a plain
        # return costs the hot path nothing.
        return None if durable is None else self._answer_when_durable(flow, durable)

    async def _answer_when_durable(self, flow: http.HTTPFlow, durable: Future[None]) -> None:
        try:  # sync mode: the client is answered only once its row is on disk
            await asyncio.wrap_future(durable)
        except Exception:
            if self.rt.fails_closed:
                metrics.AUDIT_REFUSED.inc()
                state = flow.metadata.get(STATE) or FlowState(Who(""), ALLOW)
                flow.response = audit_unavailable_response(flow, state, self.rt.clock())

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Count, then forget the message: a long-lived WebSocket must not grow the process."""
        assert flow.websocket is not None
        state: FlowState | None = flow.metadata.get(STATE)
        message: websocket.WebSocketMessage = flow.websocket.messages[-1]
        if state is not None:
            if message.from_client:
                state.ws_sent += len(message.content)
                if not message.dropped:
                    state.ws_forwarded += len(message.content)
            else:
                state.ws_received += len(message.content)
        del flow.websocket.messages[:]

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        row = self._http_row(flow, state, "websocket")
        sent, received = (state.ws_sent, state.ws_received) if state else (0, 0)
        row.upload_bytes, row.request_bytes, row.response_bytes = sent, sent, received
        row.forwarded_bytes = state.ws_forwarded if state else 0
        row.declared_bytes = 0
        row.window_bytes = state.window_bytes if state else 0
        row.request_id = f"{flow.id}/ws"
        reason = (flow.websocket.close_reason or "") if flow.websocket else ""
        if reason.startswith("egress-guard:") and not row.error:
            row.error = f"WebSocket closed by {reason}"  # our reason only: a client's may be text
        self._record(row)

    def _tunnel_row(
        self,
        client: connection.Client,
        server: connection.Server,
        sni: str | None,
        error: str,
        intercepted: bool,
        state: FlowState | None = None,
        scheme: str = "tls",
    ) -> RequestRow:
        host, port = server.address if server.address else (sni or "", 0)
        state = state or self.rt.tunnels.get(client.id)
        who = state.who if state else identify(client_ip(client), None, self.rt.policy)
        decision = state.decision if state else ALLOW
        gate = state.gate if state else None
        return RequestRow(
            ts=utc_from_timestamp(client.timestamp_start),
            request_id=f"{client.id}/tunnel",
            client_ip=client_ip(client),
            user=who.user,
            groups=list(who.groups),
            method="CONNECT",
            scheme=scheme,
            host=normalize_host(host),
            port=port,
            kind="tunnel",
            decision=decision.verdict,
            reason_kind=decision.reason_kind or ("error" if error else ""),
            rule_id=decision.rule_id,
            category=decision.category,
            exception_id=decision.exception_id,
            connection_id=client.id,
            tls_intercepted=intercepted,
            error=bounded(error, "error"),
            duration_ms=max(0, int((self.rt.clock() - client.timestamp_start) * 1000)),
            upload_bytes=gate.seen if gate else 0,
            request_bytes=gate.seen if gate else 0,
            window_bytes=gate.counted if gate else 0,
            forwarded_bytes=gate.seen if gate else 0,  # a cut chunk is not relayed
        )

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """Bytes are counted by the gate; the messages themselves are not kept."""
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None:
            message = flow.messages[-1]
            if not message.from_client:
                state.ws_received += len(message.content)
        del flow.messages[:]

    def _tcp_done(self, flow: tcp.TCPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or state.logged:
            return
        state.logged = True
        row = self._tunnel_row(
            flow.client_conn,
            flow.server_conn,
            flow.client_conn.sni,
            flow.error.msg if flow.error else "",
            False,
            state,
            "tls" if flow.metadata.get(PASSTHROUGH) else "tcp",
        )
        row.response_bytes = state.ws_received
        self._record(row)

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self._tcp_done(flow)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        self._tcp_done(flow)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        client = data.context.client
        reason = client.error or "client TLS handshake failed"
        self._record(
            self._tunnel_row(
                client,
                data.context.server,
                client.sni,
                f"TLS interception failed, tunnel closed: {reason}",
                False,
            )
        )

    def egress_protocol_error(self, data: ProtocolErrorData) -> None:
        """A request refused before any flow hook saw it (protocol_errors): a block row."""
        client = data.client
        state = self.rt.tunnels.get(client.id)
        who = state.who if state else identify(client_ip(client), None, self.rt.policy)
        self._record(
            RequestRow(
                ts=utc_from_timestamp(data.timestamp),
                request_id=str(uuid.uuid4()),
                client_ip=client_ip(client),
                user=who.user,
                groups=list(who.groups),
                method=data.method,
                scheme=data.scheme,
                host=normalize_host(data.host),
                port=data.port,
                **path_and_query(data.path),
                http_version=data.http_version,
                kind="http",
                status=data.status,
                decision="block",
                reason_kind="error",
                tls_intercepted=client.tls_established,
                connection_id=client.id,
                error=bounded(data.reason, "error"),
            )
        )
