"""Upload caps through the real gateway: announced sizes refused at the headers, streamed
bodies cut mid-way, WebSocket messages and pass-through tunnels counted, the per-user window,
and overrides. Every test uploads as its own proxy-auth user, so windows do not mix."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess

import pytest

from harness import GatewayProcess, Upstream, curl, ws_session
from support import policy_copy

pytestmark = pytest.mark.slow

MiB = 1024 * 1024

UPLOADS = """\
uploads:
  per_request: 2MiB
  per_user: 6MiB
  window: 1h
  hold_in_memory: 256KiB
  overrides:
    - id: uploads.e2e-company
      categories: [company]
      per_request: unlimited
      per_user: unlimited
    - id: uploads.e2e-bigsender
      users: [bigsender]
      per_request: 4MiB
"""
ALLOW = """\
categories:
  company:
    action: allow
    reason: {en: "Company service.", zh: "公司自有服务。"}
    rules:
      - id: company.e2e-intranet
        exact_hosts: [localhost]
"""
SETTINGS = "settings:\n  passthrough_hosts: [127.0.0.2]\n"
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "bigsender", "hank", "ivan"]


@pytest.fixture(scope="module")
def pinned_upstream(tmp_path_factory):
    """The server of a 'pinned app' on 127.0.0.2: tunnelled, never intercepted."""
    up = Upstream(tmp_path_factory.mktemp("pinned"), host="127.0.0.2").start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    from passlib.apache import HtpasswdFile

    base = tmp_path_factory.mktemp("gw-uploads")
    policies = policy_copy(
        base, {"uploads.yaml": UPLOADS, "allow.yaml": ALLOW, "gateway.yaml": SETTINGS}
    )
    htpasswd = HtpasswdFile(str(base / "htpasswd"), new=True)
    for user in USERS:
        htpasswd.set_password(user, "pw")
    htpasswd.save()
    g = GatewayProcess(
        base / "data",
        policies,
        upstream.ca_path,
        extra_args=("--set", f"proxyauth=@{base / 'htpasswd'}"),
    ).start()
    yield g
    g.stop()
    assert "Traceback" not in g.text(), g.text()


def as_user(user):
    return ("--proxy-user", f"{user}:pw")


def body_file(tmp_path, size, name="body.bin"):
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def rows_for(gw, user, path=None, kind=None):
    def ok(rows):
        return any(
            (path is None or r["path"] == path) and (kind is None or r["kind"] == kind)
            for r in rows
        )

    rows = gw.wait_rows(ok, "--user", user)
    return [
        r
        for r in rows
        if (path is None or r["path"] == path) and (kind is None or r["kind"] == kind)
    ]


def test_announced_over_cap_upload_refused_before_the_body_or_upstream(gw, upstream):
    connections = upstream.connections
    request = (
        f"POST http://127.0.0.1:{upstream.http_port}/announced HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{upstream.http_port}\r\n"
        "Proxy-Authorization: Basic Ym9iOnB3\r\n"  # bob:pw
        f"Content-Length: {50 * MiB}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=15) as s:
        s.sendall(request)  # and not one byte of the body
        answer = b""
        while b"</html>" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, page = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    text = page.decode()
    assert "uploads.per_request" in text and f"{50 * MiB:,}" in text
    assert "上传超过允许的大小" in text and "Upload over the allowed size" in text
    assert upstream.connections == connections and upstream.find("/announced") is None
    (row,) = rows_for(gw, "bob", "/announced")
    assert (row["decision"], row["reason_kind"], row["rule_id"], row["status"]) == (
        "block",
        "upload_cap",
        "uploads.per_request",
        413,
    )
    assert row["declared_bytes"] == 50 * MiB and row["upload_bytes"] == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_chunked_over_cap_upload_is_refused_with_nothing_forwarded(gw, upstream, tmp_path, scheme):
    """The body is held while it is counted: when it crosses the cap, the upstream has not been
    contacted at all (no connection, no headers, no byte of the body)."""
    connections = upstream.connections
    path, _ = body_file(tmp_path, 3 * MiB)
    port = upstream.http_port if scheme == "http" else upstream.https_port
    url = f"{scheme}://127.0.0.1:{port}/chunked-{scheme}"
    reply = curl(
        url,
        gw.proxy,
        gw.ca_pem(),
        method="POST",
        headers={"Transfer-Encoding": "chunked"},
        extra=(*as_user("carol"), "--data-binary", f"@{path}"),
    )
    assert reply.status == 413, (reply.status, reply.stderr)
    (row,) = rows_for(gw, "carol", f"/chunked-{scheme}")
    assert upstream.find(f"/chunked-{scheme}") is None and upstream.connections == connections
    assert (row["decision"], row["reason_kind"], row["rule_id"]) == (
        "block",
        "upload_cap",
        "uploads.per_request",
    )
    # what arrived until the chunk that crossed the cap (a read is at most 64 KiB)
    assert 2 * MiB < row["upload_bytes"] <= 2 * MiB + 64 * 1024 and row["forwarded_bytes"] == 0


def h2_stream_upload(gw, url, user, data):
    """curl -T - over HTTP/2: a request stream without Content-Length. Returns (status, version)."""
    cmd = [
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--http2",
        "-x",
        gw.proxy,
        "--cacert",
        str(gw.ca_pem()),
        "--proxy-user",
        f"{user}:pw",
        "-T",
        "-",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        url,
    ]
    result = subprocess.run(cmd, input=data, capture_output=True, timeout=60, check=False)
    return result.stdout.decode().split()[:2]


def test_http2_upload_without_length_is_cut(gw, upstream):
    url = f"https://127.0.0.1:{upstream.https_port}/h2-stream"
    assert h2_stream_upload(gw, url, "hank", os.urandom(3 * MiB)) == ["413", "2"]
    (row,) = rows_for(gw, "hank", "/h2-stream")
    assert upstream.find("/h2-stream") is None and row["forwarded_bytes"] == 0
    assert (row["rule_id"], row["http_version"]) == ("uploads.per_request", "HTTP/2.0")


@pytest.mark.parametrize("size", [3000, 1_500_000])
def test_http2_upload_without_length_arrives_whole(gw, upstream, size):
    # HTTP/2 from the client, HTTP/1.1 to the upstream, no Content-Length: the body must be
    # re-framed (chunked), not sent bare (mitmproxy 11 alone loses it).
    data = os.urandom(size)
    url = f"https://127.0.0.1:{upstream.https_port}/h2-ok-{size}"
    assert h2_stream_upload(gw, url, "dave", data) == ["200", "2"]
    seen = upstream.find(f"/h2-ok-{size}")
    assert seen.complete and seen.body_sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [100_000, 1_500_000])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_under_cap_uploads_pass_byte_for_byte(gw, upstream, tmp_path, size, scheme):
    path, digest = body_file(tmp_path, size)
    port = upstream.http_port if scheme == "http" else upstream.https_port
    url = f"{scheme}://127.0.0.1:{port}/ok-{scheme}-{size}"
    reply = curl(
        url,
        gw.proxy,
        gw.ca_pem(),
        method="POST",
        extra=(*as_user("dave"), "--data-binary", f"@{path}"),
    )
    assert reply.status == 200, reply.stderr
    seen = upstream.find(f"/ok-{scheme}-{size}")
    assert seen is not None and seen.complete and seen.body_sha256 == digest
    (row,) = rows_for(gw, "dave", f"/ok-{scheme}-{size}")
    assert (row["decision"], row["upload_bytes"], row["declared_bytes"], row["window_bytes"]) == (
        "allow",
        size,
        size,
        size,
    )


def test_rolling_window_refuses_the_upload_that_would_pass_it(gw, upstream, tmp_path):
    path, _ = body_file(tmp_path, 1_500_000)
    statuses = []
    for i in range(5):  # 4 × 1.5 MB = 6 MB ≤ 6 MiB; the 5th would pass it
        reply = curl(
            f"http://127.0.0.1:{upstream.http_port}/window-{i}",
            gw.proxy,
            method="POST",
            extra=(*as_user("erin"), "--data-binary", f"@{path}"),
        )
        statuses.append(reply.status)
    assert statuses == [200, 200, 200, 200, 413]
    assert "/window-4" not in upstream.paths()
    small = curl(
        f"http://127.0.0.1:{upstream.http_port}/window-small",
        gw.proxy,
        method="POST",
        data=b"x" * 300_000,
        extra=as_user("erin"),
    )
    assert small.status == 413  # the window is used up for every further upload
    assert "uploads.per_user" in small.body.decode()
    (row,) = rows_for(gw, "erin", "/window-4")
    assert (row["reason_kind"], row["rule_id"]) == ("upload_cap", "uploads.per_user")
    # Someone else's window is untouched.
    other = curl(
        f"http://127.0.0.1:{upstream.http_port}/window-other",
        gw.proxy,
        method="POST",
        data=b"x" * 300_000,
        extra=as_user("hank"),
    )
    assert other.status == 200


def post_file(gw, url, user, path, cacert=None):
    return curl(
        url, gw.proxy, cacert, method="POST", extra=(*as_user(user), "--data-binary", f"@{path}")
    )


def test_overrides_per_user_and_per_destination(gw, upstream, tmp_path):
    three, _ = body_file(tmp_path, 3 * MiB, "three.bin")
    five, _ = body_file(tmp_path, 5 * MiB, "five.bin")
    base = f"http://127.0.0.1:{upstream.http_port}"
    assert post_file(gw, f"{base}/big-ok", "bigsender", three).status == 200
    assert post_file(gw, f"{base}/big-too-big", "bigsender", five).status == 413
    assert post_file(gw, f"{base}/not-big", "alice", three).status == 413
    # The company's own service (allow list category `company`): unlimited, not counted.
    company = f"http://localhost:{upstream.http_port}/company"
    for _ in range(3):
        assert post_file(gw, company, "alice", five).status == 200
    rows = rows_for(gw, "alice", "/company")
    assert rows and all(r["window_bytes"] == 0 and r["upload_bytes"] == 5 * MiB for r in rows)
    (row,) = rows_for(gw, "bigsender", "/big-too-big")
    assert row["rule_id"] == "uploads.e2e-bigsender"


def test_websocket_client_messages_are_counted_and_cut(gw, ws_upstream):
    echoes, close_code = ws_session(
        gw.proxy_port, ws_upstream.port, [1000, 2000, 3 * MiB, 10], proxy_auth="frank:pw"
    )
    assert echoes == ["got 1000", "got 2000"]
    assert close_code == 1009
    assert ws_upstream.received == [1000, 2000]  # the over-cap message never left
    (row,) = rows_for(gw, "frank", kind="websocket")
    assert (row["decision"], row["reason_kind"], row["rule_id"]) == (
        "block",
        "upload_cap",
        "uploads.per_request",
    )
    assert row["window_bytes"] == 3000 and row["upload_bytes"] >= 3000


def test_pass_through_tunnel_bytes_are_counted_and_cut(gw, pinned_upstream, tmp_path):
    one, digest = body_file(tmp_path, 1 * MiB, "one.bin")
    url = f"https://127.0.0.2:{pinned_upstream.https_port}"
    # The client trusts only the pinned server's own CA: the tunnel is not intercepted.
    reply = curl(
        f"{url}/pinned-1",
        gw.proxy,
        pinned_upstream.ca_path,
        method="POST",
        extra=(*as_user("gina"), "--data-binary", f"@{one}"),
    )
    assert reply.status == 200, reply.stderr
    assert pinned_upstream.find("/pinned-1").body_sha256 == digest
    (tunnel,) = rows_for(gw, "gina", kind="tunnel")
    assert tunnel["tls_intercepted"] is False and tunnel["decision"] == "allow"
    assert tunnel["upload_bytes"] > 1 * MiB and tunnel["window_bytes"] == tunnel["upload_bytes"]

    seven, _ = body_file(tmp_path, 7 * MiB, "seven.bin")  # beyond gina's 6 MiB window
    cut = curl(
        f"{url}/pinned-7",
        gw.proxy,
        pinned_upstream.ca_path,
        method="POST",
        extra=(*as_user("gina"), "--data-binary", f"@{seven}"),
    )
    assert cut.status == 0 and cut.exit_code != 0
    seen = pinned_upstream.find("/pinned-7")
    assert seen is None or not seen.complete
    rows = gw.wait_rows(
        lambda rs: any(r["kind"] == "tunnel" and r["decision"] == "block" for r in rs),
        "--user",
        "gina",
    )
    (blocked,) = [r for r in rows if r["kind"] == "tunnel" and r["decision"] == "block"]
    assert (blocked["reason_kind"], blocked["rule_id"]) == ("upload_cap", "uploads.per_user")


def test_restart_does_not_hand_out_a_fresh_window(gw, upstream, tmp_path):
    four, _ = body_file(tmp_path, int(1.9 * MiB), "four.bin")
    base = f"http://127.0.0.1:{upstream.http_port}"
    for i in range(3):  # 5.7 MB of ivan's 6 MiB
        assert (
            curl(
                f"{base}/restart-{i}",
                gw.proxy,
                method="POST",
                extra=(*as_user("ivan"), "--data-binary", f"@{four}"),
            ).status
            == 200
        )
    rows_for(gw, "ivan", "/restart-2")  # logged (and so durable) before the restart
    gw.stop()
    gw.start()
    again = curl(
        f"{base}/restart-after",
        gw.proxy,
        method="POST",
        extra=(*as_user("ivan"), "--data-binary", f"@{four}"),
    )
    assert again.status == 413 and "uploads.per_user" in again.body.decode()
