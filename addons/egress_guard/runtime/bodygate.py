"""Body gate: request bodies held back from the upstream until their verdict, refusals while a
body is still on the way, and cutting WebSocket and pass-through tunnel uploads.

The promise is that nothing leaves before its verdict. mitmproxy 11 either buffers a whole body
in memory (then calls ``request``) or streams it to the upstream chunk by chunk as it arrives;
an egress gateway needs a third way. A body that a gate watches is *held*: every chunk is shown
to the gates (upload caps count it, and may refuse at once), kept in a ``HeldBody`` (memory,
then a private file), and not forwarded. When the body has ended, mitmproxy's ``request`` hook
runs with the body held: the addon scans it there (off the event loop) and either sets
``flow.response`` — the refusal, sent to the client, with nothing of the body (not even the
request headers, not even a connection) at the upstream — or leaves it unset, and only then is
the upstream contacted and sent the headers, the held body, the trailers and the end.

A body larger than the hold (``HoldSpec.max_bytes``) asks each gate's ``overflow``: a refusal
stops it with nothing forwarded; otherwise (policy lets it stream, e.g. ``unscannable: alert``)
what is held is forwarded and the rest streams past the gates, each chunk shown to them before
it is sent, and the row says how many bytes the upstream got (``forwarded_bytes``).

Adapters use:

- ``refuse_at_headers(flow, response)`` from ``requestheaders``: answer now, the body is not read
  and no upstream connection is made;
- ``add_gate(flow, gate, hold)``: the body is held and each chunk shown to ``gate.feed``;
- ``held_body(flow)``: the held body, for the verdict in ``request``;
- ``forwarded_bytes(flow)`` and ``release(flow)`` (the flow's end: the held file is deleted);
- ``cut_websocket(flow, message, code)`` from ``websocket_message``: the message is dropped and
  the WebSocket closed on both sides (1009 for a size, 1008 for a policy refusal);
- ``watch_control_frames(flow, refuses)`` from ``websocket_start``: each ping, pong and close
  reason from the client is shown to ``refuses`` before it is relayed; a refusal drops it and
  cuts the WebSocket.

This is the one module that reaches into mitmproxy's HTTP state machine (``HttpStream``). It was
written against mitmproxy ``PINNED_MITMPROXY``; ``install`` refuses to patch another version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import wsproto.events
from mitmproxy import flow as mflow
from mitmproxy import http, tcp
from mitmproxy import version as mitmproxy_version
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import commands, events, layer, mode_servers
from mitmproxy.proxy.layers import tcp as tcp_layer
from mitmproxy.proxy.layers import websocket as ws_layer
from mitmproxy.proxy.layers.http import (
    HttpRequestHook,
    HttpResponseHeadersHook,
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

from .heldbody import HeldBody, HoldSpec

PINNED_MITMPROXY = "11.0.2"

_EARLY = "egress_guard.refuse_early"
_GATES = "egress_guard.gates"
_HOLD = "egress_guard.hold"  # the HoldSpec, set with the first gate
_HELD = "egress_guard.held_body"
_STREAMED = "egress_guard.streamed"  # the body outgrew its hold and streams past the gates
_FORWARDED = "egress_guard.forwarded"
_RECEIVED = "egress_guard.received"
_WS_CUT = "egress_guard.ws_cut"
_DISCARDED = "egress_guard.discarded"
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})
# After an early refusal over HTTP/1, the rest of the body is read and dropped up to this much
# (so the client, still sending, reads the refusal rather than a reset), then the connection
# is closed: a client that goes on sending for gigabytes costs nothing.
DISCARD_LIMIT = 1 << 20


class Gate(Protocol):
    def feed(self, data: bytes) -> http.Response | None:
        """Each chunk as it arrives, before anything of it is forwarded. A response refuses
        the upload: the chunk is not forwarded and the client gets the response."""

    def overflow(self, held: HeldBody) -> http.Response | None:
        """The body outgrew its hold (``held`` is all of it so far, nothing forwarded): a
        refusal, or None to let it stream past the gates from here on."""


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


def add_gate(flow: http.HTTPFlow | tcp.TCPFlow, gate: Gate, hold: HoldSpec | None = None) -> None:
    """Show every client chunk to ``gate`` first; an HTTP body is held until its verdict."""
    if isinstance(flow, http.HTTPFlow):
        assert hold is not None, "an HTTP body gate needs a hold"
        flow.request.stream = True
        flow.metadata.setdefault(_HOLD, hold)
    flow.metadata.setdefault(_GATES, []).append(gate)


def gates_of(flow: http.HTTPFlow | tcp.TCPFlow) -> list[Gate]:
    return flow.metadata.get(_GATES, [])


def held_body(flow: http.HTTPFlow) -> HeldBody | None:
    """The body held for its verdict; None when it was not held (or is streaming)."""
    return None if flow.metadata.get(_STREAMED) else flow.metadata.get(_HELD)


def streamed(flow: http.HTTPFlow) -> bool:
    """The body outgrew its hold and was let through past the gates."""
    return bool(flow.metadata.get(_STREAMED))


def forwarded_bytes(flow: http.HTTPFlow) -> int | None:
    """Body bytes the upstream was sent, for a body that went through the gate (else None)."""
    return flow.metadata.get(_FORWARDED)


def received_bytes(flow: http.HTTPFlow) -> int | None:
    """Body bytes the client sent, for a body that went through the gate (else None)."""
    return flow.metadata.get(_RECEIVED)


def release(flow: http.HTTPFlow) -> None:
    """The flow is over: forget its held body (the file is deleted)."""
    held: HeldBody | None = flow.metadata.pop(_HELD, None)
    if held is not None:
        held.release()


WS_TOO_BIG = 1009
WS_POLICY_VIOLATION = 1008
_WS_WATCH = "egress_guard.ws_control_watch"


def cut_websocket(flow: http.HTTPFlow, message: object, code: int = WS_TOO_BIG) -> None:
    message.drop()  # type: ignore[attr-defined]
    flow.metadata[_WS_CUT] = code


def watch_control_frames(flow: http.HTTPFlow, refuses: Callable[[bytes], bool]) -> None:
    flow.metadata[_WS_WATCH] = refuses


def _feed(gates: list[Gate], data: bytes) -> http.Response | None:
    for gate in gates:
        refusal = gate.feed(data)
        if refusal is not None:
            return refusal
    return None


# --- the patch -------------------------------------------------------------------------------


@dataclass
class DrainHook(commands.StartHook):
    """Between the pieces of a held body being forwarded: wait until the connection's write
    buffers have drained (answered by the connection handler itself, see ``install``). Without
    it, forwarding a held body would queue all of it in memory at once; mitmproxy drains its
    writers only after reading from a socket, and a held body is sent after the last read."""

    flow: http.HTTPFlow
    name: ClassVar[str] = "egress_drain"


DRAIN_EVERY = 4  # pieces of CHUNK (256 KiB): at most about 1 MiB queued per held body

_original_handle_hook = mode_servers.ProxyConnectionHandler.handle_hook


async def _handle_hook(self: mode_servers.ProxyConnectionHandler, hook: commands.StartHook) -> None:
    if isinstance(hook, DrainHook):
        await self.drain_writers()
        return
    await _original_handle_hook(self, hook)


_original_start_request_stream = HttpStream.start_request_stream
_original_state_stream_request_body = HttpStream.state_stream_request_body


def _answer_and_discard(self: HttpStream) -> layer.CommandGenerator[None]:
    """Send flow.response to the client now and swallow whatever is left of the body."""
    release(self.flow)
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


def _refuse_held(self: HttpStream, refusal: http.Response) -> layer.CommandGenerator[None]:
    """A refusal while the body is held: nothing of it has left; answer, discard the rest."""
    if self.flow.request.http_version.startswith("HTTP/1"):
        refusal.headers["Connection"] = "close"  # the rest of the body is not read
    self.flow.response = refusal
    yield from _answer_and_discard(self)


def _start_request_stream(self: HttpStream) -> layer.CommandGenerator[None]:
    """mitmproxy's start_request_stream, except: an early refusal is answered instead, and a
    gated body is held — no upstream connection, no request headers sent — until its verdict."""
    if self.flow.metadata.get(_EARLY) and self.flow.response is not None:
        yield from _answer_and_discard(self)
        return
    hold: HoldSpec | None = self.flow.metadata.get(_HOLD)
    if hold is None:
        yield from _original_start_request_stream(self)
        return
    self.flow.metadata[_HELD] = HeldBody(hold)
    self.flow.metadata[_FORWARDED] = self.flow.metadata[_RECEIVED] = 0
    self.client_state = self.state_hold_request_body  # type: ignore[attr-defined]


def _send_request_head(self: HttpStream) -> layer.CommandGenerator[bool]:
    """Connect upstream and send the request headers (the body follows). Copied from
    mitmproxy 11.0.2's ``HttpStream.start_request_stream`` (layers/http/__init__.py, the
    make_server_connection + RequestHeaders lines), because that one also switches the state
    to streaming; plus the HTTP/2-to-HTTP/1 framing below."""
    ok = yield from self.make_server_connection()
    if not ok:
        release(self.flow)
        self.client_state = self.state_errored
        return False
    request = self.flow.request
    if (
        (request.is_http2 or request.is_http3)
        and self.context.server.alpn not in (b"h2", b"h3")
        and "content-length" not in request.headers
        and "transfer-encoding" not in request.headers
    ):
        # mitmproxy 11 sends a length-less HTTP/2 body unframed to an HTTP/1 upstream, which
        # then reads an empty body: frame it as chunked.
        request.headers["transfer-encoding"] = "chunked"
    yield SendHttp(RequestHeaders(self.stream_id, request, end_stream=False), self.context.server)
    return True


def _send_held(self: HttpStream) -> layer.CommandGenerator[None]:
    held: HeldBody = self.flow.metadata[_HELD]
    for i, chunk in enumerate(held.chunks(), 1):
        self.flow.metadata[_FORWARDED] += len(chunk)
        yield SendHttp(RequestData(self.stream_id, chunk), self.context.server)
        if i % DRAIN_EVERY == 0:
            yield DrainHook(self.flow)
    release(self.flow)


@expect(RequestData, RequestTrailers, RequestEndOfMessage)
def _state_hold_request_body(
    self: HttpStream, event: RequestData | RequestTrailers | RequestEndOfMessage
) -> layer.CommandGenerator[None]:
    gates: list[Gate] = self.flow.metadata[_GATES]
    held: HeldBody = self.flow.metadata[_HELD]
    if isinstance(event, RequestData):
        self.flow.metadata[_RECEIVED] += len(event.data)
        refusal = _feed(gates, event.data)
        if refusal is not None:
            yield from _refuse_held(self, refusal)
            return
        held.append(event.data)
        if held.size <= held.spec.max_bytes:
            return
        for gate in gates:
            refusal = gate.overflow(held)
            if refusal is not None:
                yield from _refuse_held(self, refusal)
                return
        # Policy lets it stream: forward what is held, then the rest as it comes.
        self.flow.metadata[_STREAMED] = True
        if (yield from _send_request_head(self)):
            yield from _send_held(self)
            self.client_state = self.state_stream_request_body
    elif isinstance(event, RequestTrailers):
        self.flow.request.trailers = event.trailers  # sent after the body, once judged
    else:
        # The whole body is here and nothing of it has left: the verdict, in `request`. What
        # follows mirrors mitmproxy 11.0.2's ``state_consume_request_body`` at its end of
        # message (the request hook, check_killed, an addon's response answered through the
        # responseheaders hook and send_response, else connect and send), with the body sent
        # from the hold instead of from memory.
        self.flow.request.timestamp_end = time.time()
        self.client_state = self.state_done
        yield HttpRequestHook(self.flow)
        if (yield from self.check_killed(True)):
            release(self.flow)
            return
        if self.flow.response is not None:  # refused (or answered) by an addon
            release(self.flow)
            self.flow.response.timestamp_start = time.time()
            yield HttpResponseHeadersHook(self.flow)
            if (yield from self.check_killed(True)):
                return
            yield from self.send_response()
            return
        if not (yield from _send_request_head(self)):
            return
        yield from _send_held(self)
        if self.flow.request.trailers:
            yield SendHttp(
                RequestTrailers(self.stream_id, self.flow.request.trailers), self.context.server
            )
        yield SendHttp(RequestEndOfMessage(self.stream_id), self.context.server)


def _refuse_streamed(self: HttpStream, refusal: http.Response) -> layer.CommandGenerator[None]:
    """Abort the upstream request (it never sees the rest of the body nor its end) and answer
    the client with the refusal if the upstream has not answered yet."""
    yield SendHttp(
        RequestProtocolError(
            self.stream_id, "egress-guard: upload refused", status_codes.CLIENT_CLOSED_REQUEST
        ),
        self.context.server,
    )
    if self.flow.response is None or self.flow.response is refusal:
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
    """A body that outgrew its hold: each chunk shown to the gates before it is forwarded; a
    refusal at the end (``flow.response`` set in ``request``) withholds the end of the body."""
    gates: list[Gate] = self.flow.metadata.get(_GATES, [])
    if not gates:
        yield from _original_state_stream_request_body(self, event)
        return
    if isinstance(event, RequestData):
        self.flow.metadata[_RECEIVED] += len(event.data)
        refusal = _feed(gates, event.data)
        if refusal is not None:
            yield from _refuse_streamed(self, refusal)
            return
        self.flow.metadata[_FORWARDED] += len(event.data)
        yield SendHttp(RequestData(self.stream_id, event.data), self.context.server)
    elif isinstance(event, RequestTrailers):
        self.flow.request.trailers = event.trailers
    else:
        self.flow.request.timestamp_end = time.time()
        answered = self.flow.response
        yield HttpRequestHook(self.flow)
        if self.flow.response is not None and self.flow.response is not answered:
            yield from _refuse_streamed(self, self.flow.response)
            return
        self.client_state = self.state_done
        if self.flow.request.trailers:
            yield SendHttp(
                RequestTrailers(self.stream_id, self.flow.request.trailers), self.context.server
            )
        yield SendHttp(event, self.context.server)
        if self.server_state == self.state_done:
            yield from self.flow_done()


@expect(RequestData, RequestTrailers, RequestEndOfMessage)
def _state_discard_request_body(
    self: HttpStream, event: RequestData | RequestTrailers | RequestEndOfMessage
) -> layer.CommandGenerator[None]:
    if isinstance(event, RequestEndOfMessage):
        self.client_state = self.state_done
    elif isinstance(event, RequestData) and self.flow.request.http_version.startswith("HTTP/1"):
        discarded = self.flow.metadata[_DISCARDED] = self.flow.metadata.get(_DISCARDED, 0) + len(
            event.data
        )
        if discarded > DISCARD_LIMIT:
            self.client_state = self.state_done
            yield commands.CloseConnection(self.context.client)
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
_CUT_REASONS = {
    WS_TOO_BIG: "egress-guard: upload limit",
    WS_POLICY_VIOLATION: "egress-guard: refused",
}


def _watched_events(self: ws_layer.WebsocketLayer, refuses: Callable[[bytes], bool]) -> None:
    """The client side's wsproto events, with its control frames judged first. mitmproxy
    relays pings, pongs and closes straight from these events (and logs ping payloads), so
    this is where they can be held back: a refused one is dropped, never relayed or logged."""
    original = self.client_ws.events
    flow = self.flow

    def events_() -> Iterator[wsproto.events.Event]:
        for event in original():
            if isinstance(event, wsproto.events.Ping | wsproto.events.Pong) and refuses(
                bytes(event.payload)
            ):
                flow.metadata[_WS_CUT] = WS_POLICY_VIOLATION
                continue
            if (
                isinstance(event, wsproto.events.CloseConnection)
                and event.reason
                and refuses(event.reason.encode("utf-8", "surrogatepass"))
            ):
                event = wsproto.events.CloseConnection(WS_POLICY_VIOLATION, "")  # no reason out
            yield event

    self.client_ws.events = events_  # type: ignore[method-assign]


@expect(events.DataReceived, events.ConnectionClosed, ws_layer.WebSocketMessageInjected)
def _ws_relay(self: ws_layer.WebsocketLayer, event: events.Event) -> layer.CommandGenerator[None]:
    refuses = self.flow.metadata.pop(_WS_WATCH, None)
    if refuses is not None:
        _watched_events(self, refuses)
    yield from _original_ws_relay(self, event)
    code = self.flow.metadata.pop(_WS_CUT, None)
    if code and self._handle_event != self.done:
        websocket = self.flow.websocket
        assert websocket is not None
        reason = _CUT_REASONS[code]
        for ws, sent in ((self.client_ws, code), (self.server_ws, WS_POLICY_VIOLATION)):
            if ws.state in (wsproto.ConnectionState.OPEN, wsproto.ConnectionState.REMOTE_CLOSING):
                yield ws.send2(wsproto.events.CloseConnection(sent, reason))
            yield commands.CloseConnection(ws.conn)
        websocket.timestamp_end = time.time()
        websocket.closed_by_client = False
        websocket.close_code, websocket.close_reason = code, reason
        yield ws_layer.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done


def install() -> None:
    """Patch mitmproxy (idempotent). Refuses a mitmproxy other than the one this was written
    and tested against: the patched methods are its internals, and a silent mismatch could
    forward bodies before their verdict."""
    if mitmproxy_version.VERSION != PINNED_MITMPROXY:
        raise RuntimeError(
            f"egress-guard's body gate was written for mitmproxy {PINNED_MITMPROXY} and patches "
            f"its HTTP state machine; this is mitmproxy {mitmproxy_version.VERSION}. Install "
            f"mitmproxy=={PINNED_MITMPROXY} (pip install 'mitmproxy=={PINNED_MITMPROXY}')."
        )
    mode_servers.ProxyConnectionHandler.handle_hook = _handle_hook  # type: ignore[method-assign]
    HttpStream.start_request_stream = _start_request_stream  # type: ignore[method-assign]
    HttpStream.state_stream_request_body = _state_stream_request_body  # type: ignore[method-assign]
    HttpStream.state_hold_request_body = _state_hold_request_body  # type: ignore[attr-defined]
    HttpStream.state_discard_request_body = _state_discard_request_body  # type: ignore[attr-defined]
    tcp_layer.TCPLayer.relay_messages = _tcp_relay  # type: ignore[method-assign]
    http1_layer.Http1Server.read_headers = _read_headers  # type: ignore[method-assign]
    ws_layer.WebsocketLayer.relay_messages = _ws_relay  # type: ignore[method-assign]
    from . import protocol_errors  # last: it wraps what is installed above (read_headers)

    protocol_errors.install()


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
