"""Exceptions for the console's tests: the approvals rules the shipped defaults compile to, a
wall clock moved by hand, and a book holding one employee's pending request (from a blocked
request) and one approver's active grant."""

from __future__ import annotations

from pathlib import Path

from egress_guard.core import exceptions as ex
from egress_guard.core.approvals import ApprovalsSpec, compile_approvals
from egress_guard.requestlog.exception_snapshot import ExceptionBook, ExceptionSnapshot

RULES = compile_approvals(ApprovalsSpec())  # every control may be lifted; markers need two
START_MS = 1_800_000_000_000
PENDING_ID = "ex-pending00001"
ACTIVE_ID = "ex-active000001"
REQUESTER = "zhang.wei"
BLOCKED_REQUEST = "req-1"


class WallClock:
    """Milliseconds since the epoch, moved by hand."""

    def __init__(self, t: int = START_MS):
        self.t = t

    def __call__(self) -> int:
        return self.t


def must(result: ex.Event | ex.Refusal) -> ex.Event:
    assert isinstance(result, ex.Event), result
    return result


def requested(
    clock: WallClock,
    exception_id: str = PENDING_ID,
    *,
    user: str = REQUESTER,
    target: ex.Target | None = None,
    control: ex.Control = ex.BLOCK,
    hours: int = 48,
    category: str = "webmail",
    request_id: str = BLOCKED_REQUEST,
    grant: ex.UploadGrant | None = None,
    reason: str = "the customer sends the contract by webmail",
) -> ex.Event:
    """An employee's request from a block page, as the portal makes it."""
    now = clock()
    lowered = "alert" if control.kind in ("marker", "unscannable") else ""
    terms = ex.Terms(
        ex.Subject.user(user),
        control,
        target or ex.Target.for_host("example.com"),
        now,
        now + hours * ex.HOUR,
        grant,
        lowered,  # type: ignore[arg-type]
    )
    return must(
        ex.request(
            RULES,
            exception_id=exception_id,
            event_id=ex.new_event_id(),
            actor=ex.Actor(user, frozenset(), "10.1.2.3"),
            now_ms=now,
            terms=terms,
            reason=reason,
            category=category,
            request_id=request_id,
        )
    )


def granted(clock: WallClock, exception_id: str = ACTIVE_ID, by: str = "li.all") -> ex.Event:
    now = clock()
    terms = ex.Terms(
        ex.Subject.user(REQUESTER),
        ex.BLOCK,
        ex.Target.for_host("mail.example.com"),
        now,
        now + ex.DAY,
    )
    return must(
        ex.grant(
            RULES,
            exception_id=exception_id,
            event_id=ex.new_event_id(),
            actor=ex.Actor(by, frozenset({"approver"}), "10.9.9.9"),
            now_ms=now,
            terms=terms,
            reason="audit season",
            category="webmail",
        )
    )


def seeded_book(directory: Path, clock: WallClock) -> ExceptionBook:
    """A book (no store) with ``PENDING_ID`` pending and ``ACTIVE_ID`` active."""
    book = ExceptionBook(ExceptionSnapshot(directory / "exceptions.snapshot"), None, clock=clock)
    book.start()
    book.append(requested(clock))
    book.append(granted(clock))
    return book
