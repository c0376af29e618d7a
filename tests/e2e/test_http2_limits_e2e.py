"""HTTP/2 header limits through the real gateway: an oversized header list and a CONTINUATION
flood end the client's connection early, reach nobody, and leave the gateway serving others."""

from __future__ import annotations

import socket
import ssl

import hpack
import pytest
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from harness import GatewayProcess, curl
from support import POLICIES

pytestmark = pytest.mark.slow

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FLOOD_BYTES = 20 * 1024 * 1024  # every flood loop is bounded


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    g = GatewayProcess(tmp_path_factory.mktemp("gw-h2"), POLICIES, upstream.ca_path).start()
    idle = h2_through_proxy(g, upstream)  # still connected when the gateway stops
    yield g
    assert g.stop() == 0
    idle.close()
    # Stopping with a client connected is not an error (Python 3.11 used to print one).
    assert "Traceback" not in g.text(), g.text()[-3000:]


def h2_through_proxy(gw, upstream) -> ssl.SSLSocket:
    """A CONNECT tunnel to the upstream, TLS with the gateway (ALPN h2), the client preface."""
    raw = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10)
    target = f"127.0.0.1:{upstream.https_port}"
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(gw.ca_pem()))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(raw, server_hostname="upstream.test")
    assert tls.selected_alpn_protocol() == "h2"
    tls.sendall(PREFACE + SettingsFrame(0).serialize())
    return tls


def request_block(path: str, extra: list[tuple[str, str]]) -> bytes:
    pseudo = [(":method", "GET"), (":scheme", "https"), (":authority", "upstream.test")]
    return hpack.Encoder().encode([*pseudo, (":path", path), *extra])


def frames_until_closed(tls: ssl.SSLSocket) -> list[Frame]:
    """Frames the gateway sends until it closes the connection (bounded by the timeout)."""
    data = b""
    try:
        while chunk := tls.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def assert_gateway_still_serves(gw, upstream, path: str) -> None:
    reply = curl(f"https://127.0.0.1:{upstream.https_port}{path}", gw.proxy, gw.ca_pem())
    assert reply.status == 200, reply


def test_an_oversized_header_list_ends_the_connection_and_reaches_nobody(gw, upstream):
    tls = h2_through_proxy(gw, upstream)
    block = request_block("/h2-huge-head", [(f"x-pad-{i}", "a" * 1000) for i in range(200)])
    assert len(block) > 100_000  # far over the 64 KiB header list limit
    chunks = [block[i : i + 16_384] for i in range(0, len(block), 16_384)]
    first = HeadersFrame(1, chunks[0], flags=["END_STREAM"])
    frames = [first] + [ContinuationFrame(1, c) for c in chunks[1:]]
    frames[-1].flags.add("END_HEADERS")
    try:
        for frame in frames:
            tls.sendall(frame.serialize())
    except OSError:
        pass  # the gateway may close before the last frame
    got = frames_until_closed(tls)
    tls.close()
    assert any(isinstance(f, GoAwayFrame) and f.error_code != 0 for f in got), got
    assert upstream.find("/h2-huge-head") is None
    assert_gateway_still_serves(gw, upstream, "/after-huge-head")


@pytest.mark.parametrize("fragment", [b"", b"\x00"], ids=["empty", "one-byte"])
def test_a_continuation_flood_is_cut_early(gw, upstream, fragment):
    tls = h2_through_proxy(gw, upstream)
    block = request_block("/h2-flood", [])
    tls.sendall(HeadersFrame(1, block, flags=["END_STREAM"]).serialize())
    frame = ContinuationFrame(1, fragment).serialize()
    burst = frame * 256
    sent = 0
    try:
        while sent < MAX_FLOOD_BYTES:
            tls.sendall(burst)
            sent += len(burst)
    except OSError:
        pass
    got = frames_until_closed(tls)
    tls.close()
    assert sent < MAX_FLOOD_BYTES, "the gateway kept reading an endless header block"
    assert any(isinstance(f, GoAwayFrame) and f.error_code != 0 for f in got), got
    assert upstream.find("/h2-flood") is None
    assert_gateway_still_serves(gw, upstream, "/after-flood")
