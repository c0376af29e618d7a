"""Approved exceptions in the decision path, in process: a blocklist rule lifted for one user
until the exact millisecond of expiry, an upload cap raised to exactly the granted size, a
marker level lowered — each request that passed by one carrying its id on the row."""

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
