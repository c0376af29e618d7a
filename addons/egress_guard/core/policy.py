"""Policy: loads and validates the YAML files of a policy directory into one compiled Policy.

Validation is pydantic; errors are mapped back to the YAML node they came from so the admin
reads ``file:line: field: problem``. A directory loads all or nothing: the caller keeps the
last good Policy when a new one fails (see ``PolicyWatcher``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationError,
    model_validator,
)

from egress_guard.notify import (
    Credentials,
    NotificationsSpec,
    NotifyConfigError,
    load_credentials,
)

from .approvals import ApprovalsSpec, compile_approvals
from .blocklist import HostIndex, Reason, Rule, Tier
from .destinations import AllowedNetwork, DestinationRules, IPNetwork, never_opened_kind
from .exceptions import ApprovalRules
from .hosts import validate_host_pattern
from .scan import (
    Context,
    Marker,
    MarkerOverride,
    MarkerPolicy,
    MarkerSet,
    ScanLimits,
    spellings,
)
from .selector import Selector
from .units import parse_duration, parse_size
from .upload import UploadOverride, UploadRules

RETENTION_MIN_MONTHS = 6


def default_policy_dir() -> Path:
    """The packaged policy: inside the wheel, or ./policies of a source checkout."""
    package = Path(__file__).resolve().parent.parent  # egress_guard/
    packaged = package / "default_policies"
    if packaged.is_dir():
        return packaged
    return package.parent.parent / "policies"


# --- the file schema -------------------------------------------------------------------------


def _path_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"path prefix {value!r} must start with '/'")
    if "?" in value or "#" in value:
        raise ValueError(f"path prefix {value!r} must not contain a query or fragment")
    return value


HostPattern = Annotated[str, AfterValidator(validate_host_pattern)]
PathPrefix = Annotated[str, AfterValidator(_path_prefix)]
RuleId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=120)]
CategoryName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
NonEmpty = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReasonSpec(_Strict):
    en: NonEmpty
    zh: NonEmpty


class RuleSpec(_Strict):
    id: RuleId
    service: str = ""
    hosts: list[HostPattern] = []
    exact_hosts: list[HostPattern] = []
    paths: list[PathPrefix] = []
    action: Literal["block", "allow"] | None = None
    reason: ReasonSpec | None = None

    @model_validator(mode="after")
    def _needs_a_host(self) -> RuleSpec:
        if not self.hosts and not self.exact_hosts:
            raise ValueError("a rule needs at least one entry in 'hosts' or 'exact_hosts'")
        return self


class CategorySpec(_Strict):
    action: Literal["block", "allow"] | None = None
    reason: ReasonSpec | None = None
    rules: list[RuleSpec] = []


class IdentitySpec(_Strict):
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    user: NonEmpty
    groups: list[NonEmpty] = []


class SettingsSpec(_Strict):
    retention_months: int = Field(
        RETENTION_MIN_MONTHS,
        description="months the request log is kept; the egress rules require at least 6",
    )
    passthrough_hosts: list[HostPattern] = []
    raw_tcp_hosts: list[HostPattern] = []
    identities: list[IdentitySpec] = []
    user_groups: dict[NonEmpty, list[NonEmpty]] = {}

    @model_validator(mode="after")
    def _retention_floor(self) -> SettingsSpec:
        if self.retention_months < RETENTION_MIN_MONTHS:
            raise ValueError(
                f"retention_months={self.retention_months} is below the required minimum of "
                f"{RETENTION_MIN_MONTHS} months (proxy access logs must be kept at least 6 months)"
            )
        return self


def _size_or_unlimited(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a size (examples: 10MiB, 1GB, unlimited)")
    return parse_size(value)


def _duration_seconds(value: Any) -> float:
    seconds = parse_duration(str(value)).total_seconds()
    if seconds <= 0:
        raise ValueError("a window must be longer than zero")
    return seconds


Limit = Annotated[int | None, BeforeValidator(_size_or_unlimited)]
Size = Annotated[int, BeforeValidator(parse_size)]
Window = Annotated[float, BeforeValidator(_duration_seconds)]


class SelectorSpec(_Strict):
    """Whom and where an override applies to; all given must match."""

    id: RuleId
    hosts: list[HostPattern] = []
    exact_hosts: list[HostPattern] = []
    categories: list[CategoryName] = []
    users: list[NonEmpty] = []
    groups: list[NonEmpty] = []

    @model_validator(mode="after")
    def _needs_a_selector(self) -> SelectorSpec:
        if not (self.hosts or self.exact_hosts or self.categories or self.users or self.groups):
            raise ValueError("an override needs hosts, exact_hosts, categories, users or groups")
        return self

    def compile(self) -> Selector:
        hosts = None
        if self.hosts or self.exact_hosts:
            rule = Rule(
                self.id,
                "override",
                "allow",
                Reason("", ""),
                hosts=tuple(self.hosts),
                exact_hosts=tuple(self.exact_hosts),
            )
            hosts = HostIndex.build([rule])
        return Selector(
            hosts, frozenset(self.categories), frozenset(self.users), frozenset(self.groups)
        )


class UploadOverrideSpec(SelectorSpec):
    per_request: Limit = None
    per_user: Limit = None

    @model_validator(mode="after")
    def _needs_a_limit(self) -> UploadOverrideSpec:
        if not {"per_request", "per_user"} & self.model_fields_set:
            raise ValueError("an override must set per_request and/or per_user")
        return self


class UploadSpec(_Strict):
    per_request: Limit = 10 * 1024 * 1024
    per_user: Limit = 200 * 1024 * 1024
    window: Window = 24 * 3600.0
    hold_in_memory: Size = 1024 * 1024
    overrides: list[UploadOverrideSpec] = []

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stream_above" in data:
            raise ValueError(
                "stream_above was renamed hold_in_memory: bodies are no longer streamed past "
                "the scanner, they are held until their verdict (in memory up to this size, "
                "then in a private temporary file)"
            )
        return data


ScanAction = Literal["log", "alert", "block"]
LevelId = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class MarkerSpec(_Strict):
    id: RuleId
    patterns: list[NonEmpty] = Field(min_length=1)
    context: Context = "any"
    note: str = ""


class LevelSpec(_Strict):
    id: LevelId
    action: ScanAction
    markers: list[MarkerSpec] = Field(min_length=1)
    note: str = ""


class MarkerOverrideSpec(SelectorSpec):
    actions: dict[LevelId, ScanAction] = {}
    unscannable: ScanAction | None = None

    @model_validator(mode="after")
    def _needs_an_action(self) -> MarkerOverrideSpec:
        if not self.actions and self.unscannable is None:
            raise ValueError("an override must set actions and/or unscannable")
        return self


class MarkersSpec(_Strict):
    unscannable: ScanAction = "block"
    max_body: Size = 32 * 1024 * 1024
    max_expanded: Size = 64 * 1024 * 1024
    max_depth: int = Field(5, ge=1, le=20)
    max_seconds: float = Field(10.0, gt=0)
    levels: list[LevelSpec] = []
    suppress: list[NonEmpty] = []
    overrides: list[MarkerOverrideSpec] = []

    @model_validator(mode="after")
    def _consistent(self) -> MarkersSpec:
        levels = [lv.id for lv in self.levels]
        if len(set(levels)) != len(levels):
            raise ValueError("level ids must be unique")
        ids = [m.id for lv in self.levels for m in lv.markers]
        if dup := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"duplicate marker ids: {', '.join(dup)}")
        for o in self.overrides:
            if unknown := sorted(set(o.actions) - set(levels)):
                raise ValueError(f"override {o.id} names unknown levels: {', '.join(unknown)}")
        for lv in self.levels:
            for m in lv.markers:
                for p in m.patterns:
                    spellings(p)  # raises on a pattern with too many spellings
        return self


def _network(value: Any) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a network (examples: 10.20.0.0/16, fd00:1::/64)")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as e:
        raise ValueError(f"{value!r} is not a network: {e}") from None


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{value!r} is not a port (a whole number from 1 to 65535)")
    return value


def _network_entry(value: Any) -> Any:
    return value if isinstance(value, dict) else {"network": value}  # "10.20.0.0/16" alone


_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


class AllowedNetworkSpec(_Strict):
    network: Annotated[IPNetwork, PlainValidator(_network)]
    ports: list[Annotated[int, PlainValidator(_port)]] | None = None  # None: every port

    @model_validator(mode="after")
    def _reachable(self) -> AllowedNetworkSpec:
        if self.ports is not None and not self.ports:
            raise ValueError("'ports' is empty: list the ports, or leave it out for every port")
        if kind := never_opened_kind(self.network):
            raise ValueError(
                f"{self.network} covers {kind} addresses, which the proxy never forwards to "
                "(the gateway host itself is not a destination)"
            )
        if self.network.version == 6 and self.network.subnet_of(_IPV4_MAPPED):  # type: ignore[arg-type]
            raise ValueError(f"{self.network}: write an IPv4-mapped network as IPv4")
        return self


class DestinationsSpec(_Strict):
    allow_internal: list[Annotated[AllowedNetworkSpec, BeforeValidator(_network_entry)]] = []


class ExclusionSpec(_Strict):
    """A UT1 entry that is not loaded: a false positive for an office (a CDN, a vendor, the
    parent domain of a company with many services). Named exactly as in the UT1 list."""

    host: HostPattern
    reason: NonEmpty
    # Hosts of the same owner that curated rules keep blocking once the entry is gone (the
    # mail or drive part of a multi-service domain): documentation the unit tests check.
    still_blocked: list[HostPattern] = []


def _unique_hosts(exclusions: list[ExclusionSpec]) -> list[ExclusionSpec]:
    hosts = [e.host for e in exclusions]
    if dup := sorted({h for h in hosts if hosts.count(h) > 1}):
        raise ValueError(f"hosts listed twice: {', '.join(dup)}")
    return exclusions


UT1_ID_PREFIX = "ut1."


class PolicyFileSpec(_Strict):
    # The tier of every rule in the file: "ut1" for a list made by `egress-guard policy
    # import-ut1`, which only decides hosts no curated rule covers (see core.blocklist).
    tier: Tier = "curated"
    categories: dict[CategoryName, CategorySpec] = {}
    settings: SettingsSpec | None = None
    uploads: UploadSpec | None = None
    markers: MarkersSpec | None = None
    destinations: DestinationsSpec | None = None
    approvals: ApprovalsSpec | None = None
    notifications: NotificationsSpec | None = None
    ut1_exclusions: Annotated[list[ExclusionSpec], AfterValidator(_unique_hosts)] | None = None


# --- errors with file and line ---------------------------------------------------------------


class PolicyError(Exception):
    """A policy that cannot be used. ``problems`` are 'file:line: field: message' lines."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _node_at(root: yaml.Node | None, loc: Sequence[str | int]) -> yaml.Node | None:
    """Follow a pydantic error location through the YAML node tree; the deepest node reached."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for key, value in node.value:
                if key.value == str(part):
                    # The last step of an 'extra key' error points at the key itself.
                    nxt = key if part == loc[-1] and isinstance(value, yaml.ScalarNode) else value
                    break
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
        # other parts are pydantic's own (union tags, validator names): skip them
    return node


def _field_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "union[")) or part in ("IPv4Network", "IPv6Network"):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _validation_problems(path: Path, root: yaml.Node | None, err: ValidationError) -> list[str]:
    problems = []
    seen = set()
    for item in err.errors():
        loc = item["loc"]
        node = _node_at(root, loc)
        line = node.start_mark.line + 1 if node is not None else 1
        msg = item["msg"].removeprefix("Value error, ")
        text = f"{path}:{line}: {_field_path(loc)}: {msg}"
        if text not in seen:
            seen.add(text)
            problems.append(text)
    return problems


# --- the compiled policy ---------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    user: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class CategoryStats:
    rules: int
    hosts: int
    ut1_rules: int = 0  # of ``rules``, those of the lower UT1 tier


@dataclass(frozen=True)
class Policy:
    source: str
    rules: tuple[Rule, ...]
    index: HostIndex
    passthrough: HostIndex
    identities: tuple[Identity, ...]  # most specific network first
    user_groups: dict[str, tuple[str, ...]]
    retention_months: int
    uploads: UploadRules = field(default_factory=UploadRules)
    markers: MarkerPolicy = field(default_factory=MarkerPolicy)
    destinations: DestinationRules = field(default_factory=DestinationRules)
    raw_tcp: HostIndex = field(default_factory=HostIndex)  # where non-HTTP tunnels may go
    stats: dict[str, CategoryStats] = field(default_factory=dict)
    ut1_excluded: tuple[str, ...] = ()  # UT1 entries not loaded (``ut1_exclusions``)
    approvals: ApprovalRules = field(default_factory=ApprovalRules)  # none: nothing lifts
    # Who hears of exception requests and decisions (none: nobody), with the secrets its
    # files hold, read once when the policy loads.
    notifications: NotificationsSpec | None = None
    notify_credentials: Credentials | None = None

    def summary(self) -> str:
        parts = [
            f"{name}: {s.rules} rules, {s.hosts} hosts"
            + (f" ({s.ut1_rules} rules from UT1)" if s.ut1_rules else "")
            for name, s in self.stats.items()
        ]
        if self.ut1_excluded:
            parts.append(f"{len(self.ut1_excluded)} UT1 entries excluded")
        return "; ".join(parts) if parts else "no categories"


DEFAULT_REASON = ReasonSpec(
    en="This site is not allowed by the company's egress policy.",
    zh="根据公司信息外发管理规定，该网站不允许访问。",
)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _parse_file(path: Path) -> tuple[PolicyFileSpec, yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError([f"{path}:1: (file): not UTF-8 text ({e.reason})"]) from None
    try:
        # One pass of libyaml when present: an imported list has thousands of rules, and the
        # pure-Python parser (run twice, for the nodes and for the data) took most of a second.
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        raise PolicyError([f"{path}:{line}: (syntax): {e.problem}"]) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1
        raise PolicyError(
            [f"{path}:{line}: (syntax): character {e.character:#06x} is not allowed in YAML"]
        ) from None
    except yaml.YAMLError as e:
        raise PolicyError([f"{path}:1: (syntax): {e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(
            [
                f"{path}:1: (top level): expected a mapping with 'categories' "
                f"and/or 'settings', got {type(data).__name__}"
            ]
        )
    try:
        return PolicyFileSpec.model_validate(data), root
    except ValidationError as e:
        raise PolicyError(_validation_problems(path, root, e)) from None


def _line_of(root: yaml.Node | None, loc: Sequence[str | int]) -> int:
    node = _node_at(root, loc)
    return node.start_mark.line + 1 if node is not None else 1


def load_policy(directory: str | os.PathLike[str]) -> Policy:
    """Load every *.yaml of a directory into one Policy, or raise PolicyError listing all."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError([f"{directory}: not a directory"])
    files = _yaml_files(directory)
    if not files:
        raise PolicyError([f"{directory}: no *.yaml policy files"])

    problems: list[str] = []
    parsed: list[tuple[Path, PolicyFileSpec, yaml.Node | None]] = []
    for path in files:
        try:
            spec, root = _parse_file(path)
        except PolicyError as e:
            problems.extend(e.problems)
            continue
        parsed.append((path, spec, root))

    cat_action: dict[str, tuple[Any, str]] = {}
    cat_reason: dict[str, tuple[Any, str]] = {}
    rule_at: dict[str, str] = {}
    pending: list[tuple[str, RuleSpec, str, Tier]] = []  # (category, rule, "file:line", tier)

    single: dict[str, tuple[Any, str]] = {}  # sections one file only may hold
    destinations = DestinationRules()
    for path, spec, root in parsed:
        if spec.destinations is not None and "destinations" not in single:  # a second: below
            destinations = _compile_destinations(spec.destinations, path, root)
        for section in (
            "settings",
            "uploads",
            "markers",
            "destinations",
            "ut1_exclusions",
            "approvals",
            "notifications",
        ):
            value = getattr(spec, section)
            if value is None:
                continue
            here = f"{path}:{_line_of(root, [section])}"
            if spec.tier != "curated":
                # A generated list is replaced wholesale on the next import: settings kept in
                # it would be lost, so it holds rules only.
                problems.append(f"{here}: {section}: not allowed in a file of tier {spec.tier}")
            elif section in single:
                problems.append(f"{here}: {section}: already given in {single[section][1]}")
            else:
                single[section] = (value, here)
        for name, cat in spec.categories.items():
            cat_line = f"{path}:{_line_of(root, ['categories', name])}"
            for what, value, seen in (
                ("action", cat.action, cat_action),
                ("reason", cat.reason, cat_reason),
            ):
                if value is None:
                    continue
                first, first_at = seen.setdefault(name, (value, cat_line))
                if first != value:
                    problems.append(
                        f"{cat_line}: categories.{name}.{what}: {value!r} conflicts "
                        f"with {first!r} given in {first_at}"
                    )
            for i, rule in enumerate(cat.rules):
                where = f"{path}:{_line_of(root, ['categories', name, 'rules', i, 'id'])}"
                if rule.id in rule_at:
                    problems.append(
                        f"{where}: categories.{name}.rules[{i}].id: duplicate rule id "
                        f"'{rule.id}' (first defined in {rule_at[rule.id]})"
                    )
                    continue
                rule_at[rule.id] = where
                # The id is what a row and the block page show: it must tell the tier.
                if (spec.tier == "ut1") != rule.id.startswith(UT1_ID_PREFIX):
                    must = "must" if spec.tier == "ut1" else "must not"
                    # A list imported before tiers existed lands here: say how to move on.
                    hint = "" if spec.tier == "ut1" else " (an imported list: add 'tier: ut1')"
                    problems.append(
                        f"{where}: categories.{name}.rules[{i}].id: '{rule.id}' {must} start "
                        f"with '{UT1_ID_PREFIX}' in a file of tier {spec.tier}{hint}"
                    )
                    continue
                pending.append((name, rule, where, spec.tier))

    if problems:
        raise PolicyError(problems)

    settings: SettingsSpec = single.get("settings", (SettingsSpec(), ""))[0]
    uploads: UploadSpec = single.get("uploads", (UploadSpec(), ""))[0]
    markers: MarkersSpec = single.get("markers", (MarkersSpec(), ""))[0]
    approvals: ApprovalsSpec | None = single.get("approvals", (None, ""))[0]
    if approvals is not None:  # a misspelt category or level must not go unnoticed
        at, at_root = next((p, r) for p, s, r in parsed if s.approvals is not None)
        categories = {name for name, *_ in pending} | set(cat_action) | set(cat_reason)
        unknown = approvals.unknown_names(categories, {lv.id for lv in markers.levels})
        if unknown:
            raise PolicyError(
                [
                    f"{at}:{_line_of(at_root, loc)}: {'.'.join(map(str, loc))}: {msg}"
                    for loc, msg in unknown
                ]
            )
    notifications: NotificationsSpec | None = single.get("notifications", (None, ""))[0]
    credentials = None
    if notifications is not None and notifications.enabled:
        try:  # a missing or empty secret file is an error now, not at the first message
            credentials = load_credentials(notifications, Path(directory))
        except NotifyConfigError as e:
            # The message starts with the field (smtp.password_file …): point at its line.
            at, at_root = next((p, r) for p, s, r in parsed if s.notifications is not None)
            loc = ["notifications", *str(e).split(" ", 1)[0].split(".")]
            raise PolicyError([f"{at}:{_line_of(at_root, loc)}: notifications: {e}"]) from None
    exclusions: list[ExclusionSpec] = single.get("ut1_exclusions", ([], ""))[0]
    excluded_hosts = {e.host for e in exclusions}
    excluded: list[str] = []
    rules: list[Rule] = []
    stats: dict[str, list[int]] = {}
    for name, spec_rule, where, tier in pending:
        reason = spec_rule.reason or cat_reason.get(name, (DEFAULT_REASON, ""))[0]
        action = spec_rule.action or cat_action.get(name, ("block", ""))[0]
        if tier == "ut1" and excluded_hosts.intersection(spec_rule.hosts + spec_rule.exact_hosts):
            # Applied when loading, not when importing, so a fresh import cannot bring a false
            # positive back. An imported rule names one entry, so the whole rule goes.
            excluded.append(spec_rule.id)
            continue
        rules.append(
            Rule(
                id=spec_rule.id,
                category=name,
                action=action,  # type: ignore[arg-type]
                reason=Reason(en=reason.en, zh=reason.zh),
                service=spec_rule.service,
                hosts=tuple(spec_rule.hosts),
                exact_hosts=tuple(spec_rule.exact_hosts),
                paths=tuple(spec_rule.paths),
                source=where,
                tier=tier,
            )
        )
        counts = stats.setdefault(name, [0, 0, 0])
        counts[0] += 1
        counts[1] += len(spec_rule.hosts) + len(spec_rule.exact_hosts)
        counts[2] += tier == "ut1"
    for name in set(cat_action) | set(cat_reason):
        stats.setdefault(name, [0, 0, 0])

    def host_list(kind: str, hosts: list[str]) -> HostIndex:
        allowed = Reason(en="", zh="")
        return HostIndex.build(
            [
                Rule(id=f"{kind}.{h}", category=kind, action="allow", reason=allowed, hosts=(h,))
                for h in hosts
            ]
        )

    identities = sorted(
        (Identity(i.cidr, i.user, tuple(i.groups)) for i in settings.identities),
        key=lambda ident: ident.network.prefixlen,
        reverse=True,
    )
    return Policy(
        source=str(directory),
        uploads=_compile_uploads(uploads),
        markers=_compile_markers(markers),
        destinations=destinations,
        rules=tuple(rules),
        index=HostIndex.build(rules),
        passthrough=host_list("passthrough", settings.passthrough_hosts),
        raw_tcp=host_list("raw_tcp", settings.raw_tcp_hosts),
        identities=tuple(identities),
        user_groups={u: tuple(g) for u, g in settings.user_groups.items()},
        retention_months=settings.retention_months,
        stats={name: CategoryStats(*counts) for name, counts in sorted(stats.items())},
        ut1_excluded=tuple(excluded),
        approvals=compile_approvals(approvals) if approvals is not None else ApprovalRules(),
        notifications=notifications,
        notify_credentials=credentials,
    )


def _compile_uploads(spec: UploadSpec) -> UploadRules:
    overrides = tuple(
        UploadOverride(
            id=o.id,
            selector=o.compile(),
            per_request=o.per_request,
            per_user=o.per_user,
            sets_per_request="per_request" in o.model_fields_set,
            sets_per_user="per_user" in o.model_fields_set,
        )
        for o in spec.overrides
    )
    return UploadRules(spec.per_request, spec.per_user, spec.window, spec.hold_in_memory, overrides)


def _compile_markers(spec: MarkersSpec) -> MarkerPolicy:
    markers = tuple(
        Marker(m.id, lv.id, lv.action, tuple(m.patterns), m.context)
        for lv in spec.levels
        for m in lv.markers
    )
    overrides = tuple(
        MarkerOverride(o.id, o.compile(), tuple(o.actions.items()), o.unscannable)
        for o in spec.overrides
    )
    limits = ScanLimits(spec.max_body, spec.max_expanded, spec.max_depth, spec.max_seconds)
    return MarkerPolicy(
        MarkerSet(markers, tuple(spec.suppress)), spec.unscannable, limits, overrides
    )


def _compile_destinations(
    spec: DestinationsSpec, path: Path, root: yaml.Node | None
) -> DestinationRules:
    return DestinationRules(
        tuple(
            AllowedNetwork(
                e.network,
                frozenset(e.ports or ()),
                f"{path}:{_line_of(root, ['destinations', 'allow_internal', i])}",
            )
            for i, e in enumerate(spec.allow_internal)
        )
    )


def policy_snapshot(directory: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """What the watcher compares to notice a change: (name, mtime_ns, size) of each policy file."""
    out = []
    try:
        for entry in os.scandir(directory):
            if entry.name.endswith((".yaml", ".yml")):
                st = entry.stat()
                out.append((entry.name, st.st_mtime_ns, st.st_size))
    except OSError:
        return ()
    return tuple(sorted(out))


class PolicyWatcher:
    """Holds the current Policy; ``check()`` reloads when files changed, keeping the last good
    policy when the new one is invalid. The proxy calls ``check()`` on a timer; tests call it
    directly."""

    def __init__(self, directory: str | os.PathLike[str], policy: Policy):
        self.directory = Path(directory)
        self.policy = policy
        self.last_error: PolicyError | None = None
        self._snapshot = policy_snapshot(self.directory)

    def check(self) -> Literal["unchanged", "reloaded", "invalid"]:
        snapshot = policy_snapshot(self.directory)
        if snapshot == self._snapshot:
            return "unchanged"
        self._snapshot = snapshot
        try:
            self.policy = load_policy(self.directory)
        except PolicyError as e:
            self.last_error = e
            return "invalid"
        self.last_error = None
        return "reloaded"


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=100)
