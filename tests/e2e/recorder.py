"""Recording upstreams for attack tests: loopback servers that keep every byte they receive.

What a test asserts on is what reached the upstream, not what the client was told. Each server
here listens on 127.0.0.1 and keeps, per accepted connection, the raw bytes it read (after TLS,
when it speaks TLS) and what its protocol layer made of them:

- ``Recorder("http")``: HTTP/1.1 (Content-Length and chunked bodies, trailers, ``Expect``) and,
  when TLS negotiates ``h2`` or a client sends the HTTP/2 preface, HTTP/2. Every request is kept
  as soon as its head is read and its body grows as bytes arrive, so a body the gateway cut
  shows exactly what got through (``complete`` False). ``answer=False`` reads without replying.
- ``Recorder("sink")`` / ``Recorder("echo")``: raw TCP for non-HTTP tunnels; answers nothing,
  or sends every byte back.
- ``Recorder("ws")``: a WebSocket echo server that keeps every frame's payload, including ping,
  pong and close payloads (client frames are masked on the wire, so their payloads are only
  visible decoded: ``contains`` looks at both).

Any of them speaks TLS with ``tls=TestCA(...)`` (a certificate for localhost and 127.0.0.1
signed by a test CA the gateway is told to trust) and ``alpn`` (``None``: no ALPN; or a tuple
such as ``("h2", "http/1.1")`` or ``("x-custom",)``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONNECTIONS = 200  # a bound on what one recorder accepts (tests open a handful)


class TestCA:
    """A certificate authority for recorders (mitmproxy's CertStore, like harness.Upstream)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, host: str = "127.0.0.1"):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from mitmproxy import certs

        directory.mkdir(parents=True, exist_ok=True)
        store = certs.CertStore.from_store(directory, "recorder", 2048)
        self.pem = directory / "recorder-ca-cert.pem"
        entry = store.get_cert(
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))],
        )
        key = entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        self.cert_file = directory / "recorder-server.pem"
        self.cert_file.write_bytes(entry.cert.to_pem() + key)

    def server_context(self, alpn: tuple[str, ...] | None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        return context


@dataclass
class RecordedRequest:
    """One request as the upstream parsed it; ``body`` grows while the body arrives."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False  # the body reached its announced end
    reset: bool = False  # HTTP/2: the stream was reset before its end
    protocol: str = "HTTP/1"  # HTTP/1 | HTTP/2 | websocket

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def path(self) -> str:
        """The path of the target (origin-form or absolute-form)."""
        target = self.target
        if "://" in target:
            rest = target.split("://", 1)[1]
            return "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        return target


@dataclass
class WsFrame:
    kind: str  # text | binary | ping | pong | close
    data: bytes
    code: int | None = None  # close frames


class Connection:
    """What one accepted connection delivered."""

    def __init__(self, peer: tuple[str, int]):
        self.peer = peer
        self.opened = time.monotonic()
        self.raw = bytearray()
        self.requests: list[RecordedRequest] = []
        self.frames: list[WsFrame] = []
        self.alpn: str | None = None
        self.tls_error: str = ""
        self.closed = False
        self.last_byte = self.opened


class _H1Parser:
    """Incremental HTTP/1.1 request parser: heads, Content-Length and chunked bodies (with
    chunk extensions and trailers). Body bytes are appended the moment they arrive."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.state = "head"
        self.remaining = 0
        self.request: RecordedRequest | None = None

    def feed(self, data: bytes) -> list[tuple[str, RecordedRequest]]:
        """Consume bytes; returns events: ("head", req) and ("end", req)."""
        self.buf += data
        out: list[tuple[str, RecordedRequest]] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[tuple[str, RecordedRequest]]) -> bool:
        buf = self.buf
        if self.state == "head":
            while buf.startswith(b"\r\n"):
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end])
            del buf[: end + 4]
            lines = head.split(b"\r\n")
            parts = lines[0].decode("latin-1").split(" ")
            parts += [""] * (3 - len(parts))
            headers = []
            for line in lines[1:]:
                key, _, value = line.decode("latin-1").partition(":")
                headers.append((key.strip(), value.strip()))
            req = RecordedRequest(parts[0], parts[1], parts[2], headers)
            self.request = req
            out.append(("head", req))
            te = (req.header("transfer-encoding") or "").lower()
            length = req.header("content-length")
            if "chunked" in te:
                self.state = "chunk-size"
            elif length and length.strip().isdigit() and int(length) > 0:
                self.state, self.remaining = "length", int(length)
            else:
                self._finish(out)
            return True
        req = self.request
        assert req is not None
        if self.state in ("length", "chunk-data"):
            if not buf:
                return False
            take = bytes(buf[: self.remaining])
            del buf[: len(take)]
            req.body += take
            self.remaining -= len(take)
            if self.remaining:
                return False
            if self.state == "length":
                self._finish(out)
            else:
                self.state = "chunk-crlf"
            return True
        if self.state == "chunk-crlf":
            if len(buf) < 2:
                return False
            del buf[:2]
            self.state = "chunk-size"
            return True
        if self.state in ("chunk-size", "trailers"):
            i = buf.find(b"\r\n")
            if i < 0:
                return False
            line = bytes(buf[:i])
            del buf[: i + 2]
            if self.state == "trailers":
                if not line:
                    self._finish(out)
                else:
                    key, _, value = line.decode("latin-1").partition(":")
                    req.trailers.append((key.strip(), value.strip()))
                return True
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.state = "broken"  # not HTTP any more: keep the raw bytes only
                return False
            if size == 0:
                self.state = "trailers"
            else:
                self.state, self.remaining = "chunk-data", size
            return True
        return False  # broken

    def _finish(self, out: list[tuple[str, RecordedRequest]]) -> None:
        assert self.request is not None
        self.request.complete = True
        out.append(("end", self.request))
        self.state = "head"


class Recorder:
    """A loopback server that records every byte it receives, per connection (thread-safe)."""

    def __init__(
        self,
        mode: str = "http",
        *,
        tls: TestCA | None = None,
        alpn: tuple[str, ...] | None = None,
        answer: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        assert mode in ("http", "sink", "echo", "ws"), mode
        self.mode = mode
        self.tls = tls
        self.alpn = alpn
        self.answer = answer
        self.host = host
        self.port = port
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._context = tls.server_context(alpn) if tls else None

    # --- lifecycle ---

    def start(self) -> Recorder:
        self._sock = socket.create_server((self.host, self.port))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                sock, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = Connection(peer)
            with self._lock:
                if len(self.connections) >= MAX_CONNECTIONS:
                    sock.close()
                    continue
                self.connections.append(conn)
            self._spawn(self._serve, sock, conn)

    # --- per connection ---

    def _serve(self, sock: socket.socket, conn: Connection) -> None:
        sock.settimeout(0.2)
        with contextlib.ExitStack() as stack:
            stack.callback(sock.close)
            if self._context is not None:
                try:
                    sock.settimeout(10)
                    sock = self._context.wrap_socket(sock, server_side=True)
                    sock.settimeout(0.2)
                    stack.callback(sock.close)
                except (OSError, ssl.SSLError) as e:
                    conn.tls_error = str(e)
                    conn.closed = True
                    return
                conn.alpn = sock.selected_alpn_protocol()
            handler = self._handler(conn)
            deadline = time.monotonic() + 120  # no connection outlives a test module
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    break
                if not data:
                    break
                with self._lock:
                    conn.raw += data
                    conn.last_byte = time.monotonic()
                try:
                    reply = handler(data)
                except Exception as e:  # a protocol error: keep recording raw bytes
                    conn.tls_error = conn.tls_error or f"parser: {e!r}"
                    handler = self._raw_handler()
                    reply = b""
                if reply:
                    with contextlib.suppress(OSError):
                        sock.sendall(reply)
            conn.closed = True

    def _raw_handler(self) -> object:
        echo = self.mode == "echo"
        return lambda data: data if echo else b""

    def _handler(self, conn: Connection):
        if self.mode in ("sink", "echo"):
            return self._raw_handler()
        if self.mode == "ws":
            return _WsHandler(self, conn)
        if conn.alpn == "h2":
            return _H2Handler(self, conn)
        return _HttpHandler(self, conn)

    # --- what arrived ---

    def received_bytes(self) -> bytes:
        """Every raw byte of every connection, in the order the connections were accepted."""
        with self._lock:
            return b"".join(bytes(c.raw) for c in self.connections)

    def per_connection(self) -> list[bytes]:
        with self._lock:
            return [bytes(c.raw) for c in self.connections]

    def decoded_bytes(self) -> bytes:
        """What the protocol layer extracted: request bodies (de-chunked), trailer values and
        WebSocket payloads (unmasked)."""
        with self._lock:
            parts: list[bytes] = []
            for c in self.connections:
                for r in c.requests:
                    parts.append(bytes(r.body))
                    parts += [f"{k}: {v}".encode("latin-1", "replace") for k, v in r.trailers]
                parts += [f.data for f in c.frames]
            return b"\n".join(parts)

    def contains(self, needle: bytes) -> bool:
        """``needle`` anywhere in the raw bytes or in a decoded body/payload."""
        return needle in self.received_bytes() or needle in self.decoded_bytes()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for c in self.connections for r in c.requests]

    @property
    def frames(self) -> list[WsFrame]:
        with self._lock:
            return [f for c in self.connections for f in c.frames]

    def find(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def body_bytes(self, path: str | None = None) -> int:
        """Request body bytes that arrived (for one path, or all)."""
        reqs = self.requests if path is None else self.find(path)
        return sum(len(r.body) for r in reqs)

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Wait until no byte has arrived for ``quiet`` seconds (bounded by ``timeout``): the
        gateway may still be forwarding after the client got its answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                last = max((c.last_byte for c in self.connections), default=0.0)
            if time.monotonic() - last >= quiet:
                return
            time.sleep(0.05)

    def wait_for(self, predicate: object, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):  # type: ignore[operator]
                return True
            time.sleep(0.05)
        return bool(predicate(self))  # type: ignore[operator]


def _response(status: int, body: bytes, extra: str = "") -> bytes:
    reason = {100: "Continue", 101: "Switching Protocols", 200: "OK"}.get(status, "X")
    head = f"HTTP/1.1 {status} {reason}\r\n"
    if status >= 200:
        head += f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


class _HttpHandler:
    def __init__(self, recorder: Recorder, conn: Connection):
        self.recorder = recorder
        self.conn = conn
        self.parser = _H1Parser()
        self.h2: _H2Handler | None = None
        self.started = False

    def __call__(self, data: bytes) -> bytes:
        if self.h2 is not None:
            return self.h2(data)
        if not self.started:
            self.started = True
            if data.startswith(H2_PREFACE[: len(data)]) and len(data) >= 3:
                self.h2 = _H2Handler(self.recorder, self.conn)  # prior knowledge / h2c
                return self.h2(data)
        out = b""
        with self.recorder._lock:
            events = self.parser.feed(data)
            for kind, req in events:
                if kind == "head":
                    self.conn.requests.append(req)
        for kind, req in events:
            if not self.recorder.answer:
                continue
            if kind == "head" and (req.header("expect") or "").lower() == "100-continue":
                out += _response(100, b"")
            elif kind == "end":
                out += _response(200, f"ok {len(req.body)}".encode())
        return out


class _H2Handler:
    def __init__(self, recorder: Recorder, conn: Connection):
        import h2.config
        import h2.connection

        self.recorder = recorder
        self.conn = conn
        config = h2.config.H2Configuration(
            client_side=False, validate_inbound_headers=False, header_encoding="utf-8"
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()
        self.streams: dict[int, RecordedRequest] = {}
        self.first = True

    def __call__(self, data: bytes) -> bytes:
        import h2.events

        out = b""
        if self.first:
            self.first = False
            out += self.h2.data_to_send()
        events = self.h2.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers = [(str(k), str(v)) for k, v in event.headers]
                pseudo = dict(headers)
                req = RecordedRequest(
                    pseudo.get(":method", ""),
                    pseudo.get(":path", ""),
                    "HTTP/2",
                    headers,
                    protocol="HTTP/2",
                )
                with self.recorder._lock:
                    self.conn.requests.append(req)
                self.streams[event.stream_id] = req
            elif isinstance(event, h2.events.DataReceived):
                req = self.streams.get(event.stream_id)
                if req is not None:
                    with self.recorder._lock:
                        req.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                req = self.streams.get(event.stream_id)
                if req is not None:
                    req.trailers += [(str(k), str(v)) for k, v in event.headers]
            elif isinstance(event, h2.events.StreamEnded):
                req = self.streams.get(event.stream_id)
                if req is not None:
                    req.complete = True
                    if self.recorder.answer:
                        body = f"ok {len(req.body)}".encode()
                        self.h2.send_headers(
                            event.stream_id,
                            [(":status", "200"), ("content-length", str(len(body)))],
                        )
                        self.h2.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, h2.events.StreamReset):
                req = self.streams.get(event.stream_id)
                if req is not None:
                    req.reset = True
        return out + self.h2.data_to_send()


class _WsHandler:
    def __init__(self, recorder: Recorder, conn: Connection):
        from wsproto import ConnectionType, WSConnection

        self.recorder = recorder
        self.conn = conn
        self.ws = WSConnection(ConnectionType.SERVER)

    def _frame(self, frame: WsFrame) -> None:
        with self.recorder._lock:
            self.conn.frames.append(frame)

    def __call__(self, data: bytes) -> bytes:
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Ping,
            Pong,
            Request,
            TextMessage,
        )

        self.ws.receive_data(data)
        out = b""
        for event in self.ws.events():
            if isinstance(event, Request):
                headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.extra_headers
                ]
                req = RecordedRequest(
                    "GET", event.target, "HTTP/1.1", headers, protocol="websocket"
                )
                req.complete = True
                with self.recorder._lock:
                    self.conn.requests.append(req)
                out += self.ws.send(AcceptConnection())
            elif isinstance(event, TextMessage):
                self._frame(WsFrame("text", event.data.encode()))
                out += self.ws.send(
                    TextMessage(data=event.data, message_finished=event.message_finished)
                )
            elif isinstance(event, BytesMessage):
                self._frame(WsFrame("binary", bytes(event.data)))
                out += self.ws.send(
                    BytesMessage(data=event.data, message_finished=event.message_finished)
                )
            elif isinstance(event, Ping):
                self._frame(WsFrame("ping", bytes(event.payload)))
                out += self.ws.send(event.response())
            elif isinstance(event, Pong):
                self._frame(WsFrame("pong", bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                self._frame(WsFrame("close", (event.reason or "").encode(), event.code))
                with contextlib.suppress(Exception):
                    out += self.ws.send(event.response())
        return out
