"""Decisions: pure functions of (request facts, policy, now) → allow / block and why.

Nothing here touches mitmproxy, the network or the store, so every rule of the gateway can be
tested with plain values. The addons in ``gateway`` turn flows into ``RequestFacts`` and
carry out the ``Decision``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .blocklist import Rule
from .hosts import normalize_host
from .policy import Policy
from .scan import Verdict as ScanVerdict
from .upload import CapHit

Verdict = Literal["allow", "block", "alert"]
ReasonKind = Literal["", "blocklist", "upload_cap", "marker", "error"]


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


def needs_interception(hosts: tuple[str, ...], policy: Policy) -> bool:
    """At CONNECT: some rule for these hosts depends on the path, so the tunnel must be opened."""
    return any(policy.index.has_path_rules(normalize_host(h)) for h in hosts if h)


def is_passthrough(host: str, policy: Policy) -> bool:
    """Pinned apps: tunnel without TLS interception (still logged)."""
    return policy.passthrough.lookup(normalize_host(host), None) is not None
