"""Identity: who is asking — the proxy-auth user when there is one, else the client-IP map."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .policy import Policy


@dataclass(frozen=True)
class Who:
    user: str  # "" when nobody is known: the client IP still identifies the row
    groups: tuple[str, ...] = ()
    source: str = "none"  # proxyauth | ip-map | none


def identify(client_ip: str, proxyauth_user: str | None, policy: Policy) -> Who:
    if proxyauth_user:
        return Who(proxyauth_user, policy.user_groups.get(proxyauth_user, ()), "proxyauth")
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return Who("")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for ident in policy.identities:  # sorted most specific first
        if ip.version == ident.network.version and ip in ident.network:
            groups = ident.groups or policy.user_groups.get(ident.user, ())
            return Who(ident.user, groups, "ip-map")
    return Who("")
