"""Evidence: request-log rows serialized for handing on, with a hash the gateway keeps.

After a leak, an auditor exports a suspect's requests. The gateway serializes the rows itself
(CSV with every column, UTF-8, fixed column order, times in UTC ISO 8601), hashes the exact
bytes it sends (SHA-256), and writes that hash, the filters and the row count into the
console's event log, which the auditor cannot alter. Anyone holding the file can later show
that it is what the gateway produced: recompute the hash and find it in the event log.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .store import COLUMN_NAMES


def as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:  # the store hands back UTC as naive
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utc_iso(value: datetime) -> str:
    """``2026-11-21T08:30:00.123Z``: how times leave the gateway (API, exports)."""
    return as_utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cell(value: Any) -> str:
    """One value as text: lists joined by ';', times in UTC with milliseconds."""
    if isinstance(value, list):
        return ";".join(map(str, value))
    if isinstance(value, datetime):
        return utc_iso(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_csv(rows: Iterable[Mapping[str, Any]], columns: tuple[str, ...] = COLUMN_NAMES) -> bytes:
    """The canonical CSV of some rows: a header, then one line per row, CRLF line ends."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c, "")) for c in columns])
    return out.getvalue().encode("utf-8")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
