"""Decisions: pure functions of (request facts, policy, now) → allow / block and why.

Nothing here touches mitmproxy, the network or the store, so every rule of the gateway can be
tested with plain values. The adapters in ``runtime`` turn flows into ``RequestFacts`` and
carry out the ``Decision``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .blocklist import Reason, Rule
from .destinations import Refusal as DestinationRefusal
from .hosts import normalize_host, split_host_port
from .policy import Policy
from .scan import Verdict as ScanVerdict
from .upload import CapHit

Verdict = Literal["allow", "block", "alert"]
# destination: a place the gateway never forwards to (its own ports, internal addresses, a
# request target that does not match its tunnel), whatever the blocklists say. exception: let
# through by an approved exception that lifts the rule which would have blocked it.
ReasonKind = Literal["", "blocklist", "destination", "upload_cap", "marker", "error", "exception"]


@dataclass(frozen=True)
class RequestFacts:
    """What a decision may look at. ``hosts`` are every name the request could be going to:
    the connection target, the SNI and the Host header, which a client may make disagree."""

    hosts: tuple[str, ...]
    path: str | None  # None for a CONNECT: the path is not known yet
    method: str = "GET"
    user: str = ""
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason_kind: ReasonKind = ""
    rule: Rule | None = None
    host: str = ""  # the normalized host the rule matched
    cap: CapHit | None = None  # the upload cap that refused the request
    scan: ScanVerdict | None = None  # what the marker scan found
    exception_id: str = ""  # the approved exception this request passed by, if any

    @property
    def rule_id(self) -> str:
        if self.reason_kind == "upload_cap" and self.cap:
            return self.cap.cap_id
        if self.reason_kind == "marker" and self.scan:
            return self.scan.rule_id
        return self.rule.id if self.rule else ""

    @property
    def category(self) -> str:
        return self.rule.category if self.rule else ""


ALLOW = Decision("allow")


def decide(facts: RequestFacts, policy: Policy) -> Decision:
    """Block when any of the request's host names is covered by a block rule for this path."""
    allowed_by: Decision | None = None
    for raw in dict.fromkeys(facts.hosts):
        if not raw:
            continue
        host = normalize_host(raw)
        match = policy.index.lookup(host, facts.path)
        if match is None:
            continue
        if match.rule.action == "block":
            return Decision("block", "blocklist", match.rule, host)
        allowed_by = allowed_by or Decision("allow", "", match.rule, host)
    return allowed_by or ALLOW


AUTHORITY_MISMATCH = Rule(
    "gateway.authority_mismatch",
    "",
    "block",
    Reason(
        "The request names a different site than the connection it was sent on; such requests "
        "are used to reach blocked sites through allowed ones.",
        "请求指向的网站与其所在连接的网站不一致，此类请求常被用于借道访问被禁止的网站。",
    ),
)


def decide_tunnel_target(authority: str, tunnel_host: str) -> Decision | None:
    """Inside a tunnel, an HTTP/1 request in absolute form (``GET http://other/``) is routed by
    a front end to the host it names, not to the tunnel's: refuse it unless the two agree."""
    if not authority:
        return None
    host = normalize_host(split_host_port(authority)[0])
    if host == normalize_host(tunnel_host):
        return None
    return Decision("block", "destination", AUTHORITY_MISMATCH, host)


RAW_TUNNEL = Rule(
    "gateway.raw_tunnel",
    "",
    "block",
    Reason(
        "Traffic inside this tunnel is not HTTP, so it cannot be checked for confidential "
        "content; company policy refuses it unless the destination is approved for it.",
        "该隧道内的流量不是 HTTP，无法检查是否含有涉密内容；"
        "除非目的地已获批准，按公司规定予以拒绝。",
    ),
)


def decide_raw_tunnel(hosts: tuple[str, ...], policy: Policy) -> Decision | None:
    """Non-HTTP bytes inside a tunnel: refused unless a host is on the policy's raw-TCP list
    (then relayed, counted and logged)."""
    if any(policy.raw_tcp.lookup(normalize_host(h), None) is not None for h in hosts if h):
        return None
    host = next((normalize_host(h) for h in hosts if h), "")
    return Decision("block", "destination", RAW_TUNNEL, host)


def decide_destination(refusal: DestinationRefusal, host: str) -> Decision:
    """A destination the gateway never forwards to (``core.destinations``), as a decision."""
    rule = Rule(refusal.rule_id, "", "block", refusal.reason)
    return Decision("block", "destination", rule, normalize_host(host))


def needs_interception(hosts: tuple[str, ...], policy: Policy) -> bool:
    """At CONNECT: some rule for these hosts depends on the path, so the tunnel must be opened."""
    return any(policy.index.has_path_rules(normalize_host(h)) for h in hosts if h)


def is_passthrough(host: str, policy: Policy) -> bool:
    """Pinned apps: tunnel without TLS interception (still logged)."""
    return policy.passthrough.lookup(normalize_host(host), None) is not None
