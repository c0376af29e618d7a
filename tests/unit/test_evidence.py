"""Evidence exports: one canonical serialization, so the same rows always hash the same."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta, timezone

from egress_guard.requestlog.evidence import digest, to_csv
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
