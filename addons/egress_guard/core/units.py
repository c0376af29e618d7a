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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", 1):
    _SIZE_FACTORS.update(
        {_p: 1024**_i, f"{_p}ib": 1024**_i, f"{_p}i": 1024**_i, f"{_p}b": 1000**_i}
    )


def parse_size(text: str | int) -> int:
    """Bytes from ``10MiB`` (binary), ``1GB`` (decimal), ``512k`` (binary) or a plain number."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative")
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 10MiB, 1GB, 512KiB, 1048576)")
    return int(float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "").lower()])


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}".replace(".0 ", " ")
    return f"{n} B"
