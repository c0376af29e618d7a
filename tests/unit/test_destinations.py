"""Destination guard: the gateway's own sockets and internal addresses are not destinations."""

import dataclasses
import ipaddress

import pytest

from egress_guard.core.destinations import (
    AllowedNetwork,
    DestinationRules,
    OwnSockets,
    check_destination,
    internal_kind,
    is_internal,
    never_opened_kind,
)

NONE = OwnSockets()
DEFAULT = DestinationRules()
PUBLIC = "93.184.216.34"


def allow(*entries: str | tuple[str, set[int]]) -> DestinationRules:
    out = []
    for e in entries:
        cidr, ports = (e, set()) if isinstance(e, str) else e
        out.append(AllowedNetwork(ipaddress.ip_network(cidr), frozenset(ports)))
    return DestinationRules(tuple(out))


def rule(addresses, port=443, own=NONE, rules=DEFAULT) -> str | None:
    refusal = check_destination(addresses, port, own, rules)
    return refusal.rule_id if refusal else None


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert check_destination([address], 443, NONE, DEFAULT) is None
    assert not is_internal(address)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # carrier-grade NAT
        ("fd12:3456::1", "private"),  # unique local
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("169.254.169.254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "reserved"),
        ("::127.0.0.1", "reserved"),  # IPv4-compatible, deprecated
        # IPv4 inside IPv6 is judged as the IPv4 it carries
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:a9fe:a9fe::", "metadata"),  # 6to4 of 169.254.169.254
    ],
)
def test_internal_addresses_are_refused_by_default(address, kind):
    assert internal_kind(address) == kind and is_internal(address)
    refusal = check_destination([address], 80, NONE, DEFAULT)
    assert refusal is not None and refusal.rule_id == f"destinations.{kind}"
    assert refusal.kind == kind and refusal.port == 80
    assert refusal.reason.en and refusal.reason.zh


def test_mapped_ipv6_is_refused_and_reported_as_the_ipv4_it_carries():
    refusal = check_destination(["::ffff:127.0.0.1"], 8080, NONE, DEFAULT)
    assert refusal is not None and refusal.address == "127.0.0.1"
    own = OwnSockets((("127.0.0.1", 8080),))
    assert rule(["::ffff:127.0.0.1"], 8080, own) == "destinations.own_port"


def test_one_internal_address_refuses_the_whole_destination():
    assert rule([PUBLIC, "10.0.0.1"]) == "destinations.private"
    assert rule(["10.0.0.1", PUBLIC]) == "destinations.private"
    assert rule([PUBLIC, "2606:4700:4700::1111", "::ffff:192.168.0.1"]) == "destinations.private"
    refusal = check_destination([PUBLIC, "169.254.169.254"], 80, NONE, DEFAULT)
    assert refusal is not None and refusal.address == "169.254.169.254"


def test_own_ports_on_loopback_are_refused():
    own = OwnSockets((("127.0.0.1", 8080), ("localhost", 8081), ("[::1]", 9090)))
    for address, port in [
        ("127.0.0.1", 8080),
        ("127.0.0.1", 8081),
        ("::1", 8080),  # a loopback listener is taken to hold its port on every loopback
        ("127.0.0.2", 9090),
        ("0.0.0.0", 8080),  # connecting to 0.0.0.0 reaches the host itself
        ("::", 8081),
    ]:
        assert rule([address], port, own) == "destinations.own_port", (address, port)
    assert rule(["127.0.0.1"], 22, own) == "destinations.loopback"  # not ours, still refused


def test_wildcard_listeners_own_their_ports_on_loopback_and_every_local_address():
    own = OwnSockets(
        (("0.0.0.0", 8080), ("::", 8443), ("", 9464)),
        local_addresses=("10.20.0.5", "fd00:20::5", "192.168.1.7"),
    )
    rules = allow("10.20.0.0/16", "fd00:20::/64")
    for address in ("10.20.0.5", "::ffff:10.20.0.5", "fd00:20::5", "127.0.0.1", "::1"):
        for port in (8080, 8443, 9464):
            assert rule([address], port, own, rules) == "destinations.own_port", (address, port)
    # The same ports on other hosts of an allowed network, and other ports here, pass.
    assert rule(["10.20.0.6"], 8080, own, rules) is None
    assert rule(["10.20.0.5"], 443, own, rules) is None
    assert rule(["192.168.1.7"], 443, own, rules) == "destinations.private"  # not allowed


def test_the_allow_list_never_opens_the_gateways_own_sockets():
    own = OwnSockets((("10.20.0.5", 3128), ("0.0.0.0", 8081)), local_addresses=("10.20.0.5",))
    rules = allow("10.20.0.0/16", ("10.20.0.5/32", {3128, 8081}))
    assert rule(["10.20.0.5"], 3128, own, rules) == "destinations.own_port"
    assert rule(["10.20.0.5"], 8081, own, rules) == "destinations.own_port"
    assert rule(["10.20.0.9"], 3128, own, rules) is None  # a colleague's proxy, allowed
    # The own port wins over any other refusal, wherever it is among the addresses.
    assert rule(["10.9.9.9", "10.20.0.5"], 3128, own, allow()) == "destinations.own_port"


def test_an_allowed_private_network_passes():
    rules = allow("10.20.0.0/16", "fd00:1::/64", "100.64.0.0/10")
    assert rule(["10.20.3.4"], 443, rules=rules) is None
    assert rule(["::ffff:10.20.3.4"], 443, rules=rules) is None
    assert rule(["fd00:1::7"], 443, rules=rules) is None
    assert rule(["100.70.0.1"], 443, rules=rules) is None
    assert rule(["10.21.0.1"], 443, rules=rules) == "destinations.private"
    assert rule(["10.20.3.4", "10.30.0.1"], 443, rules=rules) == "destinations.private"


def test_an_allow_list_entry_with_ports_opens_only_those_ports():
    rules = allow(("192.168.5.10/32", {443, 8443}))
    assert rule(["192.168.5.10"], 443, rules=rules) is None
    assert rule(["192.168.5.10"], 8443, rules=rules) is None
    assert rule(["192.168.5.10"], 22, rules=rules) == "destinations.private"
    assert rule(["192.168.5.11"], 443, rules=rules) == "destinations.private"


def test_the_metadata_service_is_opened_only_by_an_entry_naming_it():
    assert rule(["169.254.169.254"], 80) == "destinations.metadata"
    broad = allow("169.254.0.0/16", "100.64.0.0/10")
    assert rule(["169.254.169.254"], 80, rules=broad) == "destinations.metadata"
    assert rule(["100.100.100.200"], 80, rules=broad) == "destinations.metadata"
    assert rule(["169.254.10.1"], 80, rules=broad) is None
    assert rule(["169.254.169.254"], 80, rules=allow("169.254.169.254/32")) is None


def test_unspecified_is_never_opened_and_loopback_only_by_an_entry():
    rules = allow("0.0.0.0/0", "::/0")
    assert rule(["0.0.0.0"], 8123, rules=rules) == "destinations.unspecified"
    assert rule(["127.0.0.1"], 8123) == "destinations.loopback"
    assert rule(["::1"], 8123) == "destinations.loopback"
    assert rule(["127.0.0.1"], 8123, rules=allow("127.0.0.1/32")) is None
    assert never_opened_kind(ipaddress.ip_network("127.0.0.0/8")) is None
    assert never_opened_kind(ipaddress.ip_network("0.0.0.0/0")) is not None
    assert never_opened_kind(ipaddress.ip_network("::/0")) is not None
    assert never_opened_kind(ipaddress.ip_network("10.0.0.0/8")) is None
    assert never_opened_kind(ipaddress.ip_network("fd00::/8")) is None


def test_nothing_to_check_is_refused():
    assert rule([]) == "destinations.unresolved"
    assert rule(["not-an-ip"]) == "destinations.invalid"
    assert rule([PUBLIC, "10.0.0.999"]) == "destinations.invalid"
    assert rule([PUBLIC], port=0) == "destinations.invalid"
    assert rule([PUBLIC], port=65536) == "destinations.invalid"


def test_listener_hosts_must_be_addresses():
    with pytest.raises(ValueError):
        OwnSockets((("gateway.corp.example", 8080),))
    with pytest.raises(ValueError):
        OwnSockets((("0.0.0.0", 8080),), local_addresses=("eth0",))


def test_the_values_are_frozen_and_compare_by_value():
    own = OwnSockets((("127.0.0.1", 8080),))
    assert own == OwnSockets((("127.0.0.1", 8080),))
    assert allow("10.0.0.0/8") == allow("10.0.0.0/8")
    refusal = check_destination(["10.0.0.1"], 443, NONE, DEFAULT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        refusal.rule_id = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.allow_internal = ()  # type: ignore[misc]
