"""What the console's handlers run on: the store, the accounts, the gateway's status, the
clocks, and the throttles and sessions that live as long as the console does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from egress_guard.core.exceptions import ApprovalRules, Event, Target
from egress_guard.notify import ExceptionNotice
from egress_guard.requestlog.exception_snapshot import ExceptionBook
from egress_guard.requestlog.store import CONSOLE_EVENT_NAMES, RequestFilter

from .accounts import AccountBook
from .sessions import Sessions
from .throttle import FailedLogins


class ConsoleStore(Protocol):
    """The part of ``requestlog.store.Store`` the console uses (tests hand in a fake)."""

    def insert_console_event(self, row: Sequence[Any]) -> None: ...

    def query_requests(self, f: RequestFilter) -> list[dict[str, Any]]: ...

    def query_console_events(
        self, since: datetime | None, actor: str | None, limit: int, contains: str | None = None
    ) -> list[dict[str, Any]]: ...


@dataclass
class ConsoleContext:
    bootstrap_token: str
    accounts: AccountBook
    store: ConsoleStore
    status: Callable[[], dict[str, Any]]
    node: str = ""
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    clock: Callable[[], float] = time.monotonic
    failed_by_address: FailedLogins = field(default_factory=FailedLogins)
    # Per account name: slower to trip than per address (a lock-out is itself a nuisance),
    # but an account cannot be guessed at from many addresses either.
    failed_by_account: FailedLogins = field(default_factory=lambda: FailedLogins(20, 900))
    sessions: Sessions = field(default_factory=Sessions)
    # The auditor's queries (timeline, reports, incidents, retention…): by default over the
    # same store; tests hand in a fake.
    audit: Any = None
    # The approvers' exception workflow (``exception_ops``). ``exceptions``: the gateway's book
    # (None: the workflow answers 503). The policy is read through callables at each call, so
    # a reload applies at once: the approvals rules, the destination category of a target
    # (ValueError when it spans several), a proxy user's groups (an approver is refused a
    # subject through a group they are in). ``notify`` takes notices and returns at once;
    # ``exception_history`` reads the store's events (``Store.exception_events``), for what
    # the book no longer holds. ``wall_ms``: the wall clock the decisions are dated by.
    exceptions: ExceptionBook | None = None
    approval_rules: Callable[[], ApprovalRules] = ApprovalRules
    target_category: Callable[[Target], str] = lambda target: target.category or ""
    groups_of: Callable[[str], tuple[str, ...]] = lambda name: ()
    notify: Callable[[ExceptionNotice], None] = lambda notice: None
    exception_history: Callable[..., list[Event]] | None = None
    wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000

    def __post_init__(self) -> None:
        if self.audit is None:
            from egress_guard.requestlog.investigation import Investigation

            self.audit = Investigation(self.store)  # type: ignore[arg-type]
        self.failed_by_address.clock = self.clock
        self.failed_by_account.clock = self.clock
        self.sessions.clock = self.clock

    async def record_event(self, **fields: Any) -> None:
        """One row of ``console_events``, written from a worker thread; raises when the store
        cannot take it."""
        row = [self.now(), self.node] + [fields[name] for name in CONSOLE_EVENT_NAMES[2:]]
        await asyncio.get_running_loop().run_in_executor(None, self.store.insert_console_event, row)
