"""The request-log filter, read from query arguments (the page and the API share it), and
values as JSON the way they leave the gateway (times in UTC)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from egress_guard.core.units import parse_time
from egress_guard.requestlog import evidence
from egress_guard.requestlog.store import MAX_QUERY_ROWS, RequestFilter

DECISIONS = ("allow", "block", "alert")


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return evidence.utc_iso(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def request_filter(arg: Callable[[str], str | None], now: datetime) -> RequestFilter:
    """The request-log filter from query arguments; ValueError names the bad one."""
    limit_text = arg("limit") or "100"
    try:
        limit = int(limit_text)
    except ValueError:
        raise ValueError(f"limit must be a number, got {limit_text!r}") from None
    if not 1 <= limit <= MAX_QUERY_ROWS:
        raise ValueError(f"limit must be between 1 and {MAX_QUERY_ROWS}")
    decision = arg("decision")
    if decision is not None and decision not in DECISIONS:
        raise ValueError("decision must be allow, block or alert")
    host, since, until = arg("host"), arg("since"), arg("until")
    return RequestFilter(
        user=arg("user"),
        host=host.lower().rstrip(".") if host else None,
        decision=decision,
        since=parse_time(since, now) if since else None,
        until=parse_time(until, now) if until else None,
        limit=limit,
    )


def filter_detail(flt: RequestFilter) -> str:
    """The filter as the ``detail`` of a console event: whose traffic was looked at."""
    return json.dumps(
        {k: v for k, v in vars(flt).items() if v is not None}, default=json_default, sort_keys=True
    )
