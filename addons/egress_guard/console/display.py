"""How values look on the console's pages: times in the gateway's time zone (UTC on hover and
in the detail), sizes, and one request-log cell (its text, its full value for the hover, and
its class). Templates get these as ``show``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from egress_guard.core.units import format_size
from egress_guard.requestlog import evidence


def local_time(value: datetime, ms: bool = True) -> str:
    text = evidence.as_utc(value).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")
    return text[:-3] if ms else text[:-7]


def utc_time(value: datetime) -> str:
    return evidence.utc_iso(value)


def zone_label() -> str:
    """The gateway's time zone as the pages name it: ``CST, UTC+08:00``."""
    now = datetime.now().astimezone()
    offset = now.strftime("%z")
    return f"{now.tzname()}, UTC{offset[:3]}:{offset[3:]}"


def size(n: int | float) -> str:
    return format_size(int(n))


def is_unset(value: Any) -> bool:
    """A time ClickHouse gives for "none" (1970), or an empty value."""
    if isinstance(value, datetime):
        return value.year <= 1970
    return value in (None, "", [])


@dataclass(frozen=True)
class Cell:
    text: str  # what the cell shows (may be cut by CSS, never in the middle by the browser)
    full: str  # the whole value, on hover
    css: str = ""


# The request log's table: (column, heading).
LOG_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "time"),
    ("user", "user"),
    ("client_ip", "client"),
    ("method", "method"),
    ("host", "host"),
    ("path", "path"),
    ("status", "status"),
    ("decision", "decision"),
    ("reason_kind", "reason"),
    ("rule_id", "rule"),
    ("marker_levels", "markers"),
    ("upload_bytes", "upload"),
    ("kind", "kind"),
    ("request_id", "request id"),
)


def cell(column: str, value: Any) -> Cell:
    """One request-log value as the table shows it."""
    if column == "ts":
        return Cell(local_time(value), f"UTC {utc_time(value)}", "c-ts")
    if column in ("upload_bytes", "forwarded_bytes", "response_bytes", "request_bytes"):
        return Cell(size(value) if value else "0", f"{value:,} bytes", "c-num")
    if column == "decision":
        return Cell(str(value), str(value), f"c-decision d-{value}")
    text = evidence.cell(value)
    return Cell(text, text, f"c-{column}")


def pretty_detail(detail: str) -> list[tuple[str, str]]:
    """A console event's detail as (name, value) pairs, not raw JSON; text that is not a JSON
    object is one pair named ``detail``."""
    try:
        parsed = json.loads(detail) if detail else {}
    except ValueError:
        return [("detail", detail)]
    if not isinstance(parsed, dict):
        return [("detail", detail)]
    out = []
    for key, value in parsed.items():
        if isinstance(value, list | dict):
            value = json.dumps(value, ensure_ascii=False)
        out.append((str(key), str(value)))
    return out


as_utc = evidence.as_utc
