"""Nothing leaves before its verdict: attacks on the transport, through the real gateway.

Every test asserts on the bytes a recording upstream (``recorder.py``) received, never on the
status the client got; each attack class has a positive control (the same transport with a
clean body arrives byte for byte) so that a test cannot pass because nothing works at all.

Classes:
1. streamed bodies forwarded before the verdict (large, chunked, HTTP/2 without a length,
   documents whose marker shows only after decoding);
2. non-HTTP bytes inside CONNECT tunnels (raw TCP, TLS with a non-HTTP ALPN, the DNS layer);
3. an absolute-form target naming a blocked host inside a tunnel to an allowed one;
4. requests that leave no row (trailers, malformed HTTP/2, smuggling-shaped heads, encoded
   hosts), and must not crash the proxy;
5. the gateway's own console and metrics ports reached through the proxy;
and WebSocket control frames (ping, pong, close payloads).

Tests marked ``xfail(strict=True)`` leak at the commit they were written against; the reason
says what leaks. A fix turns them red (XPASS) until the mark is removed.

All servers are on 127.0.0.1; class 2's DNS case binds 127.0.0.1:53 (skipped when it cannot).
Requests to blocked names never leave loopback: they go inside tunnels to a recorder, never as
regular proxy requests (which would make the gateway resolve them).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest
from recorder import Recorder, TestCA

from documents import docx
from harness import GatewayProcess, curl
from support import policy_copy

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
MARK = "机密★5年"  # national_secret, action block in the shipped policies/markers.yaml
MARKB = MARK.encode()
CRASH = "mitmproxy has crashed"
TIMEOUT = 15  # every socket


def clean_text(size: int, seed: str = "") -> bytes:
    """Benign text of exactly ``size`` bytes (no marker of any level)."""
    line = f"普通的会议纪要 {seed} quarterly notes, nothing to see here. 天气晴。\n".encode()
    out = (line * (size // len(line) + 1))[:size]
    return out


def marked_text(size: int) -> bytes:
    """``size`` bytes of text whose first line is the marker."""
    head = f"{MARK} 内部讨论稿\n".encode()
    return head + clean_text(size - len(head))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("recorder-ca"))


RAW_TCP_HOST = "localhost"  # raw TCP allowed to this name (to 127.0.0.1 it stays refused)


def _gateway(base: Path, ca: TestCA) -> GatewayProcess:
    """The shipped policy, with raw TCP allowed to ``RAW_TCP_HOST``; the upstream trust holds
    the recorders' CA and the gateway's own CA (made before the start, as an admin would
    install it on the gateway host too), so the gateway's console is a reachable TLS upstream
    like any other."""
    from mitmproxy import certs

    data = base / "data"
    certs.CertStore.from_store(data / "mitmproxy", "mitmproxy", 2048)
    bundle = base / "upstream-trust.pem"
    bundle.write_bytes(
        ca.pem.read_bytes() + (data / "mitmproxy" / "mitmproxy-ca-cert.pem").read_bytes()
    )
    policies = policy_copy(base)
    settings = policies / "gateway.yaml"
    text = settings.read_text(encoding="utf-8")
    assert "raw_tcp_hosts: []" in text
    settings.write_text(text.replace("raw_tcp_hosts: []", f"raw_tcp_hosts: [{RAW_TCP_HOST}]"))
    return GatewayProcess(data, policies, bundle).start()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, ca):
    g = _gateway(tmp_path_factory.mktemp("gw-transport"), ca)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def gw_console(tmp_path_factory, ca):
    """A gateway of its own for class 5: lock-out attempts must not throttle the row queries of
    the other tests."""
    g = _gateway(tmp_path_factory.mktemp("gw-console-ports"), ca)
    g.bootstrap = (g.data_dir / "admin-token").read_text().strip()
    yield g
    g.stop()


@pytest.fixture
def recorders(ca):
    """Make recorders for one test; all stopped at its end."""
    made: list[Recorder] = []

    def make(
        mode: str = "http", *, tls: bool = False, alpn: tuple[str, ...] | None = ("http/1.1",), **kw
    ) -> Recorder:
        rec = Recorder(mode, tls=ca if tls else None, alpn=alpn if tls else None, **kw).start()
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.stop()


@pytest.fixture
def log_mark(gw):
    """Where the gateway's output stood when the test began: its new lines are checked."""
    start = len(gw.output)
    return lambda: "".join(gw.output[start:])


# --- clients ---------------------------------------------------------------------------------


def read_head(sock: socket.socket, limit: int = 65536) -> bytes:
    buf = b""
    deadline = time.monotonic() + TIMEOUT
    while b"\r\n\r\n" not in buf and len(buf) < limit and time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except (TimeoutError, ssl.SSLError, OSError):
            break
        if not chunk:
            break
        buf += chunk
    return buf


def read_response(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """(status, raw bytes) of one HTTP/1 response; status 0 when none came."""
    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            first = head.split(b"\r\n", 1)[0].split()
            if len(first) > 1 and first[1] == b"100":
                buf = body  # an interim answer: the real one follows
                continue
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")[1:]
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is not None and len(body) >= length:
                break
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, OSError):
            break
        if not chunk:
            break
        buf += chunk
    first = buf.split(b"\r\n", 1)[0].split()
    status = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0
    return status, buf


def proxy_socket(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=TIMEOUT)


def tunnel(
    gw: GatewayProcess,
    port: int,
    *,
    tls: bool = False,
    alpn: tuple[str, ...] | None = None,
    host: str = "127.0.0.1",
) -> socket.socket:
    """CONNECT host:port through the gateway; with ``tls``, a TLS session inside it that trusts
    the gateway's CA."""
    sock = proxy_socket(gw)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = read_head(sock)
    assert head.split(b"\r\n", 1)[0].split()[1:2] == [b"200"], head
    if not tls:
        return sock
    context = ssl.create_default_context(cafile=str(gw.ca_pem()))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    tls_sock = context.wrap_socket(sock, server_hostname=host)
    tls_sock.settimeout(TIMEOUT)
    return tls_sock


def send_chunked(
    sock: socket.socket,
    head: bytes,
    chunks: list[bytes],
    pause: float = 0.2,
    end: bytes = b"0\r\n\r\n",
) -> None:
    """The head, then one chunk per write with a pause between; ``end`` closes the body."""
    sock.sendall(head)
    for i, chunk in enumerate(chunks):
        if i:
            time.sleep(pause)
        with contextlib.suppress(OSError):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    if end:
        with contextlib.suppress(OSError):
            sock.sendall(end)


def chunked_post(
    gw: GatewayProcess,
    rec: Recorder,
    path: str,
    chunks: list[bytes],
    *,
    tls: bool,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
    pause: float = 0.2,
    end: bytes = b"0\r\n\r\n",
    wait: float = TIMEOUT,
) -> int:
    """POST a chunked body in several writes (absolute-form through the proxy for http, inside
    an intercepted CONNECT tunnel for https). Returns the status the client got."""
    authority = f"127.0.0.1:{rec.port}"
    if tls:
        sock, target = tunnel(gw, rec.port, tls=True, alpn=("http/1.1",)), path
    else:
        sock, target = proxy_socket(gw), f"http://{authority}{path}"
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: {content_type}\r\n"
        f"Transfer-Encoding: chunked\r\n{extra}\r\n"
    ).encode()
    with sock:
        send_chunked(sock, head, chunks, pause, end)
        status, _ = read_response(sock, wait)
    return status


def curl_post(gw, rec, path, body, *, tls, content_type="text/plain; charset=utf-8", chunked=False):
    scheme = "https" if tls else "http"
    headers = {"Content-Type": content_type}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    return curl(
        f"{scheme}://127.0.0.1:{rec.port}{path}",
        gw.proxy,
        gw.ca_pem(),
        method="POST",
        data=body,
        headers=headers,
    )


class H2Client:
    """HTTP/2 over a TLS tunnel through the gateway, with the h2 library (optionally without
    header validation, to send what a hostile client sends)."""

    def __init__(self, sock: ssl.SSLSocket, validate: bool = True):
        import h2.config
        import h2.connection

        assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        self.sock = sock
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.status = 0
        self.body = b""
        self.done = False  # the stream ended or was reset, or the connection closed
        self.reset_code: int | None = None
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def _pump(self, timeout: float) -> bool:
        """Read once and handle the events; False when the connection is gone."""
        import h2.events
        import h2.exceptions

        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.done = True
            return False
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.done = True
            return False
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self.status = int(dict(event.headers).get(":status", 0))
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.done = True
            elif isinstance(event, h2.events.StreamReset):
                self.done, self.reset_code = True, event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.done = True
        self._flush()
        return True

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        import h2.exceptions

        if not data and end:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.end_stream(sid)
            self._flush()
            return
        deadline = time.monotonic() + TIMEOUT
        while data and not self.done and time.monotonic() < deadline:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self._pump(0.5)
                continue
            piece, data = data[:window], data[window:]
            try:
                self.conn.send_data(sid, piece, end_stream=end and not data)
            except h2.exceptions.ProtocolError:
                self.done = True
                return
            self._flush()

    def request(
        self,
        headers: list[tuple[str, str]],
        chunks: list[bytes],
        *,
        pause: float = 0.2,
        trailers: list[tuple[str, str]] | None = None,
        wait: float = TIMEOUT,
    ) -> tuple[int, bytes]:
        import h2.exceptions

        sid = self.conn.get_next_available_stream_id()
        try:
            self.conn.send_headers(sid, headers, end_stream=not chunks and not trailers)
        except h2.exceptions.ProtocolError:
            self.done = True
            return 0, b""
        self._flush()
        for i, chunk in enumerate(chunks):
            if i:
                end = time.monotonic() + pause
                while time.monotonic() < end and not self.done:
                    self._pump(max(0.01, end - time.monotonic()))
            if self.done:
                break
            last = i == len(chunks) - 1 and not trailers
            self.send_data(sid, chunk, last)
        if trailers and not self.done:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.send_headers(sid, trailers, end_stream=True)
            self._flush()
        deadline = time.monotonic() + wait
        while not self.done and time.monotonic() < deadline:
            if not self._pump(0.5):
                break
        return self.status, self.body


def h2_headers(rec: Recorder, path: str, extra: list[tuple[str, str]] | None = None):
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", f"127.0.0.1:{rec.port}"),
        (":path", path),
        ("content-type", "text/plain; charset=utf-8"),
        *(extra or []),
    ]


def h2_post(
    gw, rec, path, chunks, *, trailers=None, headers=None, validate=True, pause=0.2, wait=TIMEOUT
):
    sock = tunnel(gw, rec.port, tls=True, alpn=("h2", "http/1.1"))
    with sock:
        client = H2Client(sock, validate=validate)
        return client.request(
            headers or h2_headers(rec, path), chunks, trailers=trailers, pause=pause, wait=wait
        )


# --- what the upstream got, and the row --------------------------------------------------------


class Findings:
    """Soft checks: every problem of one attack is reported together (what leaked, what the row
    says, what the gateway printed), so a failing test tells the whole story."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, ok: object, what: str) -> bool:
        if not ok:
            self.problems.append(what)
        return bool(ok)

    def verify(self) -> None:
        assert not self.problems, "\n- " + "\n- ".join(self.problems)


def upstream_summary(rec: Recorder) -> str:
    reqs = [
        f"{r.protocol} {r.method} {r.target} body={len(r.body)}B complete={r.complete}"
        + (f" trailers={r.trailers}" if r.trailers else "")
        for r in rec.requests
    ]
    raw = rec.received_bytes()
    return f"{len(rec.connections)} connection(s), {len(raw)} raw bytes, requests {reqs}"


def row_summary(row: dict) -> str:
    keys = ("kind", "host", "port", "path", "status", "decision", "reason_kind", "rule_id")
    more = ("upload_bytes", "error")
    return str({k: row.get(k) for k in (*keys, *more)})


def rows_where(gw, predicate, timeout: float = 5) -> list[dict]:
    rows = gw.wait_rows(lambda rs: any(predicate(r) for r in rs), timeout=timeout)
    return [r for r in rows if predicate(r)]


def rows_for(gw, path: str, timeout: float = 5) -> list[dict]:
    return rows_where(gw, lambda r: r["path"] == path and r["kind"] == "http", timeout)


def expect_row(f: Findings, gw, path: str, reason_kind: str | None = "marker") -> dict | None:
    """One row for ``path`` saying block (for ``reason_kind``)."""
    rows = rows_for(gw, path)
    if not f.check(rows, f"no row for {path}"):
        return None
    if not f.check(len(rows) == 1, f"{len(rows)} rows for {path}"):
        return rows[0]
    (row,) = rows
    f.check(row["decision"] == "block", f"row does not say block: {row_summary(row)}")
    if reason_kind and row["decision"] == "block":
        f.check(row["reason_kind"] == reason_kind, f"row reason: {row_summary(row)}")
    return row


def expect_no_marker(f: Findings, rec: Recorder) -> None:
    rec.settle()
    raw = rec.received_bytes()
    at = raw.find(MARKB)
    f.check(
        not rec.contains(MARKB),
        "the marker reached the upstream"
        + (f" at raw byte {at}: {raw[max(0, at - 60) : at + 20]!r}" if at >= 0 else " (decoded)")
        + f"; {upstream_summary(rec)}",
    )


def expect_no_body(f: Findings, rec: Recorder, path: str) -> None:
    """The upstream got none of the body: no connection, or only a head without a body byte."""
    expect_no_marker(f, rec)
    got = [r for r in rec.find(path) if r.body or r.complete]
    f.check(not got, f"body bytes reached the upstream: {upstream_summary(rec)}")


def expect_nothing(f: Findings, rec: Recorder) -> None:
    """Not one byte reached the upstream."""
    rec.settle()
    raw = rec.received_bytes()
    f.check(not raw, f"the upstream received {len(raw)} bytes: {raw[:120]!r}")


def expect_no_crash(f: Findings, log: str) -> None:
    at = log.find(CRASH)
    f.check(at < 0, "the gateway printed: " + log[at : at + 120].replace("\n", " | "))
    if at >= 0:
        last = [ln for ln in log[at:].splitlines() if ln.strip()][-1:]
        f.problems[-1] += f" ... {last[0].strip() if last else ''}"


def assert_arrived_whole(rec: Recorder, path: str, body: bytes) -> None:
    assert rec.wait_for(lambda r: any(q.complete for q in r.find(path)), timeout=10), (
        upstream_summary(rec)
    )
    (req,) = rec.find(path)
    assert len(req.body) == len(body)
    assert hashlib.sha256(req.body).digest() == hashlib.sha256(body).digest()


# === class 1: streamed bodies forwarded before the verdict ===================================

SCHEMES = [pytest.param(False, id="http"), pytest.param(True, id="https")]


@pytest.mark.parametrize("tls", SCHEMES)
def test_large_text_body_with_marker_on_its_first_line(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/large-{int(tls)}"
    curl_post(gw, rec, path, marked_text(2 * MiB), tls=tls)
    f = Findings()
    expect_no_body(f, rec, path)
    expect_row(f, gw, path)
    f.verify()


@pytest.mark.parametrize("tls", SCHEMES)
def test_control_large_clean_text_arrives_whole(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/large-clean-{int(tls)}"
    body = clean_text(2 * MiB)
    reply = curl_post(gw, rec, path, body, tls=tls)
    assert reply.status == 200, (reply.status, reply.stderr)
    assert_arrived_whole(rec, path, body)


@pytest.mark.parametrize("tls", SCHEMES)
def test_curl_chunked_body_marker_at_start_large_tail(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/curl-chunked-{int(tls)}"
    curl_post(gw, rec, path, marked_text(3 * MiB), tls=tls, chunked=True)
    f = Findings()
    expect_no_body(f, rec, path)
    expect_row(f, gw, path)
    f.verify()


@pytest.mark.parametrize("tls", SCHEMES)
def test_control_curl_chunked_clean_body_arrives_whole(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/curl-chunked-clean-{int(tls)}"
    body = clean_text(3 * MiB)
    assert curl_post(gw, rec, path, body, tls=tls, chunked=True).status == 200
    assert_arrived_whole(rec, path, body)


@pytest.mark.parametrize("tls", SCHEMES)
def test_small_chunked_body_in_two_writes(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/two-writes-{int(tls)}"
    chunked_post(gw, rec, path, [f"{MARK} 草稿\n".encode(), clean_text(300)], tls=tls)
    f = Findings()
    expect_no_body(f, rec, path)
    expect_row(f, gw, path)
    f.verify()


@pytest.mark.parametrize("tls", SCHEMES)
def test_control_small_chunked_clean_body_in_two_writes(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/two-writes-clean-{int(tls)}"
    chunks = [clean_text(40, "a"), clean_text(300, "b")]
    assert chunked_post(gw, rec, path, chunks, tls=tls) == 200
    assert_arrived_whole(rec, path, b"".join(chunks))


def test_small_chunked_body_in_one_write(gw, recorders):
    """Passes today: a body in one chunk, in one write, is held whole until its verdict."""
    rec = recorders()
    path = "/c1/one-write"
    chunked_post(gw, rec, path, [f"{MARK} 草稿\n".encode()], tls=False)
    f = Findings()
    expect_no_body(f, rec, path)
    expect_row(f, gw, path)
    f.verify()


@pytest.mark.parametrize("tls", SCHEMES)
def test_chunked_with_pauses_marker_in_a_middle_chunk(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/many-{int(tls)}"
    chunks = [clean_text(200, str(i)) for i in range(8)]
    chunks[3] = clean_text(100, "3") + MARKB + clean_text(100, "3b")
    marker_at = sum(len(c) for c in chunks[:3]) + 100
    chunked_post(gw, rec, path, chunks, tls=tls, pause=0.15)
    f = Findings()
    expect_no_marker(f, rec)
    sent = b"".join(chunks)
    for req in rec.find(path):  # text may go out just behind the scanner, never the marker
        body = bytes(req.body)
        f.check(sent.startswith(body), "the upstream got bytes that were not sent in order")
        f.check(len(body) <= marker_at, f"{len(body)} bytes arrived, the marker is at {marker_at}")
        f.check(not req.complete, "the upstream got the end of the body")
    row = expect_row(f, gw, path)
    if row is not None:
        got = sum(len(r.body) for r in rec.find(path))
        f.check(row["upload_bytes"] >= got, f"the row says {row['upload_bytes']}, {got} went out")
    f.verify()


def test_chunked_marker_then_broken_framing(gw, recorders):
    rec = recorders()
    path = "/c1/broken-end"
    chunks = [MARKB + b"\n", clean_text(100)]
    chunked_post(gw, rec, path, chunks, tls=False, end=b"zz-not-a-size\r\n\r\n")
    f = Findings()
    expect_no_body(f, rec, path)
    f.check(rows_for(gw, path), "no row for a body that ended in a protocol error")
    f.verify()


@pytest.mark.parametrize("upstream_alpn", [("http/1.1",), ("h2",)], ids=["to-h1", "to-h2"])
def test_http2_body_without_length(gw, recorders, upstream_alpn):
    rec = recorders(tls=True, alpn=upstream_alpn)
    path = f"/c1/h2-{upstream_alpn[0].replace('/', '')}"
    h2_post(gw, rec, path, [f"{MARK}\n".encode(), clean_text(500)])
    f = Findings()
    expect_no_body(f, rec, path)
    expect_row(f, gw, path)
    f.verify()


@pytest.mark.parametrize("upstream_alpn", [("http/1.1",), ("h2",)], ids=["to-h1", "to-h2"])
def test_control_http2_clean_body_without_length(gw, recorders, upstream_alpn):
    rec = recorders(tls=True, alpn=upstream_alpn)
    path = f"/c1/h2-clean-{upstream_alpn[0].replace('/', '')}"
    chunks = [clean_text(60, "x"), clean_text(500, "y")]
    status, _ = h2_post(gw, rec, path, chunks)
    assert status == 200
    assert_arrived_whole(rec, path, b"".join(chunks))


def test_curl_http2_upload_from_stdin(gw, recorders):
    rec = recorders(tls=True, alpn=("http/1.1",))
    path = "/c1/curl-h2-stdin"
    cmd = [
        "curl", "-sS", "--max-time", "20", "--http2", "--noproxy", "", "-x", gw.proxy,
        "--cacert", str(gw.ca_pem()), "-T", "-", "-H", "Content-Type: text/plain",
        "-o", "/dev/null", f"https://127.0.0.1:{rec.port}{path}",
    ]  # fmt: skip
    data = marked_text(1500 * 1024)
    subprocess.run(cmd, input=data, capture_output=True, timeout=60, check=False)
    f = Findings()
    expect_no_body(f, rec, path)
    expect_row(f, gw, path)
    f.verify()


DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def pieces(data: bytes, n: int) -> list[bytes]:
    size = -(-len(data) // n)
    return [data[i : i + size] for i in range(0, len(data), size)]


def plan_docx(header: str) -> bytes:
    return docx("二〇二六年度经营计划正文 " + "季度数据 " * 400, header=header)


@pytest.mark.parametrize("tls", SCHEMES)
def test_chunked_docx_marker_only_after_decoding(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/docx-{int(tls)}"
    document = plan_docx(MARK)
    assert MARKB not in document  # only the decoded text has it
    chunked_post(gw, rec, path, pieces(document, 4), tls=tls, content_type=DOCX, pause=0.15)
    rec.settle()
    f = Findings()
    got = rec.body_bytes(path)
    f.check(got == 0, f"{got} of the document's {len(document)} bytes reached the upstream")
    expect_row(f, gw, path)
    f.verify()


@pytest.mark.parametrize("tls", SCHEMES)
def test_control_chunked_clean_docx_arrives_whole(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c1/docx-clean-{int(tls)}"
    document = plan_docx("公司年度计划")
    assert chunked_post(gw, rec, path, pieces(document, 4), tls=tls, content_type=DOCX) == 200
    assert_arrived_whole(rec, path, document)


GZIP_BODY = gzip.compress(marked_text(40_000) + os.urandom(20_000).hex().encode(), mtime=0)


def test_chunked_gzip_body_marker_only_after_inflating(gw, recorders):
    rec = recorders()
    path = "/c1/gzip"
    chunked_post(gw, rec, path, pieces(GZIP_BODY, 3), tls=False, extra="Content-Encoding: gzip\r\n")
    rec.settle()
    f = Findings()
    got = rec.body_bytes(path)
    f.check(got == 0, f"{got} of the {len(GZIP_BODY)} compressed bytes reached the upstream")
    expect_row(f, gw, path)
    f.verify()


def test_control_chunked_clean_gzip_arrives_whole(gw, recorders):
    rec = recorders()
    path = "/c1/gzip-clean"
    body = gzip.compress(clean_text(40_000), mtime=0)
    extra = "Content-Encoding: gzip\r\n"
    assert chunked_post(gw, rec, path, pieces(body, 3), tls=False, extra=extra) == 200
    assert_arrived_whole(rec, path, body)


def test_buffered_small_body_with_marker_is_refused(gw, recorders):
    """Passes today: a small Content-Length body is held whole and scanned."""
    rec = recorders()
    path = "/c1/small-buffered"
    assert curl_post(gw, rec, path, marked_text(2000), tls=False).status == 403
    f = Findings()
    expect_no_body(f, rec, path)
    expect_row(f, gw, path)
    f.verify()


# === class 2: non-HTTP bytes inside CONNECT tunnels ==========================================


def tunnel_rows(gw, port: int, timeout: float = 5) -> list[dict]:
    """Rows of a tunnel to ``port`` (the CONNECT row itself has kind 'connect')."""
    return rows_where(gw, lambda r: r["port"] == port and r["kind"] == "tunnel", timeout)


def expect_tunnel_refused_row(f: Findings, gw, port: int) -> None:
    rows = tunnel_rows(gw, port)
    if f.check(rows, f"no tunnel row for port {port}"):
        f.check(
            all(r["decision"] == "block" for r in rows),
            f"tunnel row does not say block: {[row_summary(r) for r in rows]}",
        )


def send_raw(sock: socket.socket, data: bytes, then_wait: float = 0.5) -> bytes:
    """Send, then read what comes back until the peer closes or ``then_wait`` passes."""
    with contextlib.suppress(OSError):
        sock.sendall(data)
    got = b""
    deadline = time.monotonic() + then_wait
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
    return got


BINARY = b"\x00\x01\x02\xffBIN" + MARKB + bytes(range(256))


def test_raw_binary_in_a_connect_tunnel_is_refused(gw, recorders):
    rec = recorders("echo")
    with tunnel(gw, rec.port) as sock:
        send_raw(sock, BINARY)
    f = Findings()
    expect_nothing(f, rec)
    expect_tunnel_refused_row(f, gw, rec.port)
    f.verify()


def test_control_http_inside_a_plain_connect_tunnel_arrives(gw, recorders):
    rec = recorders()
    body = clean_text(500)
    with tunnel(gw, rec.port) as sock:
        sock.sendall(
            b"POST /c2/in-tunnel HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n%s"
            % (rec.port, len(body), body)
        )
        assert read_response(sock)[0] == 200
    assert_arrived_whole(rec, "/c2/in-tunnel", body)


def test_ssh_banner_in_a_tunnel_is_refused(gw, recorders):
    rec = recorders("echo")
    with tunnel(gw, rec.port) as sock:
        send_raw(sock, b"SSH-2.0-OpenSSH_9.2\r\n" + BINARY)
    f = Findings()
    expect_nothing(f, rec)
    expect_tunnel_refused_row(f, gw, rec.port)
    f.verify()


@pytest.mark.parametrize(
    "alpn", [pytest.param(("x-custom",), id="x-custom"), pytest.param(None, id="no-alpn")]
)
def test_tls_with_a_non_http_alpn_is_refused(gw, recorders, alpn):
    rec = recorders("echo", tls=True, alpn=alpn)
    try:
        sock = tunnel(gw, rec.port, tls=True, alpn=alpn)
    except (ssl.SSLError, OSError):
        sock = None  # refused at the handshake: fine
    if sock is not None:
        with sock:
            send_raw(sock, BINARY)
    f = Findings()
    expect_no_marker(f, rec)
    expect_nothing(f, rec)
    f.check(
        not [c for c in rec.connections if c.alpn],
        f"the upstream TLS negotiated ALPN {[c.alpn for c in rec.connections]}",
    )
    expect_tunnel_refused_row(f, gw, rec.port)
    f.verify()


def test_control_tls_http_alpn_inside_a_tunnel_arrives(gw, recorders):
    rec = recorders(tls=True, alpn=("http/1.1",))
    body = clean_text(700)
    with tunnel(gw, rec.port, tls=True, alpn=("http/1.1",)) as sock:
        sock.sendall(
            b"POST /c2/tls-h1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n%s"
            % (rec.port, len(body), body)
        )
        assert read_response(sock)[0] == 200
    assert_arrived_whole(rec, "/c2/tls-h1", body)


def stream_raw(gw, port: int, total: int, host: str = "127.0.0.1") -> int:
    """Send ``total`` bytes of binary through a tunnel (bounded in time); what was sent."""
    block = b"\x00" + os.urandom(MiB - 1)
    sent = 0
    with tunnel(gw, port, host=host) as sock:
        sock.settimeout(5)
        deadline = time.monotonic() + 30
        with contextlib.suppress(OSError):
            while sent < total and time.monotonic() < deadline:
                piece = block[: total - sent]
                sock.sendall(piece)
                sent += len(piece)
    return sent


def test_raw_tcp_to_a_listed_host_is_relayed_counted_and_held_to_the_caps(gw, recorders):
    """``raw_tcp_hosts``: non-HTTP bytes to that host are relayed, counted, logged; the
    tunnel is one upload, so the per-request cap (10 MiB) cuts it."""
    small = recorders("sink")
    sent = stream_raw(gw, small.port, 3 * MiB, host=RAW_TCP_HOST)
    (row,) = rows_where(gw, lambda r: r["port"] == small.port and r["kind"] == "tunnel")
    assert small.wait_for(lambda rec: len(rec.received_bytes()) >= 3 * MiB)
    assert len(small.received_bytes()) == sent == 3 * MiB
    assert (row["decision"], row["scheme"]) == ("allow", "tcp")
    assert row["upload_bytes"] == row["forwarded_bytes"] == 3 * MiB
    large = recorders("sink")
    stream_raw(gw, large.port, 12 * MiB, host=RAW_TCP_HOST)
    (row,) = rows_where(gw, lambda r: r["port"] == large.port and r["kind"] == "tunnel")
    large.settle(quiet=0.5, timeout=10)  # the row is written when the tunnel has closed
    arrived = len(large.received_bytes())
    assert arrived <= 10 * MiB and arrived == row["forwarded_bytes"]
    assert (row["decision"], row["reason_kind"], row["rule_id"]) == (
        "block",
        "upload_cap",
        "uploads.per_request",
    )


def test_twelve_mib_of_raw_bytes_through_a_tunnel(gw, recorders):
    rec = recorders("sink")
    sent = stream_raw(gw, rec.port, 12 * MiB)
    f = Findings()
    expect_tunnel_refused_row(f, gw, rec.port)  # written when the tunnel is over
    received = len(rec.received_bytes())
    f.check(received <= 10 * MiB, f"{received} of {sent} bytes arrived (cap 10 MiB)")
    f.check(received == 0, f"non-HTTP is refused by default, yet {received} bytes arrived")
    f.verify()


def dns_query(label: bytes) -> bytes:
    """A DNS-over-TCP query (length-prefixed) for TXT <label>.example."""
    header = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    qname = bytes([len(label)]) + label + b"\x07example\x00"
    message = header + qname + struct.pack(">HH", 16, 1)
    return struct.pack(">H", len(message)) + message


@pytest.fixture
def port53(recorders):
    try:
        return recorders("sink", port=53)
    except OSError as e:  # not root, or something listens there
        pytest.skip(f"cannot bind 127.0.0.1:53: {e}")


def test_connect_to_port_53_dns_query_is_refused(gw, port53, log_mark):
    label = base64.b32encode(MARKB).decode().rstrip("=").lower().encode()
    with tunnel(gw, 53) as sock:
        send_raw(sock, dns_query(label), then_wait=1.0)
    f = Findings()
    expect_nothing(f, port53)
    expect_no_crash(f, log_mark())
    expect_tunnel_refused_row(f, gw, 53)
    f.verify()


def test_connect_to_port_53_unparsable_query_leaves_a_row(gw, port53, log_mark):
    with tunnel(gw, 53) as sock:
        send_raw(sock, dns_query(MARKB), then_wait=1.0)
    f = Findings()
    expect_nothing(f, port53)
    expect_no_crash(f, log_mark())
    expect_tunnel_refused_row(f, gw, 53)
    f.verify()


# === class 3: absolute-form targets inside a tunnel ==========================================


def in_tunnel(gw, rec, request: bytes, *, tls: bool = False) -> int:
    sock = tunnel(gw, rec.port, tls=tls, alpn=("http/1.1",) if tls else None)
    with sock:
        sock.sendall(request)
        return read_response(sock)[0]


@pytest.mark.parametrize(
    ("name", "tls", "target"),
    [
        pytest.param(name, tls, target, id=name)
        for name, tls, target in [
            ("plain-http", False, "http://mail.qq.com{path}"),
            ("plain-port", False, "http://mail.qq.com:80{path}"),
            ("plain-case-dot", False, "http://MAIL.QQ.COM.{path}"),
            ("plain-https", False, "https://mail.qq.com{path}"),
            ("tls-https", True, "https://mail.qq.com{path}"),
            ("tls-http", True, "http://mail.qq.com{path}"),
        ]
    ],
)
def test_absolute_form_naming_a_blocked_host_inside_a_tunnel(gw, recorders, name, tls, target):
    rec = recorders(tls=tls)
    path = f"/c3/abs-{name}"
    request = f"GET {target.format(path=path)} HTTP/1.1\r\nHost: 127.0.0.1:{rec.port}\r\n\r\n"
    in_tunnel(gw, rec, request.encode(), tls=tls)
    rec.settle()
    f = Findings()
    raw = rec.received_bytes()
    f.check(b"qq.com" not in raw.lower(), f"the upstream got {raw[:120]!r}")
    f.check(not rec.find(path), f"the request reached the upstream: {upstream_summary(rec)}")
    expect_row(f, gw, path, "blocklist")
    f.verify()


@pytest.mark.parametrize("tls", SCHEMES)
def test_host_header_naming_a_blocked_host_inside_a_tunnel(gw, recorders, tls):
    """Passes today: the Host header is one of the names the decision looks at."""
    rec = recorders(tls=tls)
    path = f"/c3/host-{int(tls)}"
    in_tunnel(gw, rec, f"GET {path} HTTP/1.1\r\nHost: mail.qq.com\r\n\r\n".encode(), tls=tls)
    rec.settle()
    f = Findings()
    f.check(b"qq.com" not in rec.received_bytes().lower(), upstream_summary(rec))
    expect_row(f, gw, path, "blocklist")
    f.verify()


def test_http2_authority_naming_a_blocked_host_inside_a_tunnel(gw, recorders):
    """Passes today: for HTTP/2 the :authority is the Host header mitmproxy reports."""
    rec = recorders(tls=True)
    path = "/c3/h2-authority"
    headers = h2_headers(rec, path)
    headers[2] = (":authority", "mail.qq.com")
    h2_post(gw, rec, path, [clean_text(100)], headers=headers)
    rec.settle()
    f = Findings()
    f.check(b"qq.com" not in rec.received_bytes().lower(), upstream_summary(rec))
    expect_row(f, gw, path, "blocklist")
    f.verify()


@pytest.mark.parametrize("tls", SCHEMES)
def test_control_absolute_form_naming_the_tunnel_host_arrives(gw, recorders, tls):
    rec = recorders(tls=tls)
    path = f"/c3/abs-ok-{int(tls)}"
    scheme = "https" if tls else "http"
    authority = f"127.0.0.1:{rec.port}"
    request = f"GET {scheme}://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    assert in_tunnel(gw, rec, request.encode(), tls=tls) == 200
    assert rec.wait_for(lambda r: r.find(path), timeout=5)


# === class 4: requests that must leave a row (and nothing upstream) ==========================

TRAILER_CASES = [
    pytest.param("body", id="marker-in-body"),
    pytest.param("trailer", id="marker-in-trailer"),
]


@pytest.mark.parametrize("where", TRAILER_CASES)
def test_chunked_body_with_trailers(gw, recorders, log_mark, where):
    rec = recorders()
    path = f"/c4/trailers-{where}"
    body = [f"{MARK}\n".encode()] if where == "body" else [clean_text(100)]
    trailer = f"X-Memo: {MARK}" if where == "trailer" else "X-Checksum: 1234"
    end = f"0\r\n{trailer}\r\n\r\n".encode()
    chunked_post(gw, rec, path, body, tls=False, end=end, wait=3)  # a crash never answers
    f = Findings()
    expect_no_marker(f, rec)
    expect_row(f, gw, path)
    expect_no_crash(f, log_mark())
    f.verify()


def test_control_chunked_clean_body_without_trailers_arrives(gw, recorders):
    rec = recorders()
    path = "/c4/no-trailers-clean"
    body = clean_text(100)
    assert chunked_post(gw, rec, path, [body], tls=False) == 200
    assert_arrived_whole(rec, path, body)


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("body", id="marker-in-body"),
        pytest.param("trailer", id="marker-in-trailer"),
    ],
)
def test_http2_request_with_trailers_to_an_http1_upstream(gw, recorders, log_mark, where):
    rec = recorders(tls=True, alpn=("http/1.1",))
    path = f"/c4/h2-trailers-{where}"
    chunks = [f"{MARK}\n".encode()] if where == "body" else [clean_text(100)]
    trailers = [("x-memo", MARK if where == "trailer" else "clean")]
    h2_post(gw, rec, path, chunks, trailers=trailers, wait=3)  # a crash never answers
    f = Findings()
    expect_no_marker(f, rec)
    expect_row(f, gw, path)
    expect_no_crash(f, log_mark())
    f.verify()


def test_control_http2_request_with_clean_trailers_to_an_http2_upstream(gw, recorders):
    rec = recorders(tls=True, alpn=("h2",))
    path = "/c4/h2-trailers-clean"
    body = clean_text(100)
    status, _ = h2_post(gw, rec, path, [body], trailers=[("x-memo", "clean")])
    assert status == 200
    assert_arrived_whole(rec, path, body)


MALFORMED_H2 = {
    "uppercase-name": [("X-Upper", "1")],
    "connection-header": [("connection", "keep-alive")],
    "te-chunked": [("transfer-encoding", "chunked")],
}


@pytest.mark.parametrize("kind", sorted(MALFORMED_H2))
def test_malformed_http2_headers_leave_a_row(gw, recorders, log_mark, kind):
    rec = recorders(tls=True, alpn=("http/1.1",))
    path = f"/c4/h2-bad-{kind}"
    headers = h2_headers(rec, path, MALFORMED_H2[kind])
    h2_post(gw, rec, path, [f"{MARK}\n".encode()], headers=headers, validate=False)
    f = Findings()
    expect_nothing(f, rec)
    f.check(rows_where(gw, lambda r: r["path"] == path), "no row")
    expect_no_crash(f, log_mark())
    f.verify()


def test_http2_missing_path_reaches_nothing(gw, recorders, log_mark):
    rec = recorders(tls=True, alpn=("http/1.1",))
    headers = [h for h in h2_headers(rec, "/") if h[0] != ":path"]
    h2_post(gw, rec, "/", [MARKB], headers=headers, validate=False)
    f = Findings()
    expect_nothing(f, rec)
    expect_no_crash(f, log_mark())
    f.verify()


@pytest.mark.parametrize("kind", ["header", "request"])
def test_http2_header_value_with_crlf_to_an_http1_upstream(gw, recorders, log_mark, kind):
    rec = recorders(tls=True, alpn=("http/1.1",))
    path = f"/c4/h2-crlf-{kind}"
    smuggled = "POST /c4/smuggled HTTP/1.1\r\nHost: mail.qq.com\r\nX-A: b"
    value = (
        "a\r\nx-injected: 1" if kind == "header" else f"a\r\nContent-Length: 0\r\n\r\n{smuggled}"
    )
    headers = h2_headers(rec, path, [("x-note", value)])
    h2_post(gw, rec, path, [clean_text(50)], headers=headers, validate=False)
    rec.settle()
    f = Findings()
    raw = rec.received_bytes().lower()
    f.check(b"x-injected" not in raw, f"an injected header line arrived: {upstream_summary(rec)}")
    f.check(
        len(rec.requests) <= 1 and b"/c4/smuggled" not in raw,
        f"a smuggled request arrived: {upstream_summary(rec)}",
    )
    f.check(b"qq.com" not in raw, "a request naming mail.qq.com arrived")
    f.check(rows_where(gw, lambda r: r["path"] == path), "no row")
    expect_no_crash(f, log_mark())
    f.verify()


def test_content_length_and_chunked_together_are_refused_with_a_row(gw, recorders, log_mark):
    """Passes today: mitmproxy refuses the pair (400) and the error hook writes a row."""
    rec = recorders()
    path = "/c4/cl-te"
    body = b"%x\r\n%s\r\n0\r\n\r\nGET /c4/smuggled HTTP/1.1\r\nHost: x\r\n\r\n" % (
        len(MARKB),
        MARKB,
    )
    with proxy_socket(gw) as sock:
        sock.sendall(
            f"POST http://127.0.0.1:{rec.port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{rec.port}\r\n"
            f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + body
        )
        read_response(sock)
    f = Findings()
    expect_nothing(f, rec)
    f.check(rows_where(gw, lambda r: r["path"] == path), "no row")
    expect_no_crash(f, log_mark())
    f.verify()


ENCODED_HOSTS = {
    "percent": "http://mail%2eqq.com{path}",
    "percent-all": "http://%6d%61%69%6c%2e%71%71%2e%63%6f%6d{path}",
    "fullwidth": "http://ｍａｉｌ．ｑｑ．ｃｏｍ{path}",
    "ideographic-dot": "http://mail。qq。com{path}",
}


@pytest.mark.parametrize("kind", sorted(ENCODED_HOSTS))
def test_encoded_host_in_absolute_form_leaves_a_row(gw, recorders, log_mark, kind):
    rec = recorders()
    path = f"/c4/host-{kind}"
    target = ENCODED_HOSTS[kind].format(path=path)
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{rec.port}\r\n\r\n".encode()
    in_tunnel(gw, rec, request)
    f = Findings()
    expect_nothing(f, rec)
    f.check(rows_where(gw, lambda r: r["path"] == path), "no row")
    expect_no_crash(f, log_mark())
    f.verify()


# === WebSocket: every frame is a channel =====================================================


def ws_exchange(gw, rec, frames: list[object], timeout: float = TIMEOUT) -> list[object]:
    """Open ws://127.0.0.1:port/ws through the proxy, send the wsproto events one by one (a
    short wait after each), return the events received."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request

    host = f"127.0.0.1:{rec.port}"
    ws = WSConnection(ConnectionType.CLIENT)
    got: list[object] = []
    with proxy_socket(gw) as sock:
        sock.sendall(ws.send(Request(host=host, target=f"http://{host}/ws")))
        deadline = time.monotonic() + timeout
        accepted = False
        while not accepted and time.monotonic() < deadline:
            data = sock.recv(65536)
            ws.receive_data(data or None)
            accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
            if not data:
                return got
        for frame in frames:
            with contextlib.suppress(Exception):
                sock.sendall(ws.send(frame))
            end = time.monotonic() + 0.4
            sock.settimeout(0.1)
            while time.monotonic() < end:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return got
                with contextlib.suppress(Exception):
                    ws.receive_data(data or None)
                    got += list(ws.events())
                if not data or any(isinstance(e, CloseConnection) for e in got):
                    return got
    return got


def test_websocket_text_message_with_marker(gw, recorders):
    """Passes today: client messages are scanned before they are forwarded."""
    from wsproto.events import TextMessage

    rec = recorders("ws")
    ws_exchange(gw, rec, [TextMessage(data=f"{MARK} 会议纪要")])
    f = Findings()
    expect_no_marker(f, rec)
    f.verify()


def ws_frames(rec: Recorder) -> str:
    return str([(fr.kind, fr.data, fr.code) for fr in rec.frames])


@pytest.mark.parametrize("kind", ["ping", "pong", "close"])
def test_websocket_control_frame_payload_with_marker(gw, recorders, kind):
    from wsproto.events import CloseConnection, Ping, Pong

    frame = {
        "ping": Ping(payload=MARKB),
        "pong": Pong(payload=MARKB),
        "close": CloseConnection(code=1000, reason=MARK),
    }[kind]
    rec = recorders("ws")
    ws_exchange(gw, rec, [frame])
    f = Findings()
    expect_no_marker(f, rec)
    f.check(MARKB not in b"".join(fr.data for fr in rec.frames), f"frames: {ws_frames(rec)}")
    f.verify()


def test_control_websocket_frames_arrive(gw, recorders):
    from wsproto.events import CloseConnection, Ping, TextMessage

    rec = recorders("ws")
    frames = [
        TextMessage(data="hello 普通"),
        Ping(payload=b"pingdata"),
        CloseConnection(1000, "bye"),
    ]
    ws_exchange(gw, rec, frames)
    assert rec.wait_for(lambda r: len(r.frames) >= 3, timeout=5), ws_frames(rec)
    kinds = {(fr.kind, fr.data) for fr in rec.frames}
    assert {("text", "hello 普通".encode()), ("ping", b"pingdata"), ("close", b"bye")} <= kinds


# === class 5: the gateway's own ports through the proxy ======================================


def test_console_is_not_reachable_through_the_proxy(gw_console):
    g = gw_console
    reply = curl(
        f"https://127.0.0.1:{g.admin_port}/api/v1/status",
        g.proxy,
        g.ca_pem(),
        headers={"Authorization": f"Bearer {g.bootstrap}"},
    )
    f = Findings()
    console = b"retention_months" in reply.body or b"TornadoServer" in str(reply.headers).encode()
    f.check(not console, f"the console answered {reply.status}: {reply.body[:120]!r}")
    f.check(reply.status != 200, f"status {reply.status}")
    f.verify()


def test_control_console_answers_directly(gw_console):
    assert gw_console.admin_call("/api/v1/status", gw_console.bootstrap).status == 200


def test_metrics_are_not_reachable_through_the_proxy(gw_console):
    g = gw_console
    reply = curl(f"http://127.0.0.1:{g.metrics_port}/metrics", g.proxy)
    f = Findings()
    f.check(b"# HELP" not in reply.body, f"metrics answered: {reply.body[:120]!r}")
    f.verify()


def test_bad_tokens_through_the_proxy_do_not_lock_out_the_admin(gw_console):
    g = gw_console
    for i in range(15):
        curl(
            f"https://127.0.0.1:{g.admin_port}/api/v1/status",
            g.proxy,
            g.ca_pem(),
            headers={"Authorization": f"Bearer not-a-token-{i}"},
        )
    reply = g.admin_call("/api/v1/status", g.bootstrap)
    assert reply.status == 200, (reply.status, reply.body[:120])
