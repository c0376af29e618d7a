"""Destinations: whether a request may go to the addresses its host name resolved to.

The runtime resolves the destination itself and connects to the address it checked, so a name
cannot rebind between check and connect; this module only judges addresses, no sockets, no DNS.
Two rules, and one refused address refuses the whole destination (a name resolving to a public
and a private address is refused):

- the gateway's own listening sockets (proxy, console, metrics) are never a destination, not
  even when the allow-list covers them;
- internal addresses (loopback, private, carrier-grade NAT, link-local, unspecified,
  multicast, reserved) are refused unless the policy's ``destinations.allow_internal`` names
  them. Loopback and unspecified are never opened (the gateway host's other services, such as
  its store, live there), and a cloud metadata address only by an entry naming it alone.

IPv4 inside IPv6 (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is
judged as the IPv4 address it carries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .blocklist import Reason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Kinds of internal address, most specific first; the first whose networks hold an address
# names it. Anything else that is not globally routable is "reserved".
METADATA = _nets(
    "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack, Tencent Cloud ...
    "169.254.170.2/32",  # AWS ECS task metadata
    "100.100.100.200/32",  # Alibaba Cloud
    "fd00:ec2::254/128",  # AWS, over IPv6
)
_KINDS: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("unspecified", _nets("0.0.0.0/8", "::/128")),
    ("loopback", _nets("127.0.0.0/8", "::1/128")),
    ("metadata", METADATA),
    ("link_local", _nets("169.254.0.0/16", "fe80::/10")),
    (
        "private",
        _nets(
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",  # carrier-grade NAT
            "fc00::/7",  # unique local
            "fec0::/10",  # site-local (deprecated)
            "64:ff9b:1::/48",  # NAT64 for local use
        ),
    ),
    ("multicast", _nets("224.0.0.0/4", "ff00::/8")),
    (
        "reserved",
        _nets(
            "192.0.0.0/24",
            "192.0.2.0/24",
            "198.18.0.0/15",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "240.0.0.0/4",  # incl. the broadcast address
            "::/96",  # IPv4-compatible (deprecated)
            "100::/64",  # discard
            "2001:db8::/32",  # documentation
        ),
    ),
)
# Loopback stays openable (a service of the company's on the gateway host); 0.0.0.0 and ::
# mean "this host, any service", which no entry may open.
_NEVER_OPENED = frozenset({"unspecified"})

_REASONS = {
    "own_port": Reason(
        "The gateway does not forward requests to its own services.",
        "网关不转发访问其自身服务的请求。",
    ),
    "unspecified": Reason(
        "0.0.0.0 and :: are not destinations.",
        "0.0.0.0 和 :: 不能作为访问目标。",
    ),
    "loopback": Reason(
        "Requests to the gateway host's loopback addresses are not forwarded.",
        "不转发访问网关本机回环地址的请求。",
    ),
    "metadata": Reason(
        "Requests to the cloud metadata service are not forwarded.",
        "不转发访问云平台元数据服务的请求。",
    ),
    "link_local": Reason(
        "Requests to link-local addresses are not forwarded.",
        "不转发访问链路本地地址的请求。",
    ),
    "private": Reason(
        "Requests to internal network addresses are not forwarded unless the policy allows them.",
        "除策略允许的以外，不转发访问内部网络地址的请求。",
    ),
    "multicast": Reason(
        "Requests to multicast addresses are not forwarded.",
        "不转发访问组播地址的请求。",
    ),
    "reserved": Reason(
        "Requests to reserved, non-public addresses are not forwarded.",
        "不转发访问保留（非公网）地址的请求。",
    ),
    "invalid": Reason(
        "The destination address could not be checked.",
        "无法检查目标地址。",
    ),
    "unresolved": Reason(
        "The destination name did not resolve to any address.",
        "目标域名未解析到任何地址。",
    ),
}


def parse_address(value: str | IPAddress) -> IPAddress:
    """An address as judged: IPv6 zone dropped, IPv4-mapped IPv6 unwrapped. Raises ValueError."""
    address = ipaddress.ip_address(value) if isinstance(value, str) else value
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(int(address))  # fe80::1%eth0 → fe80::1
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address leads to."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def internal_kind(value: str | IPAddress) -> str | None:
    """What the default refuses: ``loopback``, ``private``, ``link_local``, ``metadata``,
    ``unspecified``, ``multicast`` or ``reserved``; None for a public address."""
    address = parse_address(value)
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        kind = internal_kind(embedded)
        if kind is not None or address in _NAT64:  # NAT64 is wholly the IPv4 it leads to
            return kind
    for kind, networks in _KINDS:
        if any(address in n for n in networks if n.version == address.version):
            return kind
    return None if address.is_global else "reserved"


def is_internal(value: str | IPAddress) -> bool:
    """True for an address the gateway refuses unless the policy allows it."""
    return internal_kind(value) is not None


def never_opened_kind(network: IPNetwork) -> str | None:
    """``unspecified`` when ``network`` covers 0.0.0.0 or ::, which no allow-list entry opens;
    the policy refuses such an entry rather than ignore it."""
    for kind, networks in _KINDS:
        if kind in _NEVER_OPENED and any(
            n.version == network.version and n.overlaps(network)  # type: ignore[arg-type]
            for n in networks
        ):
            return kind
    return None


# --- the allow-list --------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowedNetwork:
    """One ``destinations.allow_internal`` entry; no ports means every port."""

    network: IPNetwork
    ports: frozenset[int] = frozenset()
    source: str = ""  # "file:line", for messages to the admin

    def covers(self, address: IPAddress, port: int) -> bool:
        return (
            address.version == self.network.version
            and address in self.network
            and (not self.ports or port in self.ports)
        )


@dataclass(frozen=True)
class DestinationRules:
    """The internal networks (and ports) requests may reach through the proxy."""

    allow_internal: tuple[AllowedNetwork, ...] = ()

    def allows(self, address: IPAddress, port: int, kind: str) -> AllowedNetwork | None:
        """The entry that opens this internal address, if any."""
        if kind in _NEVER_OPENED:
            return None
        for entry in self.allow_internal:
            if kind == "metadata" and entry.network.num_addresses != 1:
                continue  # a broad entry does not open the metadata service by accident
            if entry.covers(address, port):
                return entry
        return None


# --- the gateway's own sockets ---------------------------------------------------------------

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})  # "" is mitmproxy's "every address"


def _listener_host(host: str) -> IPAddress | None:
    """None for a wildcard; ``localhost`` as 127.0.0.1. Raises ValueError on a name."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host in WILDCARD_HOSTS:
        return None
    if host.lower() == "localhost":
        return ipaddress.IPv4Address("127.0.0.1")
    return parse_address(host)


@dataclass(frozen=True)
class OwnSockets:
    """Where the gateway listens, as (host, port); a wildcard host (``0.0.0.0``, ``::``, ``""``)
    means every local address: loopback plus ``local_addresses``, the host's interface
    addresses, which the caller supplies. A loopback listener is taken to hold its port on
    every loopback address. Hosts must be IP literals (or ``localhost``)."""

    listeners: tuple[tuple[str, int], ...] = ()
    local_addresses: tuple[str, ...] = ()
    _specific: frozenset[tuple[IPAddress, int]] = field(init=False, repr=False, compare=False)
    _loopback_ports: frozenset[int] = field(init=False, repr=False, compare=False)
    _local_ports: frozenset[int] = field(init=False, repr=False, compare=False)
    _local: frozenset[IPAddress] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        specific: set[tuple[IPAddress, int]] = set()
        loopback_ports: set[int] = set()
        wildcard_ports: set[int] = set()
        for host, port in self.listeners:
            address = _listener_host(host)
            if address is None:
                wildcard_ports.add(port)
            elif address.is_loopback:
                loopback_ports.add(port)
            else:
                specific.add((address, port))
        local = frozenset(parse_address(a) for a in self.local_addresses)
        object.__setattr__(self, "_specific", frozenset(specific))
        object.__setattr__(self, "_loopback_ports", frozenset(loopback_ports | wildcard_ports))
        object.__setattr__(self, "_local_ports", frozenset(wildcard_ports))
        object.__setattr__(self, "_local", local)

    def covers(self, address: IPAddress, port: int) -> bool:
        """Would a connection to ``address:port`` reach one of the gateway's listeners?"""
        if internal_kind(address) in ("loopback", "unspecified"):  # 0.0.0.0 and :: too
            return port in self._loopback_ports
        if port in self._local_ports and address in self._local:
            return True
        return (address, port) in self._specific


# --- the check -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a destination is refused: ``rule_id`` is ``destinations.<kind>``."""

    rule_id: str
    address: str  # the resolved address that was refused, as judged ("" when there was none)
    port: int
    reason: Reason

    @property
    def kind(self) -> str:
        return self.rule_id.removeprefix("destinations.")


def _refusal(kind: str, address: str, port: int) -> Refusal:
    return Refusal(f"destinations.{kind}", address, port, _REASONS[kind])


def _judged(addresses: Iterable[str]) -> list[tuple[str, IPAddress | None]]:
    out: list[tuple[str, IPAddress | None]] = []
    for text in addresses:
        try:
            out.append((text, parse_address(text)))
        except ValueError:
            out.append((text, None))
    return out


def check_destination(
    addresses: Sequence[str], port: int, own: OwnSockets, rules: DestinationRules
) -> Refusal | None:
    """None when every resolved address may be reached on ``port``; otherwise the refusal,
    the gateway's own sockets first. No addresses, or one that is not an IP, is refused."""
    if not addresses:
        return _refusal("unresolved", "", port)
    if not 0 < port < 65536:
        return _refusal("invalid", "", port)
    judged = _judged(addresses)
    for text, address in judged:
        if address is None:
            return _refusal("invalid", text, port)
        embedded = _embedded_ipv4(address)
        if own.covers(address, port) or (embedded is not None and own.covers(embedded, port)):
            return _refusal("own_port", str(address), port)
    for _, address in judged:
        assert address is not None
        kind = internal_kind(address)
        if kind is None:
            continue
        embedded = _embedded_ipv4(address)
        if rules.allows(address, port, kind) or (
            embedded is not None and rules.allows(embedded, port, kind)
        ):
            continue
        return _refusal(kind, str(address), port)
    return None
