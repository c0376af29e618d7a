"""Resolver: the addresses a destination resolves to, and whether the gateway may reach them.

The pure rules are in ``core.destinations`` (never the gateway's own sockets, internal
addresses only when the policy lists them). Here: resolving names (with a short cache, so a
decision per request costs a dictionary lookup), the gateway's own listening sockets, and the
host's interface addresses (a listener on 0.0.0.0 owns its port on each of them).

A request is judged on the name as it arrives, and its connection on the addresses it is made
to: ``Blocklist.server_connect`` resolves the name and checks every answer, and the event
loop's ``getaddrinfo`` (``pin``) hands mitmproxy exactly those answers when it connects a
moment later — so a name that resolves somewhere else by then (DNS rebinding) reaches
nothing new, and the connection still falls back from one checked address to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from egress_guard.core.destinations import (
    DestinationRules,
    OwnSockets,
    Refusal,
    check_destination,
)
from egress_guard.core.hosts import is_ip_literal, normalize_host

Resolve = Callable[[str, int], Awaitable[tuple[str, ...]]]
_SIOCGIFADDR = 0x8915


def interface_addresses() -> tuple[str, ...]:
    """This host's interface addresses (Linux: ioctl for IPv4, /proc for IPv6)."""
    found: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()))
                found.append(socket.inet_ntoa(packed[20:24]))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw)))
    return tuple(dict.fromkeys(found))


def addrinfo(addresses: Iterable[str], port: int, family: int = 0) -> list[Any]:
    """``getaddrinfo``'s answer for these addresses (TCP), in their order."""
    infos: list[Any] = []
    for address in addresses:
        if ":" in address:
            entry = (
                socket.AF_INET6,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, port, 0, 0),
            )
        else:
            entry = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
        if family in (0, entry[0]):
            infos.append(entry)
    return infos


async def getaddrinfo(host: str, port: int) -> tuple[str, ...]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


class Destinations:
    """Checks destinations against the gateway's own sockets and the policy's rules."""

    CACHE_SECONDS = 30.0
    CACHE_SIZE = 10_000

    def __init__(self, clock: Callable[[], float], resolve: Resolve = getaddrinfo):
        self.clock = clock
        self.resolve = resolve
        self.own = OwnSockets()
        self._cache: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}

    def pin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` resolve a name the gateway has checked to the addresses it checked
        (mitmproxy connects by name); other names resolve as before."""
        original = loop.getaddrinfo

        async def checked_getaddrinfo(
            host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
        ) -> list[Any]:
            answer = self._cache.get((normalize_host(str(host)), int(port or 0)))
            if answer is None or answer[0] < self.clock():
                return await original(
                    host, port, family=family, type=type, proto=proto, flags=flags
                )
            return addrinfo(answer[1], int(port), family)

        loop.getaddrinfo = checked_getaddrinfo  # type: ignore[method-assign]

    def listening(self, listeners: Iterable[tuple[str, int]]) -> None:
        """The gateway's own sockets (proxy, console, metrics), once they are bound."""
        self.own = OwnSockets(tuple(listeners), interface_addresses())

    def check_now(
        self, host: str, port: int, rules: DestinationRules
    ) -> tuple[bool, Refusal | None]:
        """Without waiting: (known, refusal or None). Known when ``host`` is an address or was
        resolved lately; otherwise a lookup is needed first (``check``)."""
        host = normalize_host(host)
        if is_ip_literal(host):
            return True, check_destination((host,), port, self.own, rules)
        cached = self._cache.get((host, port))
        if cached is None or cached[0] < self.clock():
            return False, None
        return True, check_destination(cached[1], port, self.own, rules)

    async def check(
        self, host: str, port: int, rules: DestinationRules
    ) -> tuple[Refusal | None, tuple[str, ...]]:
        """Resolve ``host`` now and judge every address it resolves to: (refusal or None, the
        addresses). A name that does not resolve is not refused here: its connection fails."""
        host = normalize_host(host)
        if is_ip_literal(host):
            return check_destination((host,), port, self.own, rules), (host,)
        try:
            addresses = await self.resolve(host, port)
        except OSError:
            return None, ()
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        self._cache[(host, port)] = (self.clock() + self.CACHE_SECONDS, addresses)
        return check_destination(addresses, port, self.own, rules), addresses
