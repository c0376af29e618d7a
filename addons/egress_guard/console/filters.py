"""The request-log filter, read from query arguments (the page and the API share it), the
keyset cursor, and values as JSON the way they leave the gateway (times in UTC)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from egress_guard.core.units import parse_size, parse_time
from egress_guard.requestlog import evidence
from egress_guard.requestlog.store import MAX_QUERY_ROWS, RequestFilter, client_range

DECISIONS = ("allow", "block", "alert")
REASON_KINDS = ("blocklist", "destination", "upload_cap", "marker", "error", "exception", "none")
KINDS = ("http", "connect", "tunnel", "websocket")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Query argument → (RequestFilter field, label): the page's form, the API and the CLI's
# options use these names.
TEXT_ARGS: tuple[tuple[str, str, str], ...] = (
    ("user", "user", "用户 User"),
    ("group", "group", "组 Group"),
    ("client", "client", "客户端 Client (IP or CIDR)"),
    ("host", "host", "目标 Host (+ subdomains)"),
    ("category", "category", "类别 Category"),
    ("rule", "rule_id", "规则 Rule id"),
    ("level", "marker_level", "标记级别 Marker level"),
    ("exception", "exception_id", "例外 Exception id (* = any)"),
    ("request_id", "request_id", "请求 Request id"),
    ("connection", "connection_id", "连接 Connection id"),
)
CHOICE_ARGS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("decision", "decision", "结果 Decision", DECISIONS),
    ("reason", "reason_kind", "原因 Reason", REASON_KINDS),
    ("kind", "kind", "类型 Kind", KINDS),
)
ALL_ARGS = (
    "since", "until", *(a for a, _, _ in TEXT_ARGS), *(a for a, _, _, _ in CHOICE_ARGS),
    "min_upload", "limit", "after",
)  # fmt: skip


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return evidence.utc_iso(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def encode_cursor(ts: datetime, key: str | int) -> str:
    """A keyset cursor as text for a URL: ``<ms since 1970>.<key>`` (the key is the row's
    request id, or a hash for console events)."""
    ms = round((evidence.as_utc(ts) - _EPOCH) / timedelta(milliseconds=1))
    return f"{ms}.{key}"


def decode_cursor(text: str) -> tuple[datetime, str]:
    ms, dot, key = text.partition(".")
    if not dot or not re.fullmatch(r"\d{1,15}", ms) or not key:
        raise ValueError(f"after must be a cursor from a previous page, got {text!r}")
    return _EPOCH + timedelta(milliseconds=int(ms)), key


def parse_limit(text: str | None, default: int = 100, top: int = MAX_QUERY_ROWS) -> int:
    text = text or str(default)
    try:
        limit = int(text)
    except ValueError:
        raise ValueError(f"limit must be a number, got {text!r}") from None
    if not 1 <= limit <= top:
        raise ValueError(f"limit must be between 1 and {top}")
    return limit


def request_filter(arg: Callable[[str], str | None], now: datetime) -> RequestFilter:
    """The request-log filter from query arguments; ValueError names the bad one."""
    limit = parse_limit(arg("limit"))
    values: dict[str, Any] = {"limit": limit}
    for name, fld, _label, choices in CHOICE_ARGS:
        value = arg(name)
        if value is not None and value not in choices:
            raise ValueError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}")
        values[fld] = value
    for name, fld, _label in TEXT_ARGS:
        value = arg(name)
        values[fld] = value.strip() if value is not None and value.strip() else None
    if values["host"]:
        values["host"] = values["host"].lower().rstrip(".")
    if values["client"]:
        client_range(values["client"])  # ValueError when it is neither address nor network
    for name in ("since", "until"):
        text = arg(name)
        values[name] = parse_time(text, now) if text else None
    min_upload = arg("min_upload")
    if min_upload is not None:
        values["min_upload"] = parse_size(min_upload.strip())
    after = arg("after")
    if after is not None:
        values["after"] = decode_cursor(after)
    return RequestFilter(**values)


def filter_detail(flt: RequestFilter) -> str:
    """The filter as the ``detail`` of a console event: whose traffic was looked at."""
    return json.dumps(
        {k: v for k, v in vars(flt).items() if v is not None}, default=json_default, sort_keys=True
    )


def next_cursor(rows: list[dict[str, Any]], limit: int) -> str | None:
    """The cursor of the page after ``rows`` (ordered as the store returned them), None when
    this page was the last."""
    if len(rows) < limit or not rows:
        return None
    return encode_cursor(rows[-1]["ts"], rows[-1]["request_id"])
