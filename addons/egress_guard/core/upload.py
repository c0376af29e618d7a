"""Upload caps: which byte limits apply to a request, whether it is over them, and the rolling
per-user window that counts every upload of a user across requests and connections.

``limits_for`` and ``check`` are pure; ``UploadWindows`` is the accounting (an injectable
clock, no sleeping); ``UploadGate`` counts a streamed body chunk by chunk and says when it
crosses a cap. The uploads adapter (``runtime``) turns a ``CapHit`` into a refusal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .selector import Selector
from .units import format_size

MiB = 1024 * 1024


@dataclass(frozen=True)
class UploadOverride:
    id: str
    selector: Selector
    per_request: int | None  # None = unlimited
    per_user: int | None
    sets_per_request: bool
    sets_per_user: bool


@dataclass(frozen=True)
class UploadRules:
    per_request: int | None = 10 * MiB
    per_user: int | None = 200 * MiB
    window_seconds: float = 24 * 3600
    hold_in_memory: int = 1 * MiB
    overrides: tuple[UploadOverride, ...] = ()


@dataclass(frozen=True)
class Limits:
    per_request: int | None
    per_user: int | None
    window_seconds: float
    per_request_id: str  # the cap id logged when this limit refuses
    per_user_id: str


def limits_for(
    rules: UploadRules, user: str, groups: tuple[str, ...], host: str, category: str
) -> Limits:
    """The first override (in policy order) that sets a limit and applies wins for that limit."""
    per_request, per_request_id = rules.per_request, "uploads.per_request"
    per_user, per_user_id = rules.per_user, "uploads.per_user"
    request_done = user_done = False
    for o in rules.overrides:
        if (request_done or not o.sets_per_request) and (user_done or not o.sets_per_user):
            continue
        if not o.selector.applies(user, groups, host, category):
            continue
        if o.sets_per_request and not request_done:
            per_request, per_request_id, request_done = o.per_request, o.id, True
        if o.sets_per_user and not user_done:
            per_user, per_user_id, user_done = o.per_user, o.id, True
    return Limits(per_request, per_user, rules.window_seconds, per_request_id, per_user_id)


@dataclass(frozen=True)
class CapHit:
    cap_id: str
    kind: str  # per_request | per_user
    cap: int
    size: int  # bytes of this request (declared or seen so far)
    used: int  # bytes already counted in the user's window


def check(limits: Limits, size: int, used: int) -> CapHit | None:
    """Would ``size`` bytes in this request break a cap, with ``used`` already in the window?"""
    if limits.per_request is not None and size > limits.per_request:
        return CapHit(limits.per_request_id, "per_request", limits.per_request, size, used)
    if limits.per_user is not None and used + size > limits.per_user:
        return CapHit(limits.per_user_id, "per_user", limits.per_user, size, used)
    return None


def describe(hit: CapHit, window_seconds: float) -> tuple[str, str]:
    """(en, zh) sentences for the block page. Sizes only: never the content."""
    hours = window_seconds / 3600
    span = f"{hours:g} h" if hours < 48 else f"{hours / 24:g} d"
    if hit.kind == "per_request":
        return (
            f"This upload is {format_size(hit.size)}{' or more' if hit.size > hit.cap else ''}; "
            f"the limit is {format_size(hit.cap)} per request.",
            f"本次上传 {format_size(hit.size)}，超过单次上传上限 {format_size(hit.cap)}。",
        )
    return (
        f"You have uploaded {format_size(hit.used)} in the last {span}; with this upload "
        f"({format_size(hit.size)}) you would pass your limit of {format_size(hit.cap)} "
        f"per {span}.",
        f"您在最近 {span} 内已上传 {format_size(hit.used)}，加上本次（{format_size(hit.size)}）"
        f"将超过每 {span} {format_size(hit.cap)} 的上限。",
    )


@dataclass
class _UserWindow:
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, bytes]
    total: int = 0


class UploadWindows:
    """Bytes uploaded per user in the last ``window_seconds``, to the second.

    ``remote`` carries what other gateway nodes counted (refreshed from the shared store);
    this node's own uploads are counted here exactly as they happen.
    """

    def __init__(self, window_seconds: float, clock: Callable[[], float]):
        self.window_seconds = window_seconds
        self.clock = clock
        self._users: dict[str, _UserWindow] = {}
        self.remote: dict[str, int] = {}

    def _prune(self, key: str) -> _UserWindow | None:
        w = self._users.get(key)
        if w is None:
            return None
        horizon = int(self.clock() - self.window_seconds)
        while w.buckets and w.buckets[0][0] <= horizon:
            w.total -= w.buckets.popleft()[1]
        if not w.buckets:
            del self._users[key]
            return None
        return w

    def used(self, key: str) -> int:
        w = self._prune(key)
        return (w.total if w else 0) + self.remote.get(key, 0)

    def add(self, key: str, n: int, at: float | None = None) -> None:
        if n <= 0:
            return
        second = int(self.clock() if at is None else at)
        w = self._users.setdefault(key, _UserWindow())
        if w.buckets and w.buckets[-1][0] == second:
            w.buckets[-1][1] += n
        else:
            w.buckets.append([second, n])
        w.total += n

    def users(self) -> int:
        return len(self._users)


class UploadGate:
    """Counts one streamed body. Bytes beyond ``reserved`` (what the headers declared and the
    window already holds) go into the window as they pass."""

    def __init__(self, limits: Limits, windows: UploadWindows, key: str, reserved: int = 0):
        self.limits = limits
        self.windows = windows
        self.key = key
        self.reserved = reserved
        self.seen = 0
        self.counted = 0  # bytes this gate put into the window
        self.hit: CapHit | None = None

    def feed(self, data: bytes) -> CapHit | None:
        """Count a chunk; the cap it would cross (the chunk is then not counted), or None."""
        size = self.seen + len(data)
        extra = max(0, size - max(self.reserved, self.seen))  # bytes new to the window
        mine = self.reserved + self.counted  # this request's bytes the window already holds
        others = self.windows.used(self.key) - mine if self.limits.per_user is not None else 0
        hit = check(self.limits, size, others)
        if hit is not None:
            self.hit = hit
            return hit
        self.seen = size
        if extra and self.limits.per_user is not None:
            self.windows.add(self.key, extra)
            self.counted += extra
        return None
