"""Evidence: request-log rows serialized for handing on, with a hash the gateway keeps.

After a leak, an auditor exports a suspect's requests. The gateway serializes the rows itself
(CSV with every column, UTF-8, fixed column order, times in UTC ISO 8601), hashes the exact
bytes it sends (SHA-256), and writes that hash, the filters and the row count into the
console's event log, which the auditor cannot alter. Anyone holding the file can later show
that it is what the gateway produced: recompute the hash and find it in the event log.

A logged value is chosen by whoever sent the request, and the auditor opens the file in a
spreadsheet: text that would run as a formula goes out with a leading ``'`` (``csv_cell``),
before hashing, so the hash is of the neutralized bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from numbers import Real
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


# First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV injection"),
# with the full-width forms some spreadsheets fold to ASCII.
FORMULA_STARTS = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20")


def csv_cell(value: Any) -> str:
    """``cell`` for a CSV file: text starting like a formula gets a leading ``'``. Numbers and
    times are left alone (``-1`` stays a number); lists are text."""
    text = cell(value)
    if isinstance(value, Real | datetime) or text[:1] not in FORMULA_STARTS:
        return text
    return "'" + text


def to_csv(rows: Iterable[Mapping[str, Any]], columns: tuple[str, ...] = COLUMN_NAMES) -> bytes:
    """The canonical CSV of some rows: a header, then one line per row, CRLF line ends. Every
    CSV the gateway hands out (admin API, CLI, console) is made here."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([csv_cell(c) for c in columns])
    for row in rows:
        writer.writerow([csv_cell(row.get(c, "")) for c in columns])
    return out.getvalue().encode("utf-8")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
