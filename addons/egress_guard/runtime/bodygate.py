"""Body gate: refusing a request while its body is still on the way, and cutting WebSocket
and pass-through tunnel uploads.

mitmproxy 11 sends an addon's response only after it has read the whole request body, and it
cannot stream a body and answer at the same time. An egress gateway must do both: refuse an
over-cap upload at its headers without reading (or buffering) the body and without contacting
the upstream, and cut a streamed upload the moment it crosses a limit, before the rest of the
body (and its end) reaches the upstream.

This module is the one place that reaches into mitmproxy's HTTP state machine to do that
(``HttpStream``, pinned to the mitmproxy version in pyproject.toml; the end-to-end tests exercise
every path). Addons use two functions:

- ``refuse_at_headers(flow, response)`` from a ``requestheaders`` hook;
- ``add_gate(flow, gate)``: the body is streamed, and every chunk is shown to each gate's
  ``feed`` before it is forwarded; a response from ``feed`` stops the upload there. A gate with
  ``hold_last`` keeps the latest chunk back until the body has ended and the
  ``egress_body_end`` hook (async; addons may scan there, off the event loop) has not refused
  it with ``refuse_at_end``: so the upstream never holds a complete body before the verdict.
  On a TCP flow (a pass-through tunnel) every client→server chunk is shown to the gates; a
  refusal closes both sides.
- ``cut_websocket(flow)`` from a ``websocket_message`` hook: the current message is dropped and
  the WebSocket is closed on both sides (1009 to the client).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Protocol

import wsproto.events
from mitmproxy import flow as mflow
from mitmproxy import http, tcp
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.commands import StartHook
from mitmproxy.proxy.layers import tcp as tcp_layer
from mitmproxy.proxy.layers import websocket as ws_layer
from mitmproxy.proxy.layers.http import (
    HttpResponseHook,
    HttpStream,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.proxy.layers.http import _http1 as http1_layer
from mitmproxy.proxy.utils import expect

_EARLY = "egress_guard.refuse_early"
_GATES = "egress_guard.gates"
_HELD = "egress_guard.held_chunk"
_END_REFUSAL = "egress_guard.end_refusal"
_WS_CUT = "egress_guard.ws_cut"
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})


class Gate(Protocol):
    hold_last: bool

    def feed(self, data: bytes) -> http.Response | None:
        """Called with each body chunk before it is forwarded. A response refuses the upload:
        the chunk is not forwarded, the upstream connection is aborted, the client gets it."""


@dataclass
class EgressBodyEndHook(StartHook):
    """A streamed request body has ended, its last chunk not yet forwarded: a last chance to
    refuse it (``refuse_at_end``). Addons may implement it as a coroutine."""

    flow: http.HTTPFlow
    name: ClassVar[str] = "egress_body_end"


def declared_length(request: http.Request) -> int | None:
    """The body size the request announces: Content-Length, 0 for none, None when unknown
    (chunked, HTTP/1.0 until close, HTTP/2 without a length)."""
    headers = request.headers
    if "transfer-encoding" in headers:
        return None
    lengths = {v.strip() for v in headers.get_all("content-length")}
    if len(lengths) == 1:
        (value,) = lengths
        return int(value) if value.isdigit() else None
    if lengths:  # conflicting lengths: treat as unknown, the body is counted as it comes
        return None
    if request.http_version.startswith("HTTP/1") or request.method in _BODYLESS_METHODS:
        return 0
    return None


def refuse_at_headers(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer now: the body is not read into memory and no upstream connection is made."""
    flow.response = response
    if declared_length(flow.request) == 0:
        return  # no body coming: mitmproxy's own path answers at once
    if flow.request.http_version.startswith("HTTP/1"):
        response.headers["Connection"] = "close"
    flow.metadata[_EARLY] = True
    flow.request.stream = True  # routes the HTTP layer into start_request_stream (patched)
    flow.request.headers.pop("expect", None)  # no "100 Continue": the client need not send


def add_gate(flow: http.HTTPFlow | tcp.TCPFlow, gate: Gate) -> None:
    if isinstance(flow, http.HTTPFlow):
        flow.request.stream = True
    flow.metadata.setdefault(_GATES, []).append(gate)


def gates_of(flow: http.HTTPFlow | tcp.TCPFlow) -> list[Gate]:
    return flow.metadata.get(_GATES, [])


def refuse_at_end(flow: http.HTTPFlow, response: http.Response) -> None:
    """From ``egress_body_end``: refuse the body that has just ended."""
    flow.metadata[_END_REFUSAL] = response


def _feed(gates: list[Gate], data: bytes) -> http.Response | None:
    for gate in gates:
        refusal = gate.feed(data)
        if refusal is not None:
            return refusal
    return None


def cut_websocket(flow: http.HTTPFlow, message: object) -> None:
    message.drop()  # type: ignore[attr-defined]
    flow.metadata[_WS_CUT] = True


# --- the patch -------------------------------------------------------------------------------

_original_state_stream_request_body = HttpStream.state_stream_request_body


def _answer_and_discard(self: HttpStream) -> layer.CommandGenerator[None]:
    """Send flow.response to the client now and swallow whatever is left of the body."""
    response = self.flow.response
    assert response is not None
    response.timestamp_start = response.timestamp_end = time.time()
    self.client_state = self.state_discard_request_body  # type: ignore[attr-defined]
    self.server_state = self.state_done
    content = response.raw_content or b""
    yield SendHttp(ResponseHeaders(self.stream_id, response, not content), self.context.client)
    if content:
        yield SendHttp(ResponseData(self.stream_id, content), self.context.client)
    yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
    yield HttpResponseHook(self.flow)
    self.flow.live = False


def _start_request_stream(self: HttpStream) -> layer.CommandGenerator[None]:
    """mitmproxy's start_request_stream, plus: answer an early refusal instead, and frame a
    length-less HTTP/2 or HTTP/3 body as chunked towards an HTTP/1 upstream (mitmproxy 11
    sends it unframed there, so the upstream reads an empty body and loses the upload)."""
    if self.flow.metadata.get(_EARLY) and self.flow.response is not None:
        yield from _answer_and_discard(self)
        return
    if self.flow.response:
        raise NotImplementedError("Can't set a response and enable streaming at the same time.")
    ok = yield from self.make_server_connection()
    if not ok:
        self.client_state = self.state_errored
        return
    request = self.flow.request
    if (
        (request.is_http2 or request.is_http3)
        and self.context.server.alpn not in (b"h2", b"h3")
        and "content-length" not in request.headers
        and "transfer-encoding" not in request.headers
    ):
        request.headers["transfer-encoding"] = "chunked"
    yield SendHttp(RequestHeaders(self.stream_id, request, end_stream=False), self.context.server)
    self.client_state = self.state_stream_request_body


def _refuse_streamed(self: HttpStream, refusal: http.Response) -> layer.CommandGenerator[None]:
    """Abort the upstream request (it never sees the rest of the body nor its end) and answer
    the client with the refusal if the upstream has not answered yet."""
    self.flow.metadata.pop(_HELD, None)
    yield SendHttp(
        RequestProtocolError(
            self.stream_id, "egress-guard: upload refused", status_codes.CLIENT_CLOSED_REQUEST
        ),
        self.context.server,
    )
    if self.flow.response is None:
        if self.flow.request.http_version.startswith("HTTP/1"):
            refusal.headers["Connection"] = "close"
        self.flow.response = refusal
        yield from _answer_and_discard(self)
    else:
        yield SendHttp(
            ResponseProtocolError(self.stream_id, "killed", status_codes.NO_RESPONSE),
            self.context.client,
        )
        self.client_state = self.server_state = self.state_errored


@expect(RequestData, RequestTrailers, RequestEndOfMessage)
def _state_stream_request_body(
    self: HttpStream, event: RequestData | RequestTrailers | RequestEndOfMessage
) -> layer.CommandGenerator[None]:
    gates: list[Gate] = self.flow.metadata.get(_GATES, [])
    if not gates:
        yield from _original_state_stream_request_body(self, event)
        return
    hold = any(g.hold_last for g in gates)
    if isinstance(event, RequestData):
        refusal = _feed(gates, event.data)
        if refusal is not None:
            yield from _refuse_streamed(self, refusal)
            return
        if not hold:
            yield SendHttp(RequestData(self.stream_id, event.data), self.context.server)
            return
        held = self.flow.metadata.get(_HELD)
        if held:
            yield SendHttp(RequestData(self.stream_id, held), self.context.server)
        self.flow.metadata[_HELD] = event.data
        return
    if isinstance(event, RequestEndOfMessage) and hold:
        yield EgressBodyEndHook(self.flow)
        refusal = self.flow.metadata.pop(_END_REFUSAL, None)
        if refusal is not None:
            yield from _refuse_streamed(self, refusal)
            return
        held = self.flow.metadata.pop(_HELD, None)
        if held:
            yield SendHttp(RequestData(self.stream_id, held), self.context.server)
    yield from _original_state_stream_request_body(self, event)


@expect(RequestData, RequestTrailers, RequestEndOfMessage)
def _state_discard_request_body(
    self: HttpStream, event: RequestData | RequestTrailers | RequestEndOfMessage
) -> layer.CommandGenerator[None]:
    if isinstance(event, RequestEndOfMessage):
        self.client_state = self.state_done
    yield from ()


_original_tcp_relay = tcp_layer.TCPLayer.relay_messages


@expect(events.DataReceived, events.ConnectionClosed, tcp_layer.TcpMessageInjected)
def _tcp_relay(self: tcp_layer.TCPLayer, event: events.Event) -> layer.CommandGenerator[None]:
    gates: list[Gate] = self.flow.metadata.get(_GATES, []) if self.flow else []
    if (
        gates
        and isinstance(event, events.DataReceived)
        and event.connection == self.context.client
        and _feed(gates, event.data) is not None
    ):
        assert self.flow is not None
        self.flow.error = mflow.Error("egress-guard: upload limit reached, tunnel closed")
        yield commands.CloseConnection(self.context.server)
        yield commands.CloseConnection(self.context.client)
        yield tcp_layer.TcpErrorHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done
        return
    yield from _original_tcp_relay(self, event)


_original_ws_relay = ws_layer.WebsocketLayer.relay_messages


@expect(events.DataReceived, events.ConnectionClosed, ws_layer.WebSocketMessageInjected)
def _ws_relay(self: ws_layer.WebsocketLayer, event: events.Event) -> layer.CommandGenerator[None]:
    yield from _original_ws_relay(self, event)
    if self.flow.metadata.pop(_WS_CUT, None) and self._handle_event != self.done:
        websocket = self.flow.websocket
        assert websocket is not None
        for ws, code in ((self.client_ws, 1009), (self.server_ws, 1008)):
            if ws.state in (wsproto.ConnectionState.OPEN, wsproto.ConnectionState.REMOTE_CLOSING):
                yield ws.send2(wsproto.events.CloseConnection(code, "egress-guard: upload limit"))
            yield commands.CloseConnection(ws.conn)
        websocket.timestamp_end = time.time()
        websocket.closed_by_client = False
        websocket.close_code, websocket.close_reason = 1009, "egress-guard: upload limit"
        yield ws_layer.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done


def install() -> None:
    """Idempotent; called when the addons are made."""
    HttpStream.start_request_stream = _start_request_stream  # type: ignore[method-assign]
    HttpStream.state_stream_request_body = _state_stream_request_body  # type: ignore[method-assign]
    HttpStream.state_discard_request_body = _state_discard_request_body  # type: ignore[attr-defined]
    tcp_layer.TCPLayer.relay_messages = _tcp_relay  # type: ignore[method-assign]
    http1_layer.Http1Server.read_headers = _read_headers  # type: ignore[method-assign]
    ws_layer.WebsocketLayer.relay_messages = _ws_relay  # type: ignore[method-assign]


# --- request heads of bounded size ----------------------------------------------------------
# mitmproxy 11 buffers an HTTP/1 request head until it is complete, however large ("FIXME:
# protect against header size DoS"): one client sending headers forever grows the process.

MAX_REQUEST_HEAD = 64 * 1024

_original_read_headers = http1_layer.Http1Server.read_headers


def _read_headers(
    self: http1_layer.Http1Server, event: events.ConnectionEvent
) -> layer.CommandGenerator[None]:
    yield from _original_read_headers(self, event)
    if self.state == self.read_headers and len(self.buf) > MAX_REQUEST_HEAD:
        yield commands.SendData(
            self.conn,
            http1_layer.make_error_response(
                431, f"Request header fields larger than {MAX_REQUEST_HEAD} bytes."
            ),
        )
        yield commands.CloseConnection(self.conn)
        self.buf = http1_layer.ReceiveBuffer()
        self.state = self.done
