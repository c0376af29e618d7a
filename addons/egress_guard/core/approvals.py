"""Approvals policy: the ``approvals:`` section — which controls an exception may lift, for how
long at most, how many different approvers each needs and which approver groups decide — as a
pydantic schema (so the policy loader reports ``file:line: field``) compiled into the
``ApprovalRules`` of ``core.exceptions``.

Kept apart from ``core.policy`` so that the loader imports it and never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .exceptions import DAY, ApprovalRules, ControlRule, span
from .units import parse_duration, parse_size

MAX_DURATION_CEILING_MS = 90 * DAY  # well inside the six months the event log is kept
MAX_PENDING_MS = 30 * DAY
GiB = 1024**3


def _ms(value: Any, ceiling: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a duration (examples: 12h, 7d, 2w)")
    ms = int(parse_duration(str(value)).total_seconds() * 1000)
    if ms <= 0:
        raise ValueError(f"{what} must be longer than zero")
    if ms > ceiling:
        raise ValueError(f"{what} is at most {span(ceiling)}")
    return ms


def _max_duration(value: Any) -> int:
    return _ms(value, MAX_DURATION_CEILING_MS, "an exception's duration")


def _pending(value: Any) -> int:
    return _ms(value, MAX_PENDING_MS, "a request's time to be answered")


def _grant_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a size (examples: 500MiB, 2GiB)")
    size = parse_size(value)  # "unlimited" is not a size: a grant always has one
    if size <= 0:
        raise ValueError("a grant is larger than zero")
    return size


MaxDuration = Annotated[int, BeforeValidator(_max_duration)]
PendingTime = Annotated[int, BeforeValidator(_pending)]
GrantSize = Annotated[int, BeforeValidator(_grant_size)]
Approvals = Annotated[int, Field(ge=1, le=3)]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
GroupName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]*$", max_length=64)]
Account = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]
LowestAction = Literal["alert", "log"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OverrideSpec(_Strict):
    """One category's (or marker level's) own settings; each one left out is the control's."""

    allowed: bool | None = None
    max_duration: MaxDuration | None = None
    approvals: Approvals | None = None
    approved_by: list[GroupName] | None = None


class UploadOverrideSpec(OverrideSpec):
    max_per_request: GrantSize | None = None
    max_per_window: GrantSize | None = None


class LoweringOverrideSpec(OverrideSpec):
    lowest_action: LowestAction | None = None


class _ControlSpec(_Strict):
    allowed: bool = True
    max_duration: MaxDuration = DAY
    approvals: Approvals = 1
    approved_by: list[GroupName] = []  # approver groups; empty: every approver


class BlockExceptionsSpec(_ControlSpec):
    max_duration: MaxDuration = 30 * DAY
    categories: dict[Name, OverrideSpec] = {}


class UploadExceptionsSpec(_ControlSpec):
    max_duration: MaxDuration = 7 * DAY
    max_per_request: GrantSize = 1 * GiB
    max_per_window: GrantSize = 5 * GiB
    categories: dict[Name, UploadOverrideSpec] = {}


class MarkerExceptionsSpec(_ControlSpec):
    max_duration: MaxDuration = DAY
    approvals: Approvals = 2
    lowest_action: LowestAction = "alert"
    levels: dict[Name, LoweringOverrideSpec] = {}


class UnscannableExceptionsSpec(_ControlSpec):
    max_duration: MaxDuration = DAY
    approvals: Approvals = 2
    lowest_action: LowestAction = "alert"
    categories: dict[Name, LoweringOverrideSpec] = {}


class ControlsSpec(_Strict):
    block: BlockExceptionsSpec = BlockExceptionsSpec()
    upload: UploadExceptionsSpec = UploadExceptionsSpec()
    marker: MarkerExceptionsSpec = MarkerExceptionsSpec()
    unscannable: UnscannableExceptionsSpec = UnscannableExceptionsSpec()

    def entries(self) -> Iterable[tuple[str, _ControlSpec, dict[str, OverrideSpec], str]]:
        """(control kind, its settings, its overrides, what the overrides are keyed by)."""
        yield "block", self.block, dict(self.block.categories), "categories"
        yield "upload", self.upload, dict(self.upload.categories), "categories"
        yield "marker", self.marker, dict(self.marker.levels), "levels"
        yield "unscannable", self.unscannable, dict(self.unscannable.categories), "categories"


class ApprovalsSpec(_Strict):
    """The ``approvals:`` section of a policy file (one file at most holds it)."""

    pending_expiry: PendingTime = 3 * DAY
    approver_groups: dict[GroupName, list[Account]] = {}
    controls: ControlsSpec = ControlsSpec()

    @model_validator(mode="after")
    def _known_groups(self) -> ApprovalsSpec:
        errors = []
        for kind, spec, overrides, by in self.controls.entries():
            places: list[tuple[tuple[str, ...], list[str] | None]] = [
                (("controls", kind, "approved_by"), spec.approved_by)
            ]
            places += [
                (("controls", kind, by, name, "approved_by"), o.approved_by)
                for name, o in overrides.items()
            ]
            for loc, groups in places:
                if unknown := sorted(set(groups or ()) - set(self.approver_groups)):
                    defined = ", ".join(sorted(self.approver_groups)) or "none"
                    msg = (
                        f"unknown approver groups {', '.join(unknown)} (approver_groups: {defined})"
                    )
                    errors.append(
                        InitErrorDetails(
                            type=PydanticCustomError("unknown_group", msg),
                            loc=loc,
                            input=groups,
                        )
                    )
        if errors:
            raise ValidationError.from_exception_data("ApprovalsSpec", errors)
        return self

    def unknown_names(
        self, categories: Iterable[str], levels: Iterable[str]
    ) -> list[tuple[list[str | int], str]]:
        """(location, message) for each category or marker level named here that the rest of
        the policy does not define: a misspelt ``allowed: false`` must not go unnoticed."""
        known = {"categories": set(categories), "levels": set(levels)}
        out: list[tuple[list[str | int], str]] = []
        for kind, _, overrides, by in self.controls.entries():
            what = "category" if by == "categories" else "marker level"
            for name in overrides:
                if name not in known[by]:
                    listed = ", ".join(sorted(known[by])) or "none"
                    out.append(
                        (
                            ["approvals", "controls", kind, by, name],
                            f"unknown {what} {name!r} ({by}: {listed})",
                        )
                    )
        return out


def _rule(spec: _ControlSpec, override: OverrideSpec | None = None) -> ControlRule:
    def pick(name: str) -> Any:
        value = getattr(override, name, None) if override is not None else None
        return getattr(spec, name, None) if value is None else value

    return ControlRule(
        allowed=pick("allowed"),
        max_duration_ms=pick("max_duration"),
        approvals=pick("approvals"),
        approved_by=frozenset(pick("approved_by")),
        max_per_request=pick("max_per_request") or 0,
        max_per_window=pick("max_per_window") or 0,
        lowest=pick("lowest_action") or "alert",
    )


def compile_approvals(spec: ApprovalsSpec) -> ApprovalRules:
    controls: dict[str, ControlRule] = {}
    categories: dict[tuple[str, str], ControlRule] = {}
    levels: dict[str, ControlRule] = {}
    for kind, control, overrides, by in spec.controls.entries():
        controls[kind] = _rule(control)
        for name, override in overrides.items():
            if by == "levels":
                levels[name] = _rule(control, override)
            else:
                categories[(kind, name)] = _rule(control, override)
    return ApprovalRules(
        pending_ms=spec.pending_expiry,
        controls=controls,
        categories=categories,
        levels=levels,
        approver_groups={g: frozenset(m) for g, m in spec.approver_groups.items()},
    )
