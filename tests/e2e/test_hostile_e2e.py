"""Hostile and malformed input through the real gateway: header tricks, smuggling attempts,
oversized heads, slow clients. Each degrades to a clean error, and nothing refused reaches the
upstream."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from harness import GatewayProcess, curl
from support import policy_copy

pytestmark = pytest.mark.slow

BLOCK_LOCALHOST = """\
categories:
  webmail:
    rules:
      - id: webmail.e2e-localhost
        exact_hosts: [localhost]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    base = tmp_path_factory.mktemp("gw-hostile")
    policies = policy_copy(base, {"e2e.yaml": BLOCK_LOCALHOST})
    g = GatewayProcess(base / "data", policies, upstream.ca_path).start()
    yield g
    g.stop()
    assert "Traceback" not in g.text(), g.text()[-3000:]


def raw(gw, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to the proxy and read the answer until it closes or times out."""
    with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and len(out) > 200:
                    break
        except TimeoutError:
            pass
    return out


@pytest.mark.parametrize(
    "host",
    [
        "MAIL.QQ.COM",
        "mail.qq.com.",
        "mail.qq.com:80",
        "Mail.QQ.Com.:80",
        "xn--mail-qq-com"[:0] + "mail.qq.com",
    ],
)
def test_host_spelling_tricks_are_still_blocked(gw, host):
    answer = raw(gw, f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
    assert b"webmail.qq-mail" in answer


def test_absolute_form_and_host_header_disagreeing(gw, upstream):
    answer = raw(
        gw,
        (
            f"GET http://127.0.0.1:{upstream.http_port}/mismatch HTTP/1.1\r\n"
            "Host: MAIL.qq.com.\r\n\r\n"
        ).encode(),
    )
    assert answer.startswith(b"HTTP/1.1 403")
    assert "/mismatch" not in upstream.paths()


def test_connect_to_the_ip_of_a_blocked_name(gw, upstream):
    # The client opens CONNECT 127.0.0.1:port but speaks TLS for "localhost" (blocked): the
    # SNI and Host name the blocked site, and decide.
    reply = curl(
        f"https://localhost:{upstream.https_port}/by-ip",
        gw.proxy,
        gw.ca_pem(),
        extra=("--connect-to", f"localhost:{upstream.https_port}:127.0.0.1:{upstream.https_port}"),
    )
    assert reply.status == 403 and "webmail.e2e-localhost" in reply.body.decode()
    assert "/by-ip" not in upstream.paths()


@pytest.mark.parametrize(
    "head",
    [
        "Content-Length: 5\r\nContent-Length: 7",  # conflicting lengths
        "Content-Length: 5, 7",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",  # the classic smuggling pair
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: xchunked",
        "Content-Length: -5",
    ],
)
def test_smuggling_headers_get_a_clean_error_and_reach_nobody(gw, upstream, head):
    path = f"/smuggle-{abs(hash(head))}"
    answer = raw(
        gw,
        (
            f"POST http://127.0.0.1:{upstream.http_port}{path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\n{head}\r\n\r\nhello"
            f"GET http://127.0.0.1:{upstream.http_port}/smuggled HTTP/1.1\r\n\r\n"
        ).encode(),
    )
    # 400, or the connection closed when the body is no valid chunk: never a 5xx.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:120]
    assert b"Traceback" not in answer
    assert "/smuggled" not in upstream.paths()
    seen = upstream.find(path, wait=0.3)
    assert seen is None or seen.body_len <= 5


@pytest.mark.parametrize(
    "garbage",
    [
        b"BLAH\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET http://[::1/ HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00",
        b"GET http://a b/ HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_requests_get_clean_errors(gw, garbage):
    answer = raw(gw, garbage, timeout=5)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert b"Traceback" not in answer


def test_an_endless_request_head_is_cut_with_431(gw):
    with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10) as s:
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")
        sent = 0
        try:
            while sent < 50 * 1024 * 1024:  # bounded: 50 MB at most
                s.sendall(b"X-Pad: " + b"a" * 8192 + b"\r\n")
                sent += 8200
        except OSError:
            pass
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 431"), answer
    assert sent < 5 * 1024 * 1024  # cut long before the client gave up


def test_slow_clients_do_not_starve_others(gw, upstream):
    slow = []
    for _ in range(30):  # slowloris: open, send half a head, stay
        s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=5)
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Slow: ")
        slow.append(s)
    try:
        started = time.monotonic()
        reply = curl(f"http://127.0.0.1:{upstream.http_port}/while-slow", gw.proxy)
        assert reply.status == 200 and time.monotonic() - started < 5
    finally:
        for s in slow:
            s.close()


def test_http2_blocked_host_over_the_tunnel(gw):
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "-x",
            gw.proxy,
            "--cacert",
            str(gw.ca_pem()),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "https://mail.qq.com/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.split() == ["403", "2"], result
