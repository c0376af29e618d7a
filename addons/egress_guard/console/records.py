"""The console's own records as pages: the event log of ``console_events`` (logins, refusals,
reads, exports, incident updates, permission changes), searchable and paged, its details as
fields rather than JSON; and the retention proof (each table's TTL, oldest and newest row,
rows and bytes per month, whether each of the last six months is present)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from egress_guard.core.units import parse_time
from egress_guard.requestlog.investigation import EventFilter

from . import svg
from .filters import decode_cursor, encode_cursor, json_default, parse_limit
from .investigate import AuditorPage

# Both answer for how the console is used (as the console-events API).
ADMIN_AUDITOR: Mapping[str, frozenset[str]] = {"GET": frozenset({"admin", "auditor"})}
EVENT_ARGS = ("since", "until", "actor", "action", "outcome", "contains", "limit")
OUTCOMES = ("ok", "denied", "failed", "locked", "refused")


def event_filter(arg: Any, now: Any) -> EventFilter:
    since, until, after = arg("since"), arg("until"), arg("after")
    outcome = arg("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    cursor = None
    if after is not None:
        ts, key = decode_cursor(after)
        if not key.isdigit():
            raise ValueError("after must be a cursor from a previous page")
        cursor = (ts, int(key))
    return EventFilter(
        since=parse_time(since, now) if since else None,
        until=parse_time(until, now) if until else None,
        actor=arg("actor"),
        action=arg("action"),
        outcome=outcome,
        contains=arg("contains"),
        limit=parse_limit(arg("limit"), 100, 10_000),
        after=cursor,
    )


class EventLog(AuditorPage):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = ADMIN_AUDITOR

    async def get(self) -> None:
        form = {n: self.arg(n) for n in EVENT_ARGS}
        try:
            f = event_filter(self.arg, self.ctx.now())
        except ValueError as e:
            self.page("events.html", "操作记录 Event log", 400, form=form, rows=None, error=str(e))
            return
        detail = {k: v for k, v in vars(f).items() if v is not None}
        rows = await self.audited_query(
            "query_console_events",
            json.dumps(detail, default=json_default, sort_keys=True),
            lambda: self.ctx.audit.console_events(f),
        )
        nxt = (
            self.url("/events", **form, after=encode_cursor(rows[-1]["ts"], rows[-1]["key"]))
            if len(rows) == f.limit
            else None
        )
        self.page(
            "events.html",
            "操作记录 Event log",
            form=form,
            rows=rows,
            error="",
            outcomes=OUTCOMES,
            next_url=nxt,
        )


class Retention(AuditorPage):
    ROLES: ClassVar[Mapping[str, frozenset[str]]] = ADMIN_AUDITOR

    async def get(self) -> None:
        now = self.ctx.now()
        found = await self.audited_query(
            "query_retention", "{}", lambda: self.ctx.audit.retention(now)
        )
        self.page("retention.html", "保留期 Retention", found=found, bar=svg.sparkbar)
