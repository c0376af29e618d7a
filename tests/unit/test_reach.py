"""Where requests may go, in process: the blocklist adapter refusing the gateway's own sockets
and internal addresses at the headers (names resolved first) and pinning each upstream
connection to the address it checked."""

import asyncio

from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow, tutils

from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.flows import STATE
from support import FakeRuntime


def request(guard, host: str, port: int = 80):
    flow = tflow.tflow(req=tutils.treq(host=host, port=port))
    flow.request.headers["host"] = f"{host}:{port}"
    pending = guard.requestheaders(flow)
    if pending is not None:
        asyncio.run(pending)
    return flow


def refused_by(flow) -> str:
    assert flow.response is not None and flow.response.status_code == 403
    decision = flow.metadata[STATE].decision
    assert decision.reason_kind == "destination"
    return decision.rule_id


def test_internal_addresses_are_refused_at_the_headers(tmp_path):
    guard = EgressGuard(FakeRuntime(tmp_path))
    assert refused_by(request(guard, "127.0.0.1", 8123)) == "destinations.loopback"
    assert refused_by(request(guard, "10.1.2.3")) == "destinations.private"
    assert refused_by(request(guard, "169.254.169.254")) == "destinations.metadata"
    assert request(guard, "93.184.216.34").response is None


def test_the_gateways_own_sockets_are_refused_even_where_loopback_is_open(tmp_path, write_policy):
    from support import policy_copy

    policies = policy_copy(
        tmp_path, {"open.yaml": "destinations:\n  allow_internal: [127.0.0.0/8]\n"}
    )
    rt = FakeRuntime(tmp_path / "held", policies)
    rt.destinations.listening([("127.0.0.1", 8081), ("0.0.0.0", 9464)])
    guard = EgressGuard(rt)
    assert request(guard, "127.0.0.1", 5000).response is None  # opened by the policy
    assert refused_by(request(guard, "127.0.0.1", 8081)) == "destinations.own_port"
    assert refused_by(request(guard, "127.0.0.2", 9464)) == "destinations.own_port"


def resolving_to(*addresses: str):
    calls = []

    async def resolve(host: str, port: int) -> tuple[str, ...]:
        calls.append(host)
        return addresses

    return resolve, calls


def test_a_name_is_resolved_once_then_judged_from_the_cache(tmp_path):
    rt = FakeRuntime(tmp_path)
    rt.destinations.resolve, calls = resolving_to("10.9.8.7")
    guard = EgressGuard(rt)
    assert refused_by(request(guard, "intranet.example")) == "destinations.private"
    assert refused_by(request(guard, "intranet.example")) == "destinations.private"
    assert calls == ["intranet.example"]
    rt.now += rt.destinations.CACHE_SECONDS + 1
    request(guard, "intranet.example")
    assert calls == ["intranet.example"] * 2


def test_a_name_resolving_to_public_and_private_addresses_is_refused(tmp_path):
    rt = FakeRuntime(tmp_path)
    rt.destinations.resolve, _ = resolving_to("93.184.216.34", "192.168.1.1")
    assert refused_by(request(EgressGuard(rt), "mixed.example")) == "destinations.private"


def server_hook(host: str, port: int = 443):
    client = connection.Client(peername=("10.0.0.5", 5000), sockname=("10.0.0.1", 8080))
    server = connection.Server(address=(host, port))
    return server_hooks.ServerConnectionHookData(client=client, server=server)


def test_each_connection_is_made_to_the_addresses_just_checked(tmp_path):
    """DNS rebinding: the name passed at the headers, then resolves to an internal address
    when the connection is made. The connection is judged on that answer, and the loop's
    getaddrinfo gives mitmproxy exactly the answer that was judged."""
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    rt.destinations.resolve, _ = resolving_to("93.184.216.34", "2606:2800:220:1::1")

    async def connect_then_resolve(data):
        loop = asyncio.get_running_loop()
        rt.destinations.pin(loop)
        await guard.server_connect(data)
        return await loop.getaddrinfo("rebind.example", 443)

    ok = server_hook("rebind.example")
    infos = asyncio.run(connect_then_resolve(ok))
    assert ok.server.error is None and ok.server.address == ("rebind.example", 443)
    assert [info[4][0] for info in infos] == ["93.184.216.34", "2606:2800:220:1::1"]
    rt.destinations.resolve, _ = resolving_to("127.0.0.1")
    rebound = server_hook("rebind.example")
    asyncio.run(guard.server_connect(rebound))
    assert rebound.server.error and "destinations.loopback" in rebound.server.error
