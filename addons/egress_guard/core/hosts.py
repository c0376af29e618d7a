"""Host and path normalization: the one place that turns what a client wrote into what rules see.

Every comparison between a request and a policy goes through these functions, so the
policy loader and the request path agree on case, trailing dots, IDN, ports and IP literals.
"""

from __future__ import annotations

import ipaddress
import posixpath
import socket
from functools import lru_cache
from urllib.parse import unquote

import idna

_LEGACY_IPV4_CHARS = frozenset("0123456789abcdefx.")


@lru_cache(maxsize=8192)
def _ip_literal(host: str) -> str | None:
    """Canonical text of an IP literal, or None. Accepts the legacy IPv4 forms resolvers accept."""
    if not host or (":" not in host and not host[-1].isdigit() and "0x" not in host):
        return None  # a name: IPv4 forms end in a digit (or are hex), IPv6 has colons
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
        # 2130706433, 0x7f.1, 017700000001: getaddrinfo() treats these as IPv4 too.
        if host and set(host) <= _LEGACY_IPV4_CHARS and host[0].isdigit():
            try:
                ip = ipaddress.IPv4Address(socket.inet_aton(host))
            except OSError:
                return None
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def split_host_port(authority: str) -> tuple[str, int | None]:
    """Split 'host:port', '[v6]:port', 'v6' into host and port (None when absent)."""
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        if end == -1:
            return authority, None
        host, rest = authority[1:end], authority[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            return host, int(rest[1:])
        return host, None
    if authority.count(":") == 1:
        host, _, port = authority.partition(":")
        if port.isdigit():
            return host, int(port)
        return host, None
    return authority, None


@lru_cache(maxsize=8192)  # the same few thousand hosts come back all day
def normalize_host(raw: str) -> str:
    """Lowercase ASCII host (punycode for IDN), no port, no brackets, no trailing dot.

    IP literals come back in canonical form (IPv4-mapped IPv6 as IPv4). A name that
    IDNA refuses comes back lowercased as written: it matches no rule, and the upstream
    connection fails on it anyway.
    """
    host, _ = split_host_port(raw)
    host = host.strip().rstrip(".").lower()
    ip = _ip_literal(host)
    if ip is not None:
        return ip
    if host.isascii():
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError:
        return host


def is_ip_literal(host: str) -> bool:
    return _ip_literal(host) is not None


def validate_host_pattern(raw: str) -> str:
    """Normalize a host pattern from a policy file, or raise ValueError saying what is wrong."""
    text = raw.strip()
    if not text:
        raise ValueError("empty host name")
    for bad, what in (("://", "a scheme"), ("/", "a path"), ("*", "a wildcard"), (" ", "a space")):
        if bad in text:
            raise ValueError(
                f"{raw!r} contains {what}; write a bare host name "
                "(a domain covers all its subdomains; paths go in 'paths')"
            )
    host, port = split_host_port(text)
    if port is not None:
        raise ValueError(f"{raw!r} contains a port; rules match every port of a host")
    if is_ip_literal(host.lower()):
        return normalize_host(host)
    try:
        return idna.encode(host.rstrip(".").lower(), uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise ValueError(f"{raw!r} is not a valid host name: {e}") from None


def normalize_path(raw: str) -> str:
    """Path for prefix matching: no query/fragment, percent-decoded once, dot segments
    resolved, duplicate slashes folded, lowercased (servers differ on case; a block errs wide)."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    path = unquote(path)
    if not path.startswith("/"):
        path = "/" + path
    trailing = path.endswith("/") and path != "/"
    path = posixpath.normpath(path)
    if path.startswith("//"):  # normpath keeps a leading '//' (POSIX); fold it
        path = "/" + path.lstrip("/")
    if trailing:
        path += "/"
    return path.lower()
