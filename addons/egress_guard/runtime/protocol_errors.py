"""Protocol errors: the requests mitmproxy refuses before any flow hook, made visible.

mitmproxy 11.0.2 answers some requests itself, before it has made a flow or after making one
it never shows to an addon: an unparsable HTTP/1 request line or header block (400), a request
with no usable Host (400), a head over the body gate's cap (431), an HTTP/2 HEADERS frame that
hyper-h2 or mitmproxy reject (GOAWAY), a client that closes in the middle of its request head.
No ``requestheaders``/``error`` hook fires for them, so without this module the request log
would not hold them. Each such refusal now also emits one custom hook, ``egress_protocol_error``
(``ProtocolErrorHook``), with plain values: the client connection, the request line and
destination when known, the status the client got (0: none, e.g. HTTP/2 GOAWAY) and the reason.
Never a body, never header values (the request line and Host aside).

Three mitmproxy defects are also repaired here, because a request hitting them got no answer
and no row (the connection handler crashed, "mitmproxy has crashed!", and the client hung):

- trailers. ``Http1Connection.read_body`` raises ``NotImplementedError("HTTP trailers are not
  implemented yet.")`` for any chunked HTTP/1 message ending in trailer fields (request or
  response), and ``Http1Client.send`` / ``Http1Server.send`` raise ``AssertionError`` on
  ``RequestTrailers`` / ``ResponseTrailers`` (trailers from HTTP/2 going to HTTP/1). The
  HTTP/1 reader now hands the trailers on as mitmproxy's own Request/ResponseTrailers events,
  and the HTTP/1 sender writes them into the last chunk, or drops them when the message is not
  chunked (RFC 9110 §6.5: an intermediary that cannot forward trailers discards them).
- HTTP/2 to HTTP/1 framing. A buffered HTTP/2 request body with neither Content-Length nor
  Transfer-Encoding (e.g. a GET with a DATA frame) was written to the HTTP/1 upstream bare
  after the head: the upstream read the body as the next request (request smuggling past the
  gateway's policy and log). It is now framed (Content-Length, or chunked).
- HTTP/2 field values with CR, LF or NUL (hyper-h2 4.1.0 does not check them; RFC 9113
  §8.2.1 makes such a request malformed) were copied into the HTTP/1 head verbatim: header
  injection and smuggling towards HTTP/1 upstreams. Such a request is refused with 400.

And a last net: an exception out of the layer stack (the "mitmproxy has crashed!" path in
``ConnectionHandler.server_event``) emits the hook and closes the client instead of leaving it
hanging; mitmproxy still logs the traceback.

Every patch wraps the function it replaces (taken at install time, so it composes with the
body gate's patches); no upstream function body is copied. Pinned to mitmproxy 11.0.2 (and the
h11 0.14 / hyper-h2 4.1 it pins): ``install`` refuses any other version.
"""

from __future__ import annotations

import contextlib
import functools
import html
import re
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from logging import DEBUG
from pathlib import Path
from typing import Any, ClassVar

import h2.errors
import h2.events
import h2.exceptions
import h11
import mitmproxy.net.http.http1 as net_http1
from h11._readers import ChunkedReader
from mitmproxy import connection, http, version
from mitmproxy.proxy import commands, events, layer, server
from mitmproxy.proxy.commands import StartHook
from mitmproxy.proxy.layers.http import (
    HttpStream,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseEndOfMessage,
    ResponseTrailers,
)
from mitmproxy.proxy.layers.http import _http1 as http1_layer
from mitmproxy.proxy.layers.http import _http2 as http2_layer
from mitmproxy.proxy.layers.http import _http_h2 as http_h2
from mitmproxy.proxy.layers.http._base import ReceiveHttp, format_error
from mitmproxy.utils import human

PINNED_MITMPROXY = "11.0.2"
MAX_REASON = 1024  # characters of reason text carried by the hook
MAX_REQUEST_LINE = 2048
MAX_TRAILER_SECTION = 64 * 1024  # like the body gate's cap on a request head
_PEEK_ABOVE = 64 * 1024  # a head buffer this large is about to be refused (bodygate's 431)
_MARK = "__egress_protocol_errors__"


# --- the hook ---------------------------------------------------------------------------------


@dataclass
class ProtocolErrorData:
    """A request refused, or a connection dropped, before any flow hook saw it."""

    client: connection.Client
    status: int  # HTTP status sent to the client; 0: none (closed, HTTP/2 GOAWAY or reset)
    reason: str  # what was wrong, bounded
    http_version: str = ""  # "HTTP/1.1", "HTTP/2.0"; "" when not even that is known
    method: str = ""
    scheme: str = ""
    host: str = ""  # as the client meant it (percent-escapes decoded), port apart
    port: int = 0
    path: str = ""
    request_line: str = ""  # HTTP/1: the first line as received, bounded
    timestamp: float = field(default_factory=time.time)


@dataclass
class ProtocolErrorHook(StartHook):
    """Addons implement ``egress_protocol_error(self, data: ProtocolErrorData)``. Not blocking:
    the refusal has already been sent when it runs, and it may not change it."""

    data: ProtocolErrorData
    name: ClassVar[str] = "egress_protocol_error"
    blocking = False


def _bounded(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _split_authority(authority: str) -> tuple[str, int]:
    """Lenient: what the client asked for, even where mitmproxy's strict parser said no.
    Userinfo (``user:password@``) is dropped: a row never holds a credential."""
    authority = authority.rpartition("@")[2].strip()
    host, port = authority, ""
    if authority.startswith("["):  # [IPv6]:port
        inside, bracket, rest = authority[1:].partition("]")
        if bracket:
            host, port = inside, rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port = authority.partition(":")
    number = int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else 0
    return urllib.parse.unquote(host), number if number <= 65535 else 0


def _from_request_line(line: bytes, host_header: bytes | None = None) -> dict[str, Any]:
    """method, scheme, host, port, path and version from an HTTP/1 request line mitmproxy
    refused, as far as it can be read."""
    parts = line.split()
    values: dict[str, Any] = {"request_line": _redacted(_text(line))}
    if parts:
        values["method"] = _text(parts[0])
    if len(parts) >= 3 and parts[-1].startswith(b"HTTP/"):
        values["http_version"] = _text(parts[-1])
    target = _text(parts[1]) if len(parts) >= 2 else ""
    authority = ""
    if "://" in target:
        scheme, _, rest = target.partition("://")
        authority, slash, path = rest.partition("/")
        values.update(scheme=scheme.lower(), path=slash + path)
    elif values.get("method") == "CONNECT":
        authority = target
    else:
        values["path"] = target
        authority = _text(host_header or b"")
    if authority:
        values["host"], values["port"] = _split_authority(authority)
    return values


def _from_h2_headers(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, Any]:
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in (b":method", b":scheme", b":authority", b":path", b"host"):
            found.setdefault(name, value)
    values: dict[str, Any] = {"http_version": "HTTP/2.0"}
    if b":method" in found:
        values["method"] = _text(found[b":method"])
    if b":scheme" in found:
        values["scheme"] = _text(found[b":scheme"])
    if b":path" in found:
        values["path"] = _text(found[b":path"])
    authority = found.get(b":authority") or found.get(b"host")
    if authority:
        values["host"], values["port"] = _split_authority(_text(authority))
    return values


_LIMITS = {
    "method": 64,
    "scheme": 16,
    "http_version": 16,
    "host": 512,
    "path": MAX_REQUEST_LINE,
    "request_line": MAX_REQUEST_LINE,
}


def _hook(client: connection.Client, status: int, reason: str, **request: Any) -> ProtocolErrorHook:
    for key, limit in _LIMITS.items():
        if key in request:
            request[key] = _bounded(request[key], limit)
    return ProtocolErrorHook(ProtocolErrorData(client, status, _bounded(reason), **request))


# --- wrapping ---------------------------------------------------------------------------------


def _wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``make(current)``, once: a wrapper is not wrapped again."""
    current = getattr(owner, name)
    if getattr(current, _MARK, False):
        return
    wrapper = make(current)
    setattr(wrapper, _MARK, True)
    setattr(owner, name, wrapper)


# --- HTTP/1: requests refused before a flow exists --------------------------------------------
# mitmproxy/proxy/layers/http/_http1.py, Http1Server.read_headers (lines 277-323): when
# ``http1.read_request_head`` raises, the client gets a 400 and the connection is closed; with
# no request parsed, only a log line is written (lines 299-302). When the client closes in
# the middle of a head, only a log line too (lines 315-321). The body gate's own wrapper
# (bodygate._read_headers) refuses an endless head with 431 the same way. This wraps whatever
# read_headers is installed and watches what it yields: a 4xx sent, the state done, and no
# request handed on (no ReceiveHttp) is a refusal no flow hook will see.


class _Rejected:
    """The lines of the head ``read_request_head`` refused last; read (and cleared) by the
    read_headers wrapper right after, in the same synchronous step."""

    lines: list[bytes] | None = None


_rejected = _Rejected()


def _keep_rejected_head(read_request_head: Callable[[list[bytes]], http.Request]) -> Any:
    # wraps mitmproxy/net/http/http1/read.py read_request_head (lines 244-274), as the
    # ``http1`` package re-exports it and _http1 calls it (``http1.read_request_head``).
    @functools.wraps(read_request_head)
    def wrapper(lines: list[bytes]) -> http.Request:
        try:
            return read_request_head(lines)
        except ValueError:
            _rejected.lines = lines[:64]
            raise

    return wrapper


def _host_line(lines: Iterable[bytes]) -> bytes | None:
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            return value.strip()
    return None


def _first_line(data: bytes) -> bytes:
    return data.lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b"\n", 1)[0][:MAX_REQUEST_LINE]


def _error_page_reason(data: bytes) -> str:
    """The message in mitmproxy's error page (``_base.format_error``)."""
    start, end = data.find(b"<p>"), data.find(b"</p>")
    return html.unescape(_text(data[start + 3 : end])) if 0 <= start < end else ""


_USERINFO = re.compile(r"://[^/\s@]*@")


def _redacted(text: str) -> str:
    """No credential in a row: userinfo in a URL goes (``http://user:pw@host/``)."""
    return _USERINFO.sub("://…@", text) if "@" in text else text


def _safe_reason(message: str) -> str:
    """mitmproxy quotes the offending header line; a header line may be a credential."""
    if message.startswith("Invalid header line:"):
        return "Invalid header line"
    return _redacted(message)


def _watch_read_headers(read_headers: Callable[..., layer.CommandGenerator[None]]) -> Any:
    @functools.wraps(read_headers)
    def wrapper(
        self: http1_layer.Http1Server, event: events.ConnectionEvent
    ) -> layer.CommandGenerator[None]:
        closed = isinstance(event, events.ConnectionClosed)
        peek = bytes(self.buf) if closed or len(self.buf) > _PEEK_ABOVE else b""
        _rejected.lines = None
        status, reason, handed_on = 0, "", False
        prefix = f"{human.format_address(self.conn.peername)}: "
        # Http1Server yields no blocking command (its requests block in HttpStream), so no
        # value is ever sent into this generator: plain iteration relays it faithfully.
        for command in read_headers(self, event):
            if isinstance(command, (ReceiveHttp, ProtocolErrorHook)):
                handed_on = True  # a flow has it, or an inner wrapper has reported it
            elif handed_on:
                pass
            elif isinstance(command, commands.SendData) and command.data[:9] == b"HTTP/1.1 ":
                status = int(command.data[9:12]) if command.data[9:12].isdigit() else 0
                reason = _error_page_reason(command.data)
            elif isinstance(command, commands.Log) and command.message.startswith(prefix):
                reason = command.message[len(prefix) :]  # the ValueError's text, unescaped
            yield command
        lines, _rejected.lines = _rejected.lines, None
        if handed_on:
            return
        if status >= 400 and self.state == self.done:
            if lines:
                request = _from_request_line(lines[0], _host_line(lines[1:]))
            else:
                request = _from_request_line(_first_line(peek)) if peek else {}
            yield _hook(self.conn, status, _safe_reason(reason) or "request refused", **request)
        elif closed and peek.strip():
            yield _hook(
                self.conn,
                0,
                "client closed the connection before completing the request head",
                **_from_request_line(_first_line(peek)),
            )

    return wrapper


# mitmproxy/proxy/layers/http/__init__.py, HttpStream.state_wait_for_request_headers (lines
# 230-246): a request in origin form whose Host header is missing or unparsable gets a 400 and
# the stream ends, before ``requestheaders`` and without ``error``: the flow exists, no addon
# sees it. Every other way out of that state into ``state_errored`` sets ``flow.error`` (and
# fires ``error``) or carries a response; so errored, no error and no response is that one.


def _watch_wait_for_request_headers(
    state_wait_for_request_headers: Callable[..., layer.CommandGenerator[None]],
) -> Any:
    @functools.wraps(state_wait_for_request_headers)
    def wrapper(self: HttpStream, event: RequestHeaders) -> layer.CommandGenerator[None]:
        yield from state_wait_for_request_headers(self, event)  # relays hook replies too
        flow = getattr(self, "flow", None)
        if (
            flow is not None
            and self.client_state == self.state_errored
            and flow.error is None
            and flow.response is None
        ):
            request = flow.request
            host, port = _split_authority(request.host_header or "")
            yield _hook(
                self.context.client,
                400,
                "HTTP request has no host header, destination unknown.",
                http_version=request.http_version,
                method=request.method,
                scheme=request.scheme,
                host=host,
                port=port,
                path=request.path,
            )

    return wrapper


# --- HTTP/1 trailers ----------------------------------------------------------------------------
# Reading: _http1.py make_body_reader (lines 463-469) hands Http1Connection.read_body (lines
# 87-120) an h11 ChunkedReader; at the end of a chunked body with trailer fields read_body raises
# NotImplementedError (line 115). The reader below takes the trailers off h11's EndOfMessage
# (so read_body carries on as for a body without them) and the read_body wrapper hands them on
# as mitmproxy's Request/ResponseTrailers event just before the end of the message, which is
# what the HTTP/2 layer does and what HttpStream already handles. It also caps the trailer
# section, which h11 would otherwise buffer without limit.


class _TrailerKeepingChunkedReader(ChunkedReader):
    trailers: http.Headers | None = None

    def __call__(self, buf: Any) -> Any:
        if self._reading_trailer and len(buf) > MAX_TRAILER_SECTION:
            raise h11.RemoteProtocolError(
                f"trailer section larger than {MAX_TRAILER_SECTION} bytes"
            )
        result = super().__call__(buf)
        if isinstance(result, h11.EndOfMessage) and result.headers:
            self.trailers = http.Headers(list(result.headers.raw_items()))
            return h11.EndOfMessage()
        return result


def _keep_trailers_reader(make_body_reader: Callable[[int | None], Any]) -> Any:
    @functools.wraps(make_body_reader)
    def wrapper(expected_size: int | None) -> Any:
        if expected_size is None:
            return _TrailerKeepingChunkedReader()
        return make_body_reader(expected_size)

    return wrapper


def _hand_on_trailers(read_body: Callable[..., layer.CommandGenerator[None]]) -> Any:
    @functools.wraps(read_body)
    def wrapper(
        self: http1_layer.Http1Connection, event: events.Event
    ) -> layer.CommandGenerator[None]:
        # No blocking command comes out of an Http1Connection (see above): plain iteration.
        for command in read_body(self, event):
            if isinstance(command, ReceiveHttp) and isinstance(
                command.event, (RequestEndOfMessage, ResponseEndOfMessage)
            ):
                reader = self.body_reader
                trailers = getattr(reader, "trailers", None)
                if trailers:
                    reader.trailers = None  # type: ignore[union-attr]
                    kind = (
                        RequestTrailers
                        if isinstance(self, http1_layer.Http1Server)
                        else ResponseTrailers
                    )
                    yield ReceiveHttp(kind(command.event.stream_id, trailers))
            yield command

    return wrapper


# Sending: Http1Client.send (lines 343-389) and Http1Server.send (lines 232-275) have no branch
# for trailers and raise AssertionError("Unexpected event"). The wrappers keep the trailers
# until the end of the message and put them into the last chunk (replacing the b"0\r\n\r\n"
# the original writes there); a message that is not chunked cannot carry them: they are
# dropped (RFC 9110 §6.5), with a debug log line.

# Fields a trailer must not carry (RFC 9110 §6.5.1: framing, routing, request modifiers,
# authentication, how to process the content) and connection-specific ones.
_NOT_IN_TRAILERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"upgrade",
        b"te",
        b"trailer",
        b"cache-control",
        b"max-forwards",
        b"expect",
        b"authorization",
        b"proxy-authorization",
        b"www-authenticate",
        b"proxy-authenticate",
        b"set-cookie",
        b"content-encoding",
        b"content-type",
        b"content-range",
    }
)
_BAD_FIELD_BYTES = re.compile(rb"[\r\n\x00]")
_TRAILERS = "egress_guard.trailers"


def _trailer_block(trailers: http.Headers) -> bytes:
    return b"".join(
        b"%s: %s\r\n" % (name, value)
        for name, value in trailers.fields
        if name.lower() not in _NOT_IN_TRAILERS
        and not _BAD_FIELD_BYTES.search(name)
        and not _BAD_FIELD_BYTES.search(value)
        and b":" not in name
    )


def _send_trailers(
    send: Callable[..., layer.CommandGenerator[None]],
    trailers_type: type[RequestTrailers | ResponseTrailers],
    end_type: type[RequestEndOfMessage | ResponseEndOfMessage],
) -> Any:
    is_client = trailers_type is RequestTrailers

    @functools.wraps(send)
    def wrapper(self: http1_layer.Http1Connection, event: Any) -> layer.CommandGenerator[None]:
        if isinstance(event, trailers_type):
            message = self.request if is_client else self.response
            chunked = (
                message is not None
                and "chunked" in message.headers.get("transfer-encoding", "").lower()
            )
            if chunked:
                self.__dict__[_TRAILERS] = event.trailers
            else:
                yield commands.Log(
                    f"Dropped HTTP trailers ({len(event.trailers)} fields): the HTTP/1 "
                    f"message is not chunked and cannot carry them.",
                    DEBUG,
                )
            return
        if is_client and isinstance(event, RequestHeaders):
            _frame_for_http1(event)
        trailers = self.__dict__.pop(_TRAILERS, None) if isinstance(event, end_type) else None
        for command in send(self, event):  # plain iteration: nothing blocking comes out here
            if (
                trailers
                and isinstance(command, commands.SendData)
                and command.connection is self.conn
                and command.data == b"0\r\n\r\n"
            ):
                command.data = b"0\r\n" + _trailer_block(trailers) + b"\r\n"
                trailers = None
            yield command

    return wrapper


# HTTP/2 to HTTP/1 framing. Http1Client.send converts an HTTP/2 request's head (lines 354-372)
# but leaves its framing alone, and HttpStream.state_consume_request_body sends a buffered body
# (lines 386-403) whatever the headers say: an HTTP/2 request announces its body by DATA frames,
# so with neither Content-Length nor Transfer-Encoding the HTTP/1 upstream reads no body and
# takes the body bytes for the next request. Frame it first: Content-Length for a complete
# buffered body, chunked for a streamed one or one with trailers to follow (the body gate does
# the same in its streamed path; with its header already there this changes nothing).


def _frame_for_http1(event: RequestHeaders) -> None:
    request = event.request
    if event.end_stream or not (request.is_http2 or request.is_http3):
        return
    headers = request.headers
    if "content-length" in headers or "transfer-encoding" in headers:
        return
    if request.raw_content is not None and not request.trailers:
        headers["content-length"] = str(len(request.raw_content))
    else:
        headers["transfer-encoding"] = "chunked"


# --- HTTP/2: requests refused before a flow exists ------------------------------------------
# mitmproxy/proxy/layers/http/_http2.py: a HEADERS frame hyper-h2 refuses (uppercase or empty
# names, connection-specific fields, a missing or unknown pseudo-header, pseudo-headers after
# regular ones, an HPACK error, too many streams...) raises h2.exceptions.ProtocolError out of
# receive_data (lines 170-182); mitmproxy answers with GOAWAY and closes (protocol_error, lines
# 284-292), handing an error only to the streams that already had a flow. A request hyper-h2
# accepts but mitmproxy cannot parse (parse_h2_request_headers: :authority it cannot parse, no
# :scheme as in an HTTP/2 CONNECT; Http2Server.handle_h2_event lines 401-414) ends the same way.
# The wrappers below remember the headers of the request being refused (the HEADERS frame's,
# decoded before hyper-h2 refused them, or the RequestReceived event's), and protocol_error's
# wrapper emits the hook when no flow carries the error: the refused stream had none, or no
# stream was open at all.


def _remember_refused_headers(receive_headers_frame: Callable[..., Any]) -> Any:
    # wraps h2.connection.H2Connection._receive_headers_frame (hyper-h2 4.1.0) for mitmproxy's
    # BufferedH2Connection only: the decoder is watched for the length of the one call.
    @functools.wraps(receive_headers_frame)
    def wrapper(self: http_h2.BufferedH2Connection, frame: Any) -> Any:
        decoder = self.decoder
        decode = decoder.decode
        decoded: list[Any] = []

        def keep(data: bytes, raw: bool = False) -> Any:
            headers = decode(data, raw=raw)
            decoded.append(headers)
            return headers

        decoder.decode = keep  # type: ignore[method-assign]
        try:
            return receive_headers_frame(self, frame)
        except h2.exceptions.ProtocolError:
            self.__dict__[_REFUSED] = (frame.stream_id, decoded[0] if decoded else [])
            raise
        finally:
            del decoder.decode

    return wrapper


_REFUSED = "egress_guard.refused_headers"
_PENDING = "egress_guard.pending_request"


def _malformed_field(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """RFC 9113 §8.2.1: CR, LF or NUL anywhere in a field makes the request malformed (and
    would be copied verbatim into an HTTP/1 head); so does whitespace in :method or :path
    (they become the HTTP/1 request line)."""
    if _BAD_FIELD_BYTES.search(b"".join(chain.from_iterable(headers))):
        for name, value in headers:
            if _BAD_FIELD_BYTES.search(name) or _BAD_FIELD_BYTES.search(value):
                return f"HTTP/2 field {_text(name[:64])!r} contains CR, LF or NUL"
    for name, value in headers:
        if name in (b":method", b":path") and (b" " in value or b"\t" in value):
            return f"HTTP/2 pseudo-header {_text(name)} contains whitespace"
    return None


def _refuse_malformed(
    self: http2_layer.Http2Server, event: h2.events.RequestReceived, reason: str
) -> layer.CommandGenerator[None]:
    """Answer 400 on that stream only (RFC 9113 §8.1.1) and tell the client to stop sending;
    the stream gets no flow: what it sends later is dropped (it is not in ``self.streams``)."""
    stream_id = event.stream_id
    conn = self.h2_conn
    conn.send_headers(
        stream_id,
        [
            (b":status", b"400"),
            (b"server", version.MITMPROXY.encode()),
            (b"content-type", b"text/html"),
        ],
    )
    conn.send_data(stream_id, format_error(400, reason), end_stream=True)
    if not event.stream_ended and not conn.stream_buffers.get(stream_id):
        # The client's END_STREAM may already be in the frames h2 has read (the events are
        # handed to us one by one after it read them all): then the stream is closed.
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
    yield _hook(self.conn, 400, reason, **_from_h2_headers(event.headers))


def _watch_h2_requests(handle_h2_event: Callable[..., layer.CommandGenerator[bool]]) -> Any:
    @functools.wraps(handle_h2_event)
    def wrapper(
        self: http2_layer.Http2Server, event: h2.events.Event
    ) -> layer.CommandGenerator[bool]:
        if isinstance(event, h2.events.RequestReceived):
            reason = _malformed_field(event.headers)
            if reason:
                yield from _refuse_malformed(self, event, reason)
                return False
            self.__dict__[_PENDING] = event
            try:
                return (yield from handle_h2_event(self, event))
            finally:
                self.__dict__.pop(_PENDING, None)
        if isinstance(event, h2.events.TrailersReceived) and event.stream_id in self.streams:
            reason = _malformed_field(event.headers)
            if reason:
                # The request has a flow: its error hook records it. Reset the stream.
                yield ReceiveHttp(RequestProtocolError(event.stream_id, reason, code=400))
                if not self.is_closed(event.stream_id):
                    self.h2_conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                self.streams.pop(event.stream_id, None)
                return False
        return (yield from handle_h2_event(self, event))

    return wrapper


_BYTES_LITERAL = re.compile(r"""b(['"]).*\1""")


def _h2_reason(message: str) -> str:
    """hyper-h2 quotes a field's value in some errors ("header value surrounded by
    whitespace b' Bearer …'", "Invalid value for TE header"): names stay, values go."""
    return _BYTES_LITERAL.sub("b'…'", message) if "value" in message.lower() else message


def _watch_h2_protocol_error(protocol_error: Callable[..., layer.CommandGenerator[None]]) -> Any:
    @functools.wraps(protocol_error)
    def wrapper(
        self: http2_layer.Http2Server, message: str, *args: Any, **kwargs: Any
    ) -> layer.CommandGenerator[None]:
        pending: h2.events.RequestReceived | None = self.__dict__.pop(_PENDING, None)
        refused = self.h2_conn.__dict__.pop(_REFUSED, None)
        if pending is not None:
            stream_id, headers = pending.stream_id, pending.headers
        elif refused is not None:
            stream_id, headers = refused
        else:
            stream_id, headers = None, []
        unseen = stream_id not in self.streams if stream_id is not None else not self.streams
        yield from protocol_error(self, message, *args, **kwargs)
        if unseen:
            request = _from_h2_headers(headers) if headers else {"http_version": "HTTP/2.0"}
            yield _hook(self.conn, 0, _h2_reason(message), **request)

    return wrapper


# --- the last net: a crash in the layer stack -------------------------------------------------
# mitmproxy/proxy/server.py, ConnectionHandler.server_event (lines 378-438): an exception out of
# the layers is logged ("mitmproxy has crashed!") and otherwise ignored; the client's
# connection stays open with its layers in whatever state the exception left them, and the
# request never gets an answer or a row. The wrapper of __init__ (lines 108-128) guards the
# root layer's handle_event: on an exception it emits the hook and closes the client, then
# re-raises, so mitmproxy still logs the traceback.


def _crash_reason(e: Exception) -> str:
    """Where it crashed, not the exception's text: that may quote request data (mitmproxy's
    "Unexpected event: RequestData(..., data=b'...')"), and a row never holds a body."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})"
    return f"mitmproxy crashed: {type(e).__name__}{where if frames else ''}"


def _guarded(
    handle_event: Callable[[events.Event], layer.CommandGenerator[None]], client: connection.Client
) -> Callable[[events.Event], layer.CommandGenerator[None]]:
    crashed = False

    def guarded_handle_event(event: events.Event) -> layer.CommandGenerator[None]:
        nonlocal crashed
        try:
            yield from handle_event(event)
        except Exception as e:
            if not crashed:
                crashed = True
                yield _hook(client, 0, _crash_reason(e))
                yield commands.CloseConnection(client)
            raise

    return guarded_handle_event


def _guard_root_layer(init: Callable[..., None]) -> Any:
    @functools.wraps(init)
    def wrapper(self: server.ConnectionHandler, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.layer.handle_event = _guarded(  # type: ignore[method-assign]
            self.layer.handle_event, self.client
        )

    return wrapper


# --- install ----------------------------------------------------------------------------------


def install() -> None:
    """Idempotent. Call after the body gate's patches: this wraps whatever is installed."""
    if version.VERSION != PINNED_MITMPROXY:
        raise RuntimeError(
            f"egress_guard.runtime.protocol_errors patches mitmproxy {PINNED_MITMPROXY} "
            f"internals; this is mitmproxy {version.VERSION}. Re-check every patch against "
            "the new version (see the module's comments) before changing the pin."
        )
    _wrap(net_http1, "read_request_head", _keep_rejected_head)
    _wrap(http1_layer.Http1Server, "read_headers", _watch_read_headers)
    _wrap(HttpStream, "state_wait_for_request_headers", _watch_wait_for_request_headers)
    _wrap(http1_layer, "make_body_reader", _keep_trailers_reader)
    _wrap(http1_layer.Http1Connection, "read_body", _hand_on_trailers)
    _wrap(
        http1_layer.Http1Client,
        "send",
        lambda send: _send_trailers(send, RequestTrailers, RequestEndOfMessage),
    )
    _wrap(
        http1_layer.Http1Server,
        "send",
        lambda send: _send_trailers(send, ResponseTrailers, ResponseEndOfMessage),
    )
    _wrap(http_h2.BufferedH2Connection, "_receive_headers_frame", _remember_refused_headers)
    _wrap(http2_layer.Http2Server, "handle_h2_event", _watch_h2_requests)
    _wrap(http2_layer.Http2Server, "protocol_error", _watch_h2_protocol_error)
    _wrap(server.ConnectionHandler, "__init__", _guard_root_layer)
