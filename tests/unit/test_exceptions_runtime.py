"""Approved exceptions in the decision path, in process: a blocklist rule lifted for one user
until the exact millisecond of expiry, an upload cap raised to exactly the granted size, a
marker level lowered, a pass-through tunnel opened for one client network, WebSocket messages
held to the raised cap — each request that passed by one carrying its id on the row."""

import asyncio

from mitmproxy.test import tflow, tutils

from egress_guard.core.exceptions import (
    BLOCK,
    UPLOAD,
    ActiveException,
    ActiveExceptions,
    Subject,
    Target,
    UploadGrant,
    marker,
)
from egress_guard.runtime import bodygate, protocol_errors
from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.flows import STATE
from layer_driver import Proxy
from support import FakeRuntime

MiB = 1 << 20


def runtime(tmp_path, *exceptions: ActiveException) -> FakeRuntime:
    rt = FakeRuntime(tmp_path)
    rt.exceptions = ActiveExceptions(exceptions)
    return rt


def lift(control, target, user="alice", minutes=60, rt_now=1_800_000_000.0, **kw):
    start = int(rt_now * 1000)
    return ActiveException(
        f"ex-{control.key.replace(':', '-')}",
        Subject.user(user),
        control,
        target,
        start,
        start + minutes * 60_000,
        **kw,
    )


def request_as(guard, user: str, host: str, headers=None, method=b"GET"):
    flow = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", method=method))
    flow.metadata["proxyauth"] = (user, "")
    flow.request.headers["host"] = host
    for k, v in (headers or {}).items():
        flow.request.headers[k] = v
    pending = guard.requestheaders(flow)
    if pending is not None:
        asyncio.run(pending)
    return flow


def test_a_lifted_block_rule_lets_one_user_through_until_the_exact_expiry(tmp_path):
    ex = lift(BLOCK, Target.for_host("mail.qq.com"), minutes=10)
    rt = runtime(tmp_path, ex)
    guard = EgressGuard(rt)
    alice = request_as(guard, "alice", "mail.qq.com")
    assert alice.response is None
    decision = alice.metadata[STATE].decision
    assert (decision.verdict, decision.reason_kind, decision.exception_id) == (
        "allow",
        "exception",
        ex.id,
    )
    guard.response(alice)
    assert rt.rows[-1].exception_id == ex.id and rt.rows[-1].rule_id == "webmail.qq-mail"
    assert request_as(guard, "bob", "mail.qq.com").response.status_code == 403
    rt.now = ex.expiry_ms / 1000  # expiry bites at the exact millisecond
    assert request_as(guard, "alice", "mail.qq.com").response.status_code == 403


def test_an_upload_exception_raises_the_cap_to_exactly_the_granted_size(tmp_path):
    ex = lift(
        UPLOAD, Target.for_host("upload.example.org"), grant=UploadGrant(per_request=20 * MiB)
    )
    guard = EgressGuard(runtime(tmp_path, ex))

    def post(user, size):
        return request_as(
            guard, user, "upload.example.org", {"content-length": str(size)}, method=b"POST"
        )

    small, needed, over = post("alice", 5 * MiB), post("alice", 15 * MiB), post("alice", 25 * MiB)
    assert small.response is None and small.metadata[STATE].decision.exception_id == ""
    assert needed.response is None and needed.metadata[STATE].decision.exception_id == ex.id
    assert over.response.status_code == 413
    assert over.metadata[STATE].decision.rule_id == f"exception.{ex.id}"
    assert post("bob", 15 * MiB).response.status_code == 413  # not bob's exception


def test_a_lowered_marker_level_forwards_as_an_alert(tmp_path):
    bodygate.install()
    protocol_errors.install()
    label = "一级商密 2027年报价方案\n".encode()
    host = "93.184.216.34"
    head = (
        f"POST http://{host}/up HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(label)}\r\n"
        "Proxy-Authorization: Basic YWxpY2U6eA==\r\n\r\n"
    ).encode()

    def send(rt):
        p = Proxy(addon=EgressGuard(rt))
        flows = []
        original = p.addon.requestheaders

        def keep(flow):
            flow.metadata["proxyauth"] = ("alice", "x")
            flows.append(flow)
            return original(flow)

        p.addon.requestheaders = keep
        p.send(head + label)
        return p, rt

    refused, _ = send(runtime(tmp_path / "a"))
    assert refused.to_client().startswith(b"HTTP/1.1 403") and not refused.servers
    ex = lift(marker("trade_secret"), Target.for_host(host), lowered_to="alert")
    passed, rt = send(runtime(tmp_path / "b", ex))
    assert passed.servers and label in passed.to_server()
    passed.server_says(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    (row,) = rt.rows
    assert (row.decision, row.exception_id) == (
        "alert",
        ex.id,
    ) and "trade_secret" in row.marker_levels


def test_a_tunnel_to_a_lifted_host_opens_for_its_subject_only(tmp_path):
    """A pass-through tunnel (a pinned app) is never seen as requests: the CONNECT is decided
    by the exception, and so is the upstream connection's last-line check."""
    from test_reach import resolving_to, server_hook

    ex = ActiveException(
        "ex-client-tunnel",
        Subject.client("10.0.0.5/32"),
        BLOCK,
        Target.for_host("mail.qq.com"),
        1_800_000_000_000,
        1_800_000_000_000 + 3_600_000,
    )
    rt = runtime(tmp_path, ex)
    rt.destinations.resolve, _ = resolving_to("93.184.216.34")
    guard = EgressGuard(rt)
    connect = tflow.tflow(req=tutils.treq(method=b"CONNECT", host="mail.qq.com", port=443))
    connect.client_conn.peername = ("10.0.0.5", 5000)
    pending = guard.http_connect(connect)
    if pending is not None:
        asyncio.run(pending)
    decision = connect.metadata[STATE].decision
    assert (decision.verdict, decision.exception_id) == ("allow", ex.id)

    ours = server_hook("mail.qq.com")  # from 10.0.0.5
    asyncio.run(guard.server_connect(ours))
    assert ours.server.error is None
    other = server_hook("mail.qq.com")
    other.client.peername = ("10.0.0.6", 5000)
    asyncio.run(guard.server_connect(other))
    assert other.server.error and "webmail.qq-mail" in other.server.error
    rt.now = ex.expiry_ms / 1000
    late = server_hook("mail.qq.com")
    asyncio.run(guard.server_connect(late))
    assert late.server.error and "blocked" in late.server.error


def test_websocket_messages_are_held_to_the_raised_cap(tmp_path):
    from mitmproxy.websocket import WebSocketData
    from wsproto.frame_protocol import Opcode

    ex = lift(UPLOAD, Target.for_host("ws.example.org"), grant=UploadGrant(per_request=20 * MiB))
    guard = EgressGuard(runtime(tmp_path, ex))

    def session(user):
        flow = request_as(guard, user, "ws.example.org")
        assert flow.response is None
        flow.websocket = WebSocketData()
        return flow

    def send(flow, size):
        from mitmproxy.websocket import WebSocketMessage

        message = WebSocketMessage(Opcode.BINARY, True, b"x" * size)
        flow.websocket.messages.append(message)
        guard.websocket_message(flow)
        return message

    alice, bob = session("alice"), session("bob")
    assert not send(alice, 15 * MiB).dropped  # over the 10 MiB cap, within the grant
    assert send(alice, 25 * MiB).dropped  # over the grant: cut
    assert send(bob, 15 * MiB).dropped  # bob has no exception
