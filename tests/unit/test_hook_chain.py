"""The hook chain, in process: which hooks the gateway's addon implements, the order it calls
the adapters in, and that each addon object works for its own gateway."""

import inspect

import pytest
from mitmproxy import hooks
from mitmproxy.proxy.layers import dns, http, quic, tcp, tls, udp, websocket  # noqa: F401
from mitmproxy.test import tflow, tutils

from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.flows import STATE
from egress_guard.runtime.protocol_errors import ProtocolErrorHook
from support import FakeRuntime

CUSTOM_HOOKS = {ProtocolErrorHook.name}  # the gateway's own hooks, beside mitmproxy's


def public_methods(obj: object) -> set[str]:
    return {
        name for name, member in inspect.getmembers(type(obj), callable) if not name.startswith("_")
    }


def test_every_method_of_the_addon_is_a_hook_mitmproxy_knows(tmp_path):
    guard = EgressGuard(FakeRuntime(tmp_path))
    unknown = public_methods(guard) - set(hooks.all_hooks) - CUSTOM_HOOKS
    assert not unknown, f"not hooks, yet mitmproxy would call them as such: {unknown}"


def test_adapter_methods_are_not_hooks_unless_the_addon_writes_them_out(tmp_path):
    """Only EgressGuard's written-out hooks are hooks: the adapters' other public methods
    (the markers adapter's ``verdict`` and ``apply``) are not exposed to mitmproxy. (The old
    generated dispatcher turned every public adapter method into one.)"""
    guard = EgressGuard(FakeRuntime(tmp_path))
    assert {"verdict", "apply"} <= public_methods(guard.markers)
    assert not {"verdict", "apply"} & public_methods(guard)


class Recorder:
    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def __getattr__(self, hook: str):
        def call(*args):
            self.calls.append(f"{self.name}.{hook}")

        return call


def test_adapters_run_in_the_order_the_decisions_need(tmp_path):
    guard = EgressGuard(FakeRuntime(tmp_path))
    calls: list[str] = []
    for name in ("identity", "blocklist", "uploads", "markers", "audit"):
        setattr(guard, name, Recorder(name, calls))
    flow = tflow.tflow()
    guard.requestheaders(flow)
    assert calls == [
        "identity.requestheaders",
        "blocklist.requestheaders",
        "blocklist.refuse",
        "uploads.requestheaders",
        "markers.requestheaders",
        "audit.requestheaders",
    ]
    calls.clear()
    guard.http_connect(flow)
    assert calls == ["identity.http_connect", "blocklist.http_connect", "audit.http_connect"]


def blocked_flow():
    flow = tflow.tflow(req=tutils.treq(host="mail.qq.com", port=443, scheme=b"https"))
    flow.request.headers["host"] = "mail.qq.com"
    return flow


def test_a_blocked_request_is_refused_at_its_headers_and_the_decision_is_kept_on_the_flow(tmp_path):
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    flow = blocked_flow()
    guard.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    state = flow.metadata[STATE]
    assert state.decision.verdict == "block" and state.decision.category == "webmail"
    guard.response(flow)
    (row,) = rt.rows
    assert (row.decision, row.reason_kind, row.host) == ("block", "blocklist", "mail.qq.com")


def test_two_addons_each_serve_their_own_gateway(tmp_path):
    first, second = FakeRuntime(tmp_path / "1"), FakeRuntime(tmp_path / "2")
    guard_one, guard_two = EgressGuard(first), EgressGuard(second)
    for guard in (guard_one, guard_two):
        flow = blocked_flow()
        guard.requestheaders(flow)
        guard.response(flow)
    assert len(first.rows) == 1 and len(second.rows) == 1


def test_the_audit_row_reads_the_decision_instead_of_deciding_again(tmp_path):
    """One decision per flow: what the blocklist decided is what the row says, even when the
    policy would now decide otherwise."""
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    flow = blocked_flow()
    guard.requestheaders(flow)
    flow.request.host = "example.org"  # the row must not re-derive the decision from this
    guard.response(flow)
    assert rt.rows[0].decision == "block" and rt.rows[0].rule_id


def tunnel_request(guard, rt, target: str, authority: str, host_header: str):
    """A request inside a CONNECT tunnel to ``target``: HTTP/1 in absolute form when
    ``authority`` is given."""
    connect = tflow.tflow(req=tutils.treq(method=b"CONNECT", host=target, port=443, path=b""))
    guard.http_connect(connect)
    flow = tflow.tflow(req=tutils.treq(host=target, port=443, scheme=b"https"))
    flow.client_conn = connect.client_conn
    flow.request.authority = authority
    flow.request.headers["host"] = host_header
    guard.requestheaders(flow)
    return flow


def test_absolute_form_inside_a_tunnel_is_decided_on_the_host_it_names(tmp_path):
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    flow = tunnel_request(guard, rt, "127.0.0.1", "mail.qq.com", "127.0.0.1")
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.metadata[STATE].decision.rule_id == "webmail.qq-mail"


@pytest.mark.parametrize(
    ("authority", "refused"),
    [("other.example:443", True), ("93.184.216.34:443", False), ("", False)],
)
def test_a_request_target_that_does_not_match_its_tunnel_is_refused(tmp_path, authority, refused):
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    flow = tunnel_request(guard, rt, "93.184.216.34", authority, "93.184.216.34")
    decision = flow.metadata[STATE].decision
    assert (flow.response is not None) == refused
    if refused:
        assert (decision.reason_kind, decision.rule_id) == (
            "destination",
            "gateway.authority_mismatch",
        )
