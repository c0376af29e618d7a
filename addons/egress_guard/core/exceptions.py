"""Exceptions: the pure model of temporary exceptions — what one is, the events that make and
end it, the fold that derives its state, the rules approvers act under, and the active set the
decision path asks.

An exception lets a ``Subject`` (a user, a group, a client network) past one ``Control`` (a
block rule, the upload caps, a marker level, the unscannable fallback) for one ``Target``, from
a start until an expiry. Nothing is ever rewritten: each transition is an ``Event`` appended to
a log, and the state is ``state_of(events, now)``, so the log is the audit trail. The commands
(``request``, ``grant``, ``approve``, ``deny``, ``cancel``, ``revoke``) check the rules and
separation of duties and return the event to append, or a ``Refusal`` saying why not, which the
API records. ``ActiveExceptions`` answers the decision path with a few dict probes however many
exceptions are active.

Times are integer milliseconds since the epoch (UTC), and ``now_ms`` is always passed in.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal, get_args

from .hosts import is_ip_literal, normalize_host, normalize_path, validate_host_pattern
from .units import format_size
from .upload import Limits

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
APPROVER_ROLE = "approver"  # the only role that decides; admin does not imply it
MAX_LEAD_MS = 30 * DAY  # how far ahead an exception may be scheduled to start
MAX_REASON = 2000  # characters

SubjectKind = Literal["user", "group", "client"]
ControlKind = Literal["block", "upload", "marker", "unscannable"]
Lowered = Literal["alert", "log"]  # what a marker or unscannable exception lowers block to
EventKind = Literal["requested", "granted", "approved", "denied", "cancelled", "revoked"]
StateName = Literal["pending", "scheduled", "active", "denied", "cancelled", "revoked", "expired"]
LIVE_STATES: frozenset[str] = frozenset({"pending", "scheduled", "active"})

_LOWER_RANK = {"log": 1, "alert": 2}  # higher is closer to block: a narrower exception
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # categories and marker levels, as in the policy
_RULE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_CONTROL_KINDS: tuple[str, ...] = ("block", "upload", "marker", "unscannable")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def new_exception_id() -> str:
    """A short id people can type (``ex-`` and 12 hex digits)."""
    return f"ex-{secrets.token_hex(6)}"


def new_event_id() -> str:
    return secrets.token_hex(16)


def span(ms: int) -> str:
    """A duration for a message: ``7d``, ``36h``, ``90m``, ``45s``."""
    for unit, size in (("d", DAY), ("h", HOUR), ("m", MINUTE)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    if ms >= HOUR:
        return f"{ms / HOUR:.1f}h"
    return f"{math.ceil(ms / SECOND)}s"


# A user or group name as proxy authentication and the directory give it: letters (any
# script), digits, ``.``, ``@``, ``_``, ``-``. No ``*``, spaces or ``:``, so a subject never
# reads as a pattern or as two subjects.
SUBJECT_NAME = r"[\w.@-]{1,64}"
_SUBJECT_NAME_RE = re.compile(SUBJECT_NAME)


def _check_name(what: str, value: str) -> None:
    if not _SUBJECT_NAME_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r}: 1 to 64 letters, digits, '.', '@', '_' or '-'")


# --- values ----------------------------------------------------------------------------------


def _network(text: str) -> IPNetwork:
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        if "host bits" in str(e):
            wider = ipaddress.ip_network(text.strip(), strict=False)
            raise ValueError(f"{text!r} has host bits set: write {wider}") from None
        raise ValueError(
            f"{text!r} is not a network (examples: 10.1.20.0/24, fd00:1::/64)"
        ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_IPV4_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


@dataclass(frozen=True)
class Subject:
    """Who an exception lets past: a user, a group (of proxy users) or a client network."""

    kind: SubjectKind
    value: str  # the user or group name; a network in canonical form (10.1.0.0/16)

    def __post_init__(self) -> None:
        if self.kind in ("user", "group"):
            _check_name(f"{self.kind} name", self.value)
        elif self.kind == "client":
            canonical = str(_network(self.value))
            if canonical != self.value:
                raise ValueError(f"write the network {self.value!r} as {canonical}")
        else:
            raise ValueError(f"unknown subject kind {self.kind!r}: user, group or client")

    @classmethod
    def user(cls, name: str) -> Subject:
        return cls("user", name)

    @classmethod
    def group(cls, name: str) -> Subject:
        return cls("group", name)

    @classmethod
    def client(cls, network: str) -> Subject:
        return cls("client", str(_network(network)))

    @classmethod
    def parse(cls, text: str) -> Subject:
        """``user:alice``, ``group:finance``, ``client:10.1.0.0/16``."""
        kind, sep, value = text.partition(":")
        if not sep or kind not in ("user", "group", "client"):
            raise ValueError(f"{text!r}: write user:NAME, group:NAME or client:CIDR")
        return cls.client(value) if kind == "client" else cls(kind, value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    @property
    def network(self) -> IPNetwork | None:
        return _network(self.value) if self.kind == "client" else None

    def within(self, other: Subject) -> bool:
        """Everyone this subject lets past, ``other`` lets past too."""
        if self == other:
            return True
        mine, theirs = self.network, other.network
        return (
            mine is not None
            and theirs is not None
            and mine.version == theirs.version
            and mine.subnet_of(theirs)  # type: ignore[arg-type]
        )

    def includes(self, actor: Actor) -> str:
        """Why the actor is among those this subject lets past ("" when not)."""
        if self.kind == "user" and self.value == actor.name:
            return f"the exception is for {actor.name} themselves"
        if self.kind == "group" and self.value in actor.groups:
            return f"{actor.name} is in the group {self.value}"
        if self.kind == "client" and actor.client_ip:
            key = _ip_key(actor.client_ip)
            net = self.network
            if (
                key is not None
                and net is not None
                and key[0] == net.version
                and int(net.network_address) <= key[1] <= int(net.broadcast_address)
            ):
                return f"the network {self.value} includes your address {actor.client_ip}"
        return ""


@dataclass(frozen=True)
class Control:
    """What an exception lifts: ``block``, ``upload``, ``marker:LEVEL`` or ``unscannable``."""

    kind: ControlKind
    level: str = ""  # marker only
    key: str = field(init=False, repr=False, compare=False)  # "marker:LEVEL": the index key

    def __post_init__(self) -> None:
        if self.kind not in _CONTROL_KINDS:
            raise ValueError(f"unknown control {self.kind!r}: {', '.join(_CONTROL_KINDS)}")
        if (self.kind == "marker") != bool(self.level):
            raise ValueError("a marker control names one level (marker:LEVEL); no other does")
        if self.level and not _NAME_RE.match(self.level):
            raise ValueError(f"marker level {self.level!r} is not a level id")
        object.__setattr__(self, "key", f"marker:{self.level}" if self.level else self.kind)

    @classmethod
    def parse(cls, text: str) -> Control:
        kind, sep, level = text.partition(":")
        if kind == "marker" and not sep:
            raise ValueError("name the level: marker:LEVEL")
        if sep and kind != "marker":
            raise ValueError(f"{text!r}: only a marker control names a level")
        return cls(kind, level)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.key


BLOCK = Control("block")
UPLOAD = Control("upload")
UNSCANNABLE = Control("unscannable")


def marker(level: str) -> Control:
    return Control("marker", level)


@dataclass(frozen=True)
class Target:
    """Where an exception applies: every constraint given must match the request.

    The four kinds people ask for are one constraint each — a host with its subdomains, an
    exact host (either with an optional path prefix), a destination category, a rule id. An
    approver narrows by adding or tightening constraints, so "one host instead of the
    category" is that host *within* the category and can never reach beyond it.
    """

    host: str = ""  # normalized; "" = any host
    exact: bool = False  # the host alone, not its subdomains
    path: str = ""  # a normalized path prefix; needs a host
    category: str = ""  # the destination's policy category
    rule_id: str = ""  # the rule the request matched (a blocklist rule, a cap, a marker)

    def __post_init__(self) -> None:
        if not (self.host or self.category or self.rule_id):
            raise ValueError("a target names a host, a category or a rule")
        if self.host and validate_host_pattern(self.host) != self.host:
            raise ValueError(f"write the host {self.host!r} as {validate_host_pattern(self.host)}")
        if self.host and not self.exact and is_ip_literal(self.host):
            object.__setattr__(self, "exact", True)  # an address has no subdomains
        if (self.path or self.exact) and not self.host:
            raise ValueError("a path prefix or an exact host needs a host")
        if self.path and (not self.path.startswith("/") or normalize_path(self.path) != self.path):
            raise ValueError(f"path prefix {self.path!r} is not normalized")
        if self.category and not _NAME_RE.match(self.category):
            raise ValueError(
                f"category {self.category!r} does not match the pattern [a-z][a-z0-9_]*"
            )
        if self.rule_id and not _RULE_RE.match(self.rule_id):
            raise ValueError(f"rule id {self.rule_id!r} is not a rule id")

    @classmethod
    def for_host(cls, host: str, path: str = "", *, exact: bool = False) -> Target:
        """A host and its subdomains (an IP address: itself), optionally under a path prefix."""
        prefix = normalize_path(path) if path else ""
        return cls(validate_host_pattern(host), exact, "" if prefix == "/" else prefix)

    @classmethod
    def for_exact_host(cls, host: str, path: str = "") -> Target:
        return cls.for_host(host, path, exact=True)

    @classmethod
    def for_category(cls, category: str) -> Target:
        return cls(category=category)

    @classmethod
    def for_rule(cls, rule_id: str) -> Target:
        return cls(rule_id=rule_id)

    @property
    def kind(self) -> Literal["host", "exact_host", "category", "rule"]:
        if self.host:
            return "exact_host" if self.exact else "host"
        return "rule" if self.rule_id else "category"

    def __str__(self) -> str:
        where = [f"{'=' if self.exact else ''}{self.host}{self.path}"] if self.host else []
        where += [f"category {self.category}"] if self.category else []
        where += [f"rule {self.rule_id}"] if self.rule_id else []
        return ", ".join(where)

    def widened_by(self, new: Target) -> str:
        """Why ``new`` would reach beyond this target ("" when it stays within)."""
        if self.category and new.category != self.category:
            return f"the target is limited to the category {self.category}"
        if self.rule_id and new.rule_id != self.rule_id:
            return f"the target is limited to the rule {self.rule_id}"
        if self.host:
            if not new.host:
                return f"the target is limited to the host {self.host}"
            if self.exact and (new.host != self.host or not new.exact):
                return f"the target is the host {self.host} alone, not its subdomains"
            if new.host != self.host and not new.host.endswith("." + self.host):
                return f"{new.host} is not {self.host} or one of its subdomains"
            if self.path and not new.path.startswith(self.path):
                return f"the target is limited to paths under {self.path}"
        return ""


@dataclass(frozen=True)
class UploadGrant:
    """The caps an upload exception raises, to exactly these sizes. A limit left out (None)
    is not raised: the policy's cap stays. Never unlimited."""

    per_request: int | None = None  # bytes one request may carry
    per_window: int | None = None  # bytes the user's rolling window may hold

    def __post_init__(self) -> None:
        if self.per_request is None and self.per_window is None:
            raise ValueError(
                "an upload exception sets per_request and/or per_window bytes; "
                "it is never unlimited"
            )
        for name in ("per_request", "per_window"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(f"{name} must be a number of bytes above zero, not {value!r}")


@dataclass(frozen=True)
class Terms:
    """What an exception lets past, and for how long: asked for, granted, or narrowed."""

    subject: Subject
    control: Control
    target: Target
    start_ms: int
    expiry_ms: int  # mandatory: the exception ends here, to the millisecond
    grant: UploadGrant | None = None  # upload only
    lowered_to: Lowered | Literal[""] = ""  # marker and unscannable only

    def __post_init__(self) -> None:
        for name in ("start_ms", "expiry_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be milliseconds since the epoch, not {value!r}")
        if self.expiry_ms <= self.start_ms:
            raise ValueError("the expiry must come after the start")
        if (self.control.kind == "upload") != (self.grant is not None):
            raise ValueError("an upload exception, and only an upload exception, grants bytes")
        lowers = self.control.kind in ("marker", "unscannable")
        if lowers != (self.lowered_to in _LOWER_RANK):
            raise ValueError(
                "a marker or unscannable exception says what block is lowered to (alert or log); "
                "no other kind does"
            )

    @property
    def duration_ms(self) -> int:
        return self.expiry_ms - self.start_ms

    def shifted(self, now_ms: int) -> Terms:
        """The same length of time, starting no earlier than ``now_ms``: what an approval given
        after the requested start means when it does not say otherwise."""
        if self.start_ms >= now_ms:
            return self
        return replace(self, start_ms=now_ms, expiry_ms=now_ms + self.duration_ms)


def widening(new: Terms, old: Terms) -> str:
    """Why ``new`` would let more past than ``old`` ("" when it is the same or narrower).

    Narrower means: the same control; the same subject or a network inside it; every target
    constraint kept or tightened; not starting earlier and not lasting longer (an approval
    given late may move the window later); no more bytes; not lowered further."""
    if new.control != old.control:
        return f"the control is {old.control}; an approval cannot change it to {new.control}"
    if not new.subject.within(old.subject):
        return f"the exception is for {old.subject}; {new.subject} is not within it"
    if reason := old.target.widened_by(new.target):
        return reason
    if new.start_ms < old.start_ms:
        return "it would start before the start asked for"
    if new.duration_ms > old.duration_ms:
        return f"it would last {span(new.duration_ms)}; {span(old.duration_ms)} was asked for"
    if old.grant is not None and new.grant is not None:
        for name, what in (("per_request", "per request"), ("per_window", "per window")):
            was, now = getattr(old.grant, name), getattr(new.grant, name)
            if was is None and now is not None:
                return f"no raise of the bytes {what} was asked for"
            if was is not None and (now is None or now > was):
                return f"{format_size(was)} {what} was asked for; it may be made smaller only"
    if old.lowered_to and _LOWER_RANK[new.lowered_to] < _LOWER_RANK[old.lowered_to]:
        return f"{old.lowered_to} was asked for; it may not be lowered further to {new.lowered_to}"
    return ""


@dataclass(frozen=True)
class Actor:
    """Who acts: a proxy user (a requester) or a console account (an approver)."""

    name: str
    roles: frozenset[str] = frozenset()  # console roles, as the caller resolved them
    client_ip: str = ""
    groups: tuple[str, ...] = ()  # the actor's groups as a proxy user, if any


@dataclass(frozen=True)
class Event:
    """One step in an exception's life, appended and never changed."""

    id: str
    exception_id: str
    kind: EventKind
    actor: str
    actor_roles: tuple[str, ...]
    client_ip: str
    ts_ms: int
    reason: str = ""
    terms: Terms | None = None  # requested, granted, approved (the approval's may be narrowed)
    category: str = ""  # requested, granted: the destination category the rules applied to
    request_id: str = ""  # requested: the blocked request the employee came from
    approvals_needed: int = 0  # requested, granted, approved: what the rules asked for then
    decide_by_ms: int = 0  # requested, granted: it expires then if it is still pending

    def __post_init__(self) -> None:
        for name in ("id", "exception_id"):
            if not _ID_RE.match(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not an id")
        if self.kind not in _KIND_ORDER:
            raise ValueError(f"unknown event kind {self.kind!r}")
        if (self.kind in ("requested", "granted", "approved")) != (self.terms is not None):
            raise ValueError("requested, granted and approved events carry terms; others do not")
        if self.kind in ("requested", "granted", "approved") and self.approvals_needed < 1:
            raise ValueError(f"a {self.kind} event says how many approvals are needed")
        if self.kind in ("requested", "granted") and self.decide_by_ms <= self.ts_ms:
            raise ValueError(f"a {self.kind} event says when it expires if nobody decides")


_KIND_ORDER = {k: i for i, k in enumerate(get_args(EventKind))}


@dataclass(frozen=True)
class Refusal:
    """A command that was not carried out, and why (for the caller and the console log)."""

    code: str
    reason: str


# --- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlRule:
    """How one control (or one category / level of it) may be lifted."""

    allowed: bool = False
    max_duration_ms: int = 0
    approvals: int = 1  # distinct approvers needed before it is in force
    approved_by: frozenset[str] = frozenset()  # approver groups; empty: every approver
    max_per_request: int = 0  # upload: the largest grant, bytes
    max_per_window: int = 0
    lowest: Lowered = "alert"  # marker, unscannable: the furthest block may be lowered


@dataclass(frozen=True)
class ApprovalRules:
    """The approvals policy, compiled (``core.approvals``). The default lifts nothing."""

    pending_ms: int = 3 * DAY  # a request nobody answers expires after this
    controls: Mapping[str, ControlRule] = field(default_factory=dict)  # by control kind
    categories: Mapping[tuple[str, str], ControlRule] = field(default_factory=dict)
    levels: Mapping[str, ControlRule] = field(default_factory=dict)  # marker levels
    approver_groups: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def rule_for(self, control: Control, category: str) -> ControlRule:
        if control.kind == "marker":
            rule = self.levels.get(control.level)
        else:
            rule = self.categories.get((control.kind, category))
        return rule or self.controls.get(control.kind) or ControlRule()

    def groups_of(self, approver: str) -> frozenset[str]:
        return frozenset(g for g, members in self.approver_groups.items() if approver in members)


def _what(control: Control, category: str) -> str:
    return f"{control} ({category})" if category and control.kind != "marker" else str(control)


def _may_decide(rules: ApprovalRules, rule: ControlRule, actor: Actor, what: str) -> Refusal | None:
    if APPROVER_ROLE not in actor.roles:
        return Refusal(
            "not_approver",
            f"{actor.name or 'the caller'} does not hold the approver role "
            "(no other role includes it)",
        )
    if rule.approved_by and not rules.groups_of(actor.name) & rule.approved_by:
        return Refusal(
            "not_in_approver_group",
            f"exceptions to {what} are decided by approvers in "
            f"{', '.join(sorted(rule.approved_by))}; {actor.name} is not in one",
        )
    return None


def _terms_refused(rule: ControlRule, terms: Terms, now_ms: int, what: str) -> Refusal | None:
    if not rule.allowed:
        return Refusal(
            "not_allowed", f"{what} may not be lifted by an exception (approvals policy)"
        )
    if terms.duration_ms > rule.max_duration_ms:
        return Refusal(
            "too_long",
            f"an exception to {what} lasts at most {span(rule.max_duration_ms)}; "
            f"{span(terms.duration_ms)} is longer",
        )
    if terms.expiry_ms <= now_ms:
        return Refusal("bad_terms", "the exception would already be over")
    if terms.start_ms > now_ms + MAX_LEAD_MS:
        return Refusal("bad_terms", f"an exception starts within {span(MAX_LEAD_MS)}")
    if terms.grant is not None:
        for value, cap, per in (
            (terms.grant.per_request, rule.max_per_request, "per request"),
            (terms.grant.per_window, rule.max_per_window, "per window"),
        ):
            if value is not None and value > cap:
                return Refusal(
                    "too_large",
                    f"an upload exception grants at most {format_size(cap)} {per}; "
                    f"{format_size(value)} is more",
                )
    if terms.lowered_to and _LOWER_RANK[terms.lowered_to] < _LOWER_RANK[rule.lowest]:
        return Refusal("lowered_too_far", f"{what} may be lowered to {rule.lowest} at most")
    return None


def _reason_refused(reason: str, required: bool) -> Refusal | None:
    if required and not reason.strip():
        return Refusal("no_reason", "give a reason: it is kept with the decision")
    if len(reason) > MAX_REASON:
        return Refusal("bad_terms", f"the reason is longer than {MAX_REASON} characters")
    return None


def _category(terms: Terms, category: str) -> str | Refusal:
    if terms.target.category and category and terms.target.category != category:
        return Refusal(
            "bad_terms",
            f"the target is in the category {terms.target.category}, not {category}",
        )
    return terms.target.category or category


def _create(
    kind: EventKind,
    rules: ApprovalRules,
    *,
    exception_id: str,
    event_id: str,
    actor: Actor,
    now_ms: int,
    terms: Terms,
    reason: str,
    category: str,
    request_id: str = "",
) -> Event | Refusal:
    cat = _category(terms, category)
    if isinstance(cat, Refusal):
        return cat
    what = _what(terms.control, cat)
    rule = rules.rule_for(terms.control, cat)
    refusal = _reason_refused(reason, required=True) or _terms_refused(rule, terms, now_ms, what)
    if refusal:
        return refusal
    return Event(
        event_id,
        exception_id,
        kind,
        actor.name,
        tuple(sorted(actor.roles)),
        actor.client_ip,
        now_ms,
        reason.strip(),
        terms,
        cat,
        request_id,
        rule.approvals,
        now_ms + rules.pending_ms,
    )


def request(
    rules: ApprovalRules,
    *,
    exception_id: str,
    event_id: str,
    actor: Actor,
    now_ms: int,
    terms: Terms,
    reason: str,
    category: str,
    request_id: str = "",
) -> Event | Refusal:
    """An employee asks. ``actor`` is the identity the proxy knows for the connection;
    ``category`` the destination category of the target as the policy knows it (``""`` for
    none): the rules for it apply; ``request_id`` the blocked request the form came from."""
    if not actor.name:
        return Refusal(
            "unknown_requester",
            "the gateway does not know who you are: sign in to the proxy to request an exception",
        )
    return _create(
        "requested",
        rules,
        exception_id=exception_id,
        event_id=event_id,
        actor=actor,
        now_ms=now_ms,
        terms=terms,
        reason=reason,
        category=category,
        request_id=request_id,
    )


def grant(
    rules: ApprovalRules,
    *,
    exception_id: str,
    event_id: str,
    actor: Actor,
    now_ms: int,
    terms: Terms,
    reason: str,
    category: str,
) -> Event | Refusal:
    """An approver grants without a request. It counts as the first approval: a control that
    needs two approvers is in force once a second, different approver approves it."""
    cat = _category(terms, category)
    if isinstance(cat, Refusal):
        return cat
    what = _what(terms.control, cat)
    refusal = _may_decide(rules, rules.rule_for(terms.control, cat), actor, what)
    if refusal:
        return refusal
    if why := terms.subject.includes(actor):
        return Refusal("self_approval", f"nobody grants an exception for themselves: {why}")
    return _create(
        "granted",
        rules,
        exception_id=exception_id,
        event_id=event_id,
        actor=actor,
        now_ms=now_ms,
        terms=terms,
        reason=reason,
        category=category,
    )


def _pending(current: ExceptionState | None, verb: str) -> Refusal | None:
    if current is None:
        return Refusal("unknown_exception", "there is no such exception")
    if current.state != "pending":
        return Refusal(
            "wrong_state", f"the exception is {current.state}; only a pending one can be {verb}"
        )
    return None


def approve(
    rules: ApprovalRules,
    current: ExceptionState | None,
    *,
    event_id: str,
    actor: Actor,
    now_ms: int,
    terms: Terms | None = None,
    reason: str = "",
) -> Event | Refusal:
    """An approver approves a pending exception, as it stands or narrowed (``terms``). Without
    terms, the pending terms apply, their window starting no earlier than now."""
    if refusal := _pending(current, "approved"):
        return refusal
    assert current is not None
    new = terms or current.terms.shifted(now_ms)
    cat = _category(new, current.category)
    if isinstance(cat, Refusal):
        return cat
    what = _what(new.control, cat)
    rule = rules.rule_for(new.control, cat)
    if refusal := _may_decide(rules, rule, actor, what):
        return refusal
    if actor.name == current.requester:
        return Refusal(
            "own_request",
            "nobody approves an exception they requested or granted: another approver decides",
        )
    if actor.name in current.approvers:
        return Refusal(
            "already_approved", f"{actor.name} approved it already; a different approver is needed"
        )
    if why := new.subject.includes(actor):
        return Refusal("self_approval", f"nobody approves an exception for themselves: {why}")
    if why := widening(new, current.terms):
        return Refusal("widening", f"an approval may narrow the exception, not widen it: {why}")
    refusal = _reason_refused(reason, required=False) or _terms_refused(rule, new, now_ms, what)
    if refusal:
        return refusal
    return Event(
        event_id,
        current.id,
        "approved",
        actor.name,
        tuple(sorted(actor.roles)),
        actor.client_ip,
        now_ms,
        reason.strip(),
        new,
        approvals_needed=max(rule.approvals, current.approvals_needed),
    )


def _ending(
    kind: EventKind, current: ExceptionState, actor: Actor, now_ms: int, reason: str, event_id: str
) -> Event:
    return Event(
        event_id,
        current.id,
        kind,
        actor.name,
        tuple(sorted(actor.roles)),
        actor.client_ip,
        now_ms,
        reason.strip(),
    )


def deny(
    rules: ApprovalRules,
    current: ExceptionState | None,
    *,
    event_id: str,
    actor: Actor,
    now_ms: int,
    reason: str,
) -> Event | Refusal:
    """An approver refuses a pending exception (with the reason the requester will read)."""
    if refusal := _pending(current, "denied"):
        return refusal
    assert current is not None
    what = _what(current.terms.control, current.category)
    refusal = _may_decide(
        rules, rules.rule_for(current.terms.control, current.category), actor, what
    ) or _reason_refused(reason, required=True)
    if refusal:
        return refusal
    if actor.name == current.requester:
        return Refusal("own_request", "you asked for it: cancel it instead")
    return _ending("denied", current, actor, now_ms, reason, event_id)


def cancel(
    current: ExceptionState | None, *, event_id: str, actor: Actor, now_ms: int, reason: str = ""
) -> Event | Refusal:
    """The requester withdraws a pending request."""
    if refusal := _pending(current, "cancelled"):
        return refusal
    assert current is not None
    if actor.name != current.requester:
        return Refusal("not_requester", f"only {current.requester}, who asked, can cancel it")
    if refusal := _reason_refused(reason, required=False):
        return refusal
    return _ending("cancelled", current, actor, now_ms, reason, event_id)


def revoke(
    rules: ApprovalRules,
    current: ExceptionState | None,
    *,
    event_id: str,
    actor: Actor,
    now_ms: int,
    reason: str,
) -> Event | Refusal:
    """An approver ends an approved exception early (scheduled or in force)."""
    if current is None:
        return Refusal("unknown_exception", "there is no such exception")
    if current.state not in ("scheduled", "active"):
        hint = ": deny it instead" if current.state == "pending" else ""
        return Refusal("wrong_state", f"the exception is {current.state}{hint}")
    what = _what(current.terms.control, current.category)
    refusal = _may_decide(
        rules, rules.rule_for(current.terms.control, current.category), actor, what
    ) or _reason_refused(reason, required=True)
    if refusal:
        return refusal
    return _ending("revoked", current, actor, now_ms, reason, event_id)


# --- the fold --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExceptionState:
    """One exception as its events make it, at the time it was derived for."""

    id: str
    state: StateName
    terms: Terms  # in force (the last approval's), or as pending
    requested: Terms  # as first asked for or granted
    origin: Literal["request", "grant"]
    requester: str  # who asked (the granter, for a direct grant)
    requested_ms: int
    category: str  # the destination category the rules applied to
    request_id: str  # the blocked request it came from
    reason: str  # the requester's (or granter's)
    approvals_needed: int
    approvers: tuple[str, ...]  # distinct, in order
    decide_by_ms: int  # pending until then at most
    approved_ms: int  # when the last approval needed came (0: never)
    ended_by: str  # who denied, cancelled or revoked it
    ended_ms: int  # when it ended (decision, expiry or pending deadline); 0 while live
    end_reason: str
    events: tuple[Event, ...]  # its history, in the order applied
    ignored: tuple[str, ...]  # events that were not a valid step (races between nodes)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


def _order(e: Event) -> tuple[int, int, int, str]:
    # The creation first whatever its time (two nodes' clocks), then time, then kind.
    return (0 if e.kind in ("requested", "granted") else 1, e.ts_ms, _KIND_ORDER[e.kind], e.id)


def _fold(events: list[Event], now_ms: int) -> ExceptionState | None:
    first = events[0]
    if first.kind not in ("requested", "granted") or first.terms is None:
        return None  # the exception's creation is not known (yet)
    terms = first.terms
    requester = first.actor
    approvers: list[str] = [first.actor] if first.kind == "granted" else []
    needed = first.approvals_needed
    status = "approved" if len(approvers) >= needed else "pending"
    approved_ms = first.ts_ms if status == "approved" else 0
    ended_by = end_reason = ""
    ended_ms = 0
    applied, ignored = [first], []

    for e in events[1:]:
        ok = False
        if status == "pending" and e.ts_ms >= min(first.decide_by_ms, terms.expiry_ms):
            ok = False  # it had expired unanswered before this event
        elif status == "approved" and e.ts_ms >= terms.expiry_ms:
            ok = False  # over already
        elif e.kind == "approved" and status == "pending" and e.terms is not None:
            ok = (
                APPROVER_ROLE in e.actor_roles
                and e.actor != requester
                and e.actor not in approvers
                and not (e.terms.subject.kind == "user" and e.terms.subject.value == e.actor)
                and not widening(e.terms, terms)
            )
            if ok:
                terms = e.terms
                approvers.append(e.actor)
                needed = max(needed, e.approvals_needed)
                if len(approvers) >= needed:
                    status, approved_ms = "approved", e.ts_ms
        elif e.kind == "denied" and status == "pending":
            ok = APPROVER_ROLE in e.actor_roles and e.actor != requester
            status = "denied" if ok else status
        elif e.kind == "cancelled" and status == "pending":
            ok = e.actor == requester
            status = "cancelled" if ok else status
        elif e.kind == "revoked" and status == "approved":
            ok = APPROVER_ROLE in e.actor_roles
            status = "revoked" if ok else status
        if ok:
            applied.append(e)
            if status in ("denied", "cancelled", "revoked"):
                ended_by, ended_ms, end_reason = e.actor, e.ts_ms, e.reason
        else:
            ignored.append(e.id)

    state: StateName
    if status == "pending":
        deadline = min(first.decide_by_ms, terms.expiry_ms)
        state, ended_ms = ("expired", deadline) if now_ms >= deadline else ("pending", 0)
    elif status == "approved":
        if now_ms >= terms.expiry_ms:
            state, ended_ms = "expired", terms.expiry_ms
        else:
            state = "scheduled" if now_ms < terms.start_ms else "active"
    else:
        state = status  # type: ignore[assignment]
    return ExceptionState(
        id=first.exception_id,
        state=state,
        terms=terms,
        requested=first.terms,
        origin="grant" if first.kind == "granted" else "request",
        requester=requester,
        requested_ms=first.ts_ms,
        category=first.category,
        request_id=first.request_id,
        reason=first.reason,
        approvals_needed=needed,
        approvers=tuple(approvers),
        decide_by_ms=first.decide_by_ms,
        approved_ms=approved_ms,
        ended_by=ended_by,
        ended_ms=ended_ms,
        end_reason=end_reason,
        events=tuple(applied),
        ignored=tuple(ignored),
    )


def state_of(events: Iterable[Event], now_ms: int) -> dict[str, ExceptionState]:
    """Every exception the events make, as it stands at ``now_ms``. Pure: the same events give
    the same states on every node, in any order and with repeats (merged by event id)."""
    by_exception: dict[str, dict[str, Event]] = {}
    for e in events:
        by_exception.setdefault(e.exception_id, {}).setdefault(e.id, e)
    out: dict[str, ExceptionState] = {}
    for exception_id, evs in by_exception.items():
        state = _fold(sorted(evs.values(), key=_order), now_ms)
        if state is not None:
            out[exception_id] = state
    return out


# --- the active set --------------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveException:
    """What the decision path needs of an approved exception."""

    id: str
    subject: Subject
    control: Control
    target: Target
    start_ms: int
    expiry_ms: int
    grant: UploadGrant | None = None
    lowered_to: str = ""
    approvers: tuple[str, ...] = ()

    @classmethod
    def of(cls, state: ExceptionState) -> ActiveException:
        t = state.terms
        return cls(
            state.id,
            t.subject,
            t.control,
            t.target,
            t.start_ms,
            t.expiry_ms,
            t.grant,
            t.lowered_to,
            state.approvers,
        )

    def _effect(self) -> tuple[int, int, int]:
        """Higher is more generous: the one to use when several match."""
        if self.grant is not None:
            return (self.grant.per_request or 0, self.grant.per_window or 0, 0)
        return (0, 0, -_LOWER_RANK.get(self.lowered_to, 0))


@lru_cache(maxsize=65536)  # the same few thousand client addresses all day
def _ip_key(text: str) -> tuple[int, int] | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version, int(ip)


class _Targets:
    """One subject's exceptions to one control, by the target constraint that indexes them
    best: the host (probed per label of the request's host), else the rule, else the category."""

    __slots__ = ("categories", "hosts", "rules")

    def __init__(self) -> None:
        self.hosts: dict[str, list[ActiveException]] = {}
        self.rules: dict[str, list[ActiveException]] = {}
        self.categories: dict[str, list[ActiveException]] = {}

    def add(self, e: ActiveException) -> None:
        t = e.target
        if t.host:
            self.hosts.setdefault(t.host, []).append(e)
        elif t.rule_id:
            self.rules.setdefault(t.rule_id, []).append(e)
        else:
            self.categories.setdefault(t.category, []).append(e)


_Bucket = dict[str, _Targets]  # control key → targets


class ActiveExceptions:
    """The approved exceptions (in force or scheduled), indexed by subject.

    ``find`` probes the user, each of the user's groups, and for client networks one dict per
    prefix length present (at most 33 for IPv4, 129 for IPv6): its cost does not depend on how
    many exceptions there are. Start and expiry are checked against the ``now_ms`` given, so
    expiry bites at the exact millisecond without a rebuild. Immutable once built: the runtime
    swaps in a new one when the events change.
    """

    def __init__(self, entries: Iterable[ActiveException] = ()):
        self._entries = tuple(entries)
        self._users: dict[str, _Bucket] = {}
        self._groups: dict[str, _Bucket] = {}
        nets: dict[tuple[int, int], dict[int, _Bucket]] = {}  # (version, shift) → prefix → bucket
        for e in self._entries:
            s = e.subject
            if s.kind == "user":
                bucket = self._users.setdefault(s.value, {})
            elif s.kind == "group":
                bucket = self._groups.setdefault(s.value, {})
            else:
                net = s.network
                assert net is not None
                shift = net.max_prefixlen - net.prefixlen
                table = nets.setdefault((net.version, shift), {})
                bucket = table.setdefault(int(net.network_address) >> shift, {})
            bucket.setdefault(e.control.key, _Targets()).add(e)
        order = sorted(nets)  # by version, then shift: the longest prefix first
        self._v4 = tuple((shift, nets[(v, shift)]) for v, shift in order if v == 4)
        self._v6 = tuple((shift, nets[(v, shift)]) for v, shift in order if v == 6)

    @classmethod
    def from_states(cls, states: Iterable[ExceptionState]) -> ActiveExceptions:
        return cls(ActiveException.of(s) for s in states if s.state in ("scheduled", "active"))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ActiveException]:
        return iter(self._entries)

    def count_in_force(self, now_ms: int) -> int:
        return sum(1 for e in self._entries if e.start_ms <= now_ms < e.expiry_ms)

    def next_change_ms(self, now_ms: int) -> int | None:
        """The next start or expiry after ``now_ms`` (for the gauge and the next rebuild)."""
        times = [t for e in self._entries for t in (e.start_ms, e.expiry_ms) if t > now_ms]
        return min(times, default=None)

    def find(
        self,
        user: str,
        groups: tuple[str, ...],
        client_ip: str,
        control: Control,
        host: str,
        path: str | None,
        category: str,
        rule_id: str,
        now_ms: int,
    ) -> ActiveException | None:
        """The exception that lets this request past ``control``, or None. ``path`` None is a
        CONNECT (path-limited exceptions do not answer then). Several matching: the most
        generous (largest grant, lowest action), then the latest expiry, then the id."""
        key = control.key
        found: list[_Targets] = []
        if user and (bucket := self._users.get(user)) and (t := bucket.get(key)):
            found.append(t)
        for g in groups:
            if (bucket := self._groups.get(g)) and (t := bucket.get(key)):
                found.append(t)
        if (self._v4 or self._v6) and client_ip and (ip := _ip_key(client_ip)):
            for shift, table in self._v4 if ip[0] == 4 else self._v6:
                if (bucket := table.get(ip[1] >> shift)) and (t := bucket.get(key)):
                    found.append(t)
        if not found:
            return None
        host = normalize_host(host) if host else ""
        suffixes: list[str] | None = None  # the host and its parent domains, once per call
        candidates: list[ActiveException] = []
        for targets in found:
            if targets.hosts and host:
                if suffixes is None:
                    suffixes = [host]
                    if not is_ip_literal(host):
                        dot = host.find(".")
                        while dot != -1:
                            suffixes.append(host[dot + 1 :])
                            dot = host.find(".", dot + 1)
                for suffix in suffixes:
                    if hit := targets.hosts.get(suffix):
                        candidates += hit
            if targets.rules and rule_id and (hit := targets.rules.get(rule_id)):
                candidates += hit
            if targets.categories and category and (hit := targets.categories.get(category)):
                candidates += hit
        norm_path: str | None = None
        best: ActiveException | None = None
        for e in candidates:
            if not e.start_ms <= now_ms < e.expiry_ms:
                continue
            t = e.target
            if (t.exact and t.host != host) or (t.category and t.category != category):
                continue
            if t.rule_id and t.rule_id != rule_id:
                continue
            if t.path:
                if path is None:
                    continue
                if norm_path is None:
                    norm_path = normalize_path(path)
                if not norm_path.startswith(t.path):
                    continue
            if best is None or (e._effect(), e.expiry_ms, e.id) > (
                best._effect(),
                best.expiry_ms,
                best.id,
            ):
                best = e
        return best


def raised_limits(limits: Limits, found: ActiveException) -> Limits:
    """The upload caps with an upload exception in force: each limit it grants becomes exactly
    the granted size (and is logged as the exception's), unless the policy's limit is already
    larger or unlimited. A limit it does not grant stays as it is."""
    g = found.grant
    if g is None:
        return limits
    cap_id = f"exception.{found.id}"
    per_request, per_request_id = limits.per_request, limits.per_request_id
    per_user, per_user_id = limits.per_user, limits.per_user_id
    if g.per_request is not None and per_request is not None and g.per_request > per_request:
        per_request, per_request_id = g.per_request, cap_id
    if g.per_window is not None and per_user is not None and g.per_window > per_user:
        per_user, per_user_id = g.per_window, cap_id
    return Limits(per_request, per_user, limits.window_seconds, per_request_id, per_user_id)


# --- JSON (the store's terms column, the snapshot) --------------------------------------------


def terms_to_json(t: Terms) -> dict[str, Any]:
    return {
        "subject": str(t.subject),
        "control": str(t.control),
        "target": {
            "host": t.target.host,
            "exact": t.target.exact,
            "path": t.target.path,
            "category": t.target.category,
            "rule_id": t.target.rule_id,
        },
        "start_ms": t.start_ms,
        "expiry_ms": t.expiry_ms,
        "grant": None
        if t.grant is None
        else {"per_request": t.grant.per_request, "per_window": t.grant.per_window},
        "lowered_to": t.lowered_to,
    }


def terms_from_json(d: Mapping[str, Any]) -> Terms:
    """Terms from their JSON form; ValueError when anything is missing or wrong."""
    try:
        target = d["target"]
        grant_d = d["grant"]
        return Terms(
            Subject.parse(d["subject"]),
            Control.parse(d["control"]),
            Target(
                str(target["host"]),
                bool(target["exact"]),
                str(target["path"]),
                str(target["category"]),
                str(target["rule_id"]),
            ),
            d["start_ms"],
            d["expiry_ms"],
            None if grant_d is None else UploadGrant(grant_d["per_request"], grant_d["per_window"]),
            d["lowered_to"],
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed terms: {e!r}") from None


_EVENT_FIELDS = (
    "id",
    "exception_id",
    "kind",
    "actor",
    "client_ip",
    "ts_ms",
    "reason",
    "category",
    "request_id",
    "approvals_needed",
    "decide_by_ms",
)


def event_to_json(e: Event) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(e, name) for name in _EVENT_FIELDS}
    out["actor_roles"] = list(e.actor_roles)
    out["terms"] = None if e.terms is None else terms_to_json(e.terms)
    return out


def event_from_json(d: Mapping[str, Any]) -> Event:
    """An event from its JSON form; ValueError when anything is missing or wrong."""
    try:
        terms = None if d["terms"] is None else terms_from_json(d["terms"])
        return Event(
            id=str(d["id"]),
            exception_id=str(d["exception_id"]),
            kind=d["kind"],
            actor=str(d["actor"]),
            actor_roles=tuple(str(r) for r in d["actor_roles"]),
            client_ip=str(d["client_ip"]),
            ts_ms=int(d["ts_ms"]),
            reason=str(d["reason"]),
            terms=terms,
            category=str(d["category"]),
            request_id=str(d["request_id"]),
            approvals_needed=int(d["approvals_needed"]),
            decide_by_ms=int(d["decide_by_ms"]),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed event: {e!r}") from None
