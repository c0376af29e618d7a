"""Protocol errors through the real gateway: requests with trailers are forwarded (mitmproxy
alone crashes its connection handler on them), HTTP/2 requests that would inject into an
HTTP/1 upstream are refused or framed, and every request refused before a flow exists gets its
row in the request log."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import pytest

from harness import GatewayProcess
from support import policy_copy

pytestmark = pytest.mark.slow

TIMEOUT = 10
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@dataclass
class RawUpstream:
    """An HTTP/1 upstream (plain and TLS) that keeps the bytes of each request as they came:
    one request per connection, answered 200 once it is complete."""

    cert_file: str
    requests: list[bytes] = field(default_factory=list)
    plain_port: int = 0
    tls_port: int = 0
    _socks: list[socket.socket] = field(default_factory=list)
    _done: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> RawUpstream:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file)
        for wrap in (None, ctx):
            s = socket.create_server(("127.0.0.1", 0))
            s.settimeout(0.5)
            self._socks.append(s)
            threading.Thread(target=self._accept, args=(s, wrap), daemon=True).start()
        self.plain_port = self._socks[0].getsockname()[1]
        self.tls_port = self._socks[1].getsockname()[1]
        return self

    def stop(self) -> None:
        for s in self._socks:
            s.close()

    def _accept(self, listener: socket.socket, ctx: ssl.SSLContext | None) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, ctx), daemon=True).start()

    def _serve(self, conn: socket.socket, ctx: ssl.SSLContext | None) -> None:
        conn.settimeout(TIMEOUT)
        data = b""
        try:
            if ctx is not None:
                conn = ctx.wrap_socket(conn, server_side=True)
            while not complete(data):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if complete(data):
                conn.sendall(OK)
        except OSError:
            pass
        finally:
            conn.close()
            with self._done:
                if data:
                    self.requests.append(data)
                self._done.notify_all()

    def request_for(self, path: bytes) -> bytes | None:
        """The raw request whose line names ``path``, waiting (bounded) for its handler."""
        with self._done:
            self._done.wait_for(
                lambda: any(
                    r.split(b"\r\n", 1)[0].split(b" ")[1:2] == [path] for r in self.requests
                ),
                timeout=TIMEOUT,
            )
            return next(
                (r for r in self.requests if r.split(b"\r\n", 1)[0].split(b" ")[1:2] == [path]),
                None,
            )


def complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        return b"0\r\n" in body and body.endswith(b"\r\n\r\n")
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return True


@pytest.fixture(scope="module")
def raw_upstream(upstream):
    up = RawUpstream(str(upstream.tmp / "upstream.pem")).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    base = tmp_path_factory.mktemp("gw-protocol-errors")
    g = GatewayProcess(base / "data", policy_copy(base), upstream.ca_path).start()
    yield g
    g.stop()
    text = g.text()
    assert "mitmproxy has crashed" not in text and "Traceback" not in text, text[-3000:]


def raw(gw: GatewayProcess, data: bytes) -> bytes:
    """Send ``data``, read the answer until the gateway closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=TIMEOUT) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


@dataclass
class H2Answer:
    status: bytes | None = None
    goaway: bool = False
    reset: bool = False


def h2_request(
    gw: GatewayProcess,
    port: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None = None,
    trailers: list[tuple[bytes, bytes]] | None = None,
) -> H2Answer:
    """One HTTP/2 request through a CONNECT tunnel, sent as a hostile client may send it."""
    with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=TIMEOUT) as s:
        s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply
        ctx = ssl.create_default_context(cafile=str(gw.ca_pem()))
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["h2"])
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            assert t.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(
                    client_side=True,
                    header_encoding=None,
                    validate_outbound_headers=False,
                    normalize_outbound_headers=False,
                )
            )
            conn.initiate_connection()
            conn.send_headers(1, headers, end_stream=body is None and not trailers)
            if body is not None:
                conn.send_data(1, body, end_stream=not trailers)
            if trailers:
                conn.send_headers(1, trailers, end_stream=True)
            t.sendall(conn.data_to_send())
            answer = H2Answer()
            while True:
                try:
                    data = t.recv(65536)
                except (TimeoutError, ConnectionResetError, ssl.SSLError):
                    return answer
                if not data:
                    return answer
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        answer.status = dict(event.headers)[b":status"]
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        answer.goaway = True
                        return answer
                    elif isinstance(event, h2.events.StreamReset):
                        answer.reset = True
                        return answer
                    elif isinstance(event, h2.events.StreamEnded):
                        return answer
                if out := conn.data_to_send():
                    t.sendall(out)


def head(method: bytes, path: bytes, port: int, **extra: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b":path", path),
        *((k.replace("_", "-").encode(), v) for k, v in extra.items()),
    ]


# --- forwarded, not crashed ----------------------------------------------------------------------


def test_an_http1_chunked_request_with_trailers_is_forwarded_with_them(gw, raw_upstream):
    port = raw_upstream.plain_port
    answer = raw(
        gw,
        f"POST http://127.0.0.1:{port}/h1-trailers HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), answer[:200]
    seen = raw_upstream.request_for(b"/h1-trailers")
    assert seen is not None and seen.endswith(b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n")


def test_an_http2_request_with_trailers_reaches_an_http1_upstream_with_them(gw, raw_upstream):
    port = raw_upstream.tls_port
    answer = h2_request(
        gw, port, head(b"POST", b"/h2-trailers", port), b"hello", [(b"x-checksum", b"abc")]
    )
    assert answer.status == b"200", answer
    seen = raw_upstream.request_for(b"/h2-trailers")
    assert seen is not None
    assert b"transfer-encoding: chunked\r\n" in seen.lower()
    assert seen.endswith(b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"), seen


def test_an_http2_body_without_a_length_cannot_smuggle_a_request(gw, raw_upstream):
    port = raw_upstream.tls_port
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: mail.qq.com\r\n\r\n"
    answer = h2_request(gw, port, head(b"GET", b"/h2-getbody", port), smuggled)
    assert answer.status == b"200", answer
    seen = raw_upstream.request_for(b"/h2-getbody")
    assert seen is not None
    request_head, _, body = seen.partition(b"\r\n\r\n")
    assert f"content-length: {len(smuggled)}".encode() in request_head.lower()
    assert body == smuggled  # the upstream reads it as the body, not as a request


@pytest.mark.parametrize(
    "extra",
    [{"x_a": b"1\r\nX-Injected: yes"}, {"x_a": b"1\r\n\r\nGET /smuggled HTTP/1.1"}],
    ids=["header", "request"],
)
def test_http2_fields_with_line_breaks_are_refused_before_the_upstream(gw, raw_upstream, extra):
    port = raw_upstream.tls_port
    path = f"/h2-inject-{len(extra['x_a'])}".encode()
    answer = h2_request(gw, port, head(b"GET", path, port, **extra))
    assert answer.status == b"400", answer
    assert raw_upstream.request_for(path) is None


# --- every refusal gets its row -------------------------------------------------------------------

HTTP1_REFUSALS = [
    # (what the client sends, status it gets, what the row holds)
    (b"GARBAGE /garbage\r\n\r\n", 400, {"method": "GARBAGE", "path": "/garbage"}),
    (
        b"GET http://mail%2eqq.com/pct HTTP/1.1\r\nHost: mail.qq.com\r\n\r\n",
        400,
        {"host": "mail.qq.com", "path": "/pct"},
    ),
    (
        "GET http://ｍａｉｌ.qq.com/fullwidth HTTP/1.1\r\n\r\n".encode(),
        400,
        {"host": "mail.qq.com", "path": "/fullwidth"},
    ),
    (b"GET /no-host HTTP/1.1\r\n\r\n", 400, {"path": "/no-host", "host": ""}),
    (
        b"GET /bad-host HTTP/1.1\r\nHost: a b\r\n\r\n",
        400,
        {"path": "/bad-host", "host": "a b"},
    ),
]


def test_http1_requests_refused_before_a_flow_get_block_rows(gw):
    for data, status, _ in HTTP1_REFUSALS:
        assert raw(gw, data).startswith(f"HTTP/1.1 {status}".encode()), data
    wanted = [row for _, _, row in HTTP1_REFUSALS]

    def found(rows: list[dict]) -> bool:
        return all(any(matches(r, w) for r in rows) for w in wanted)

    rows = gw.wait_rows(found, "--decision", "block")
    for want in wanted:
        [row] = [r for r in rows if matches(r, want)]
        assert row["kind"] == "http" and row["reason_kind"] == "error"
        assert row["status"] == 400 and row["client_ip"] == "127.0.0.1" and row["error"]


def test_malformed_http2_requests_get_block_rows(gw, raw_upstream):
    port = raw_upstream.tls_port
    upper = h2_request(gw, port, head(b"POST", b"/h2-upper", port, X_Upper=b"1"))
    inject = h2_request(gw, port, head(b"GET", b"/h2-crlf", port, x_a=b"1\r\nX-Injected: 1"))
    assert upper.goaway and inject.status == b"400"
    rows = gw.wait_rows(
        lambda rs: {"/h2-upper", "/h2-crlf"} <= {r["path"] for r in rs}, "--decision", "block"
    )
    by_path = {r["path"]: r for r in rows}
    assert by_path["/h2-upper"]["status"] == 0 and "uppercase" in by_path["/h2-upper"]["error"]
    assert by_path["/h2-crlf"]["status"] == 400 and "CR, LF" in by_path["/h2-crlf"]["error"]
    for row in (by_path["/h2-upper"], by_path["/h2-crlf"]):
        assert row["http_version"] == "HTTP/2.0" and row["host"] == "127.0.0.1", row
        assert row["tls_intercepted"] and row["reason_kind"] == "error"


def matches(row: dict, want: dict) -> bool:
    return all(row.get(k) == v for k, v in want.items())
