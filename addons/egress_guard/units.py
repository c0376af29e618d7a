"""Units: durations (``30m``, ``24h``, ``7d``) and points in time (ISO 8601 or ``-24h``-style
"that long ago"), parsed once here for the CLI, the admin API and the policy."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 30m, 24h, 7d, 2w)")
    return timedelta(seconds=float(m.group(1)) * _SECONDS[m.group(2)])


def parse_time(text: str, now: datetime) -> datetime:
    """An aware UTC datetime from ISO 8601 (naive means UTC) or a duration meaning 'ago'."""
    text = text.strip()
    if _DURATION.match(text.lstrip("-")):
        return now - parse_duration(text.lstrip("-"))
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time (ISO 8601 like 2026-11-01 or 2026-11-01T08:00:00+08:00, "
            "or a duration ago like 24h)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)
