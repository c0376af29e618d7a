"""The hook chain, in process: which hooks the gateway's addon implements, the order it calls
the adapters in, and that each addon object works for its own gateway."""

import inspect

from mitmproxy import hooks
from mitmproxy.proxy.layers import dns, http, quic, tcp, tls, udp, websocket  # noqa: F401
from mitmproxy.test import tflow, tutils

from egress_guard.runtime import bodygate
from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.flows import STATE
from support import FakeRuntime

CUSTOM_HOOKS = {bodygate.EgressBodyEndHook.name}


def public_methods(obj: object) -> set[str]:
    return {
        name for name, member in inspect.getmembers(type(obj), callable) if not name.startswith("_")
    }


def test_every_method_of_the_addon_is_a_hook_mitmproxy_knows():
    guard = EgressGuard(FakeRuntime())
    unknown = public_methods(guard) - set(hooks.all_hooks) - CUSTOM_HOOKS
    assert not unknown, f"not hooks, yet mitmproxy would call them as such: {unknown}"


def test_adapter_methods_are_not_hooks_unless_the_addon_writes_them_out():
    """A public method added to an adapter is not called by mitmproxy: only EgressGuard's
    written-out hooks are. (With the old generated dispatcher, every public method was.)"""
    guard = EgressGuard(FakeRuntime())
    adapter_methods = set().union(
        *(public_methods(a) for a in (guard.identity, guard.blocklist, guard.uploads))
    )
    assert "tls_clienthello" in adapter_methods
    assert not hasattr(EgressGuard, "_chain")
    assert public_methods(guard) <= set(hooks.all_hooks) | CUSTOM_HOOKS


class Recorder:
    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def __getattr__(self, hook: str):
        def call(*args):
            self.calls.append(f"{self.name}.{hook}")

        return call


def test_adapters_run_in_the_order_the_decisions_need():
    guard = EgressGuard(FakeRuntime())
    calls: list[str] = []
    for name in ("identity", "blocklist", "uploads", "markers", "audit"):
        setattr(guard, name, Recorder(name, calls))
    flow = tflow.tflow()
    guard.requestheaders(flow)
    assert calls == [
        "identity.requestheaders",
        "blocklist.requestheaders",
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


def test_a_blocked_request_is_refused_at_its_headers_and_the_decision_is_kept_on_the_flow():
    rt = FakeRuntime()
    guard = EgressGuard(rt)
    flow = blocked_flow()
    guard.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    state = flow.metadata[STATE]
    assert state.decision.verdict == "block" and state.decision.category == "webmail"
    guard.response(flow)
    (row,) = rt.rows
    assert (row.decision, row.reason_kind, row.host) == ("block", "blocklist", "mail.qq.com")


def test_two_addons_each_serve_their_own_gateway():
    first, second = FakeRuntime(), FakeRuntime()
    guard_one, guard_two = EgressGuard(first), EgressGuard(second)
    for guard in (guard_one, guard_two):
        flow = blocked_flow()
        guard.requestheaders(flow)
        guard.response(flow)
    assert len(first.rows) == 1 and len(second.rows) == 1


def test_the_audit_row_reads_the_decision_instead_of_deciding_again():
    """One decision per flow: what the blocklist decided is what the row says, even when the
    policy would now decide otherwise."""
    rt = FakeRuntime()
    guard = EgressGuard(rt)
    flow = blocked_flow()
    guard.requestheaders(flow)
    flow.request.host = "example.org"  # the row must not re-derive the decision from this
    guard.response(flow)
    assert rt.rows[0].decision == "block" and rt.rows[0].rule_id
