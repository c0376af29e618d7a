"""The auditor's queries on a month of synthetic traffic in the embedded store, at 1 M and
10 M rows: one user's week of the request log, keyset pages, one request by id, the user's
timeline, each report, the incident queue and the retention proof.

    python tests/benchmarks/bench_audit.py                  # 1 M and 10 M rows
    python tests/benchmarks/bench_audit.py --rows 1000000   # sizes to measure at
    python tests/benchmarks/bench_audit.py --out DIR        # results.json and report.md

Rows are generated inside the engine (INSERT … SELECT FROM numbers(), a million at a time),
with a realistic skew: a few hundred users (a few heavy ones), thousands of hosts (a long
tail), office-hours traffic, 3 % blocked, rare marker hits, uploads and exceptions. Each query
runs three times after a warm-up; the figure is the median. Every loop is bounded by the
deadline. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent / "addons")]

from egress_guard.requestlog.investigation import Investigation  # noqa: E402
from egress_guard.requestlog.store import RequestFilter, Store, default_dsn  # noqa: E402

START = datetime(2026, 10, 1, tzinfo=UTC)  # the synthetic month: October 2026
USERS, HOSTS, CHUNK = 300, 5000, 1_000_000

# One generated row per number; the expressions are the data's shape. Users and hosts are
# skewed with powers of a uniform number: user0 and the first hosts get most of the traffic.
GENERATED = {
    "ts": "toDateTime64('2026-10-01 00:00:00', 3, 'UTC') + toIntervalMillisecond("
    "rand64(1) % (30 * 86400000))",
    "node": "'bench'",
    "request_id": "generateUUIDv4(number)",
    "client_ip": "concat('10.1.', toString(u % 250), '.', toString(u % 200))",
    "user": "concat('user', toString(u))",
    "groups": "[concat('dept', toString(u % 12))]",
    "method": "if(up, 'POST', 'GET')",
    "scheme": "if(k = 'connect', 'http', 'https')",
    "host": "concat('h', toString(h), '.example', toString(h % 7), '.com')",
    "port": "443",
    "path": "concat('/p/', toString(rand(2) % 1000))",
    "query": "''",
    "http_version": "'HTTP/1.1'",
    "kind": "k",
    "status": "if(blk, 403, 200)",
    "decision": "if(blk, 'block', if(alert, 'alert', 'allow'))",
    "reason_kind": "if(mark, 'marker', if(blk, 'blocklist', ''))",
    "rule_id": "if(mark, 'cn.classified.star', if(blk, concat('webmail.h', toString(h)), ''))",
    "category": "if(blk, ['webmail', 'cloud_drive', 'filehosting'][1 + h % 3], '')",
    "marker_ids": "if(mark, ['cn.classified.star'], [])",
    "marker_levels": "if(mark, [['national_secret', 'internal'][1 + toUInt8(alert)]], [])",
    "exception_id": "if(rand(3) % 200 = 0, concat('exc-', toString(rand(4) % 40)), '')",
    "request_bytes": "if(up, 2000 + rand(5) % 5000000, 800)",
    "upload_bytes": "if(up, 2000 + rand(5) % 5000000, 0)",
    "response_bytes": "rand(6) % 200000",
    "content_type": "''",
    "user_agent": "'bench'",
    "duration_ms": "rand(7) % 2000",
    "tls_intercepted": "k != 'connect'",
    "error": "''",
    "declared_bytes": "0",
    "window_bytes": "0",
    "forwarded_bytes": "if(up AND NOT blk, 2000 + rand(5) % 5000000, 0)",
}
SHAPE = (
    "toUInt32(pow(randCanonical(), 3) * {users}) AS u, "
    "toUInt32(pow(randCanonical(), 4) * {hosts}) AS h, "
    "rand(8) % 100 < 3 AS blk, rand(9) % 1000 < 3 AS alert, "
    "rand(10) % 2000 = 0 AS mark, rand(11) % 100 < 5 AS up, "
    "if(rand(12) % 100 < 15, 'connect', 'http') AS k"
)


def fill(store: Store, rows: int, offset: int) -> float:
    """Insert ``rows`` generated rows, a chunk at a time; seconds taken."""
    cols = ", ".join(GENERATED)
    exprs = ", ".join(GENERATED.values())
    shape = SHAPE.format(users=USERS, hosts=HOSTS)
    t = time.monotonic()
    done = 0
    while done < rows:
        n = min(CHUNK, rows - done)
        store.command(
            f"INSERT INTO requests ({cols}) SELECT {exprs} FROM (SELECT number, {shape} "
            f"FROM numbers({offset + done}, {n}))"
        )
        done += n
    store.command("OPTIMIZE TABLE requests FINAL")  # as a month of background merges leaves it
    return time.monotonic() - t


def timed(fn: Callable[[], Any], runs: int = 3) -> float:
    fn()  # warm-up: the first read of a column comes from disk
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(store: Store) -> dict[str, float]:
    inv = Investigation(store, tz="Asia/Shanghai")
    week = (START + timedelta(days=10), START + timedelta(days=17))
    month = (START, START + timedelta(days=30))
    user = "user7"  # a busy one, not the busiest
    out: dict[str, float] = {}
    out["user_week_first_page"] = timed(
        lambda: store.query_requests(RequestFilter(user=user, since=week[0], until=week[1]))
    )
    last = store.query_requests(RequestFilter(user=user, since=week[0], until=week[1], limit=1000))
    cursor = (last[-1]["ts"], last[-1]["request_id"])
    out["user_week_next_page"] = timed(
        lambda: store.query_requests(
            RequestFilter(user=user, since=week[0], until=week[1], after=cursor)
        )
    )
    out["month_first_page_no_filter"] = timed(
        lambda: store.query_requests(RequestFilter(since=month[0], until=month[1]))
    )
    middle = store.query_requests(RequestFilter(since=START + timedelta(days=15), limit=1))[0]
    out["month_page_in_the_middle"] = timed(
        lambda: store.query_requests(
            RequestFilter(
                since=month[0], until=month[1], after=(middle["ts"], middle["request_id"])
            )
        )
    )
    out["client_network_week"] = timed(
        lambda: store.query_requests(
            RequestFilter(client="10.1.7.0/24", since=week[0], until=week[1])
        )
    )
    out["request_by_id"] = timed(lambda: inv.request(middle["request_id"]))
    out["timeline_user_week"] = timed(lambda: inv.timeline(user, *week))
    out["timeline_user_week_everything"] = timed(lambda: inv.timeline(user, *week, everything=True))

    # Each report on its own: time every query report() makes, in the order it makes them.
    names = (
        "totals", "requests_over_time", "top_blocked_users", "top_blocked_hosts",
        "top_blocked_categories", "upload_per_user_day", "marker_hits_over_time",
        "exception_usage", "busiest_destinations",
    )  # fmt: skip
    per: dict[str, list[float]] = {n: [] for n in names}
    real = store.audit_query
    spent: list[float] = []

    def clocked(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            spent.append(time.perf_counter() - t)

    store.audit_query = clocked  # type: ignore[method-assign]
    try:
        inv.report(*month)  # warm-up
        for _ in range(3):
            spent.clear()
            t = time.perf_counter()
            inv.report(*month)
            per.setdefault("report_all", []).append(time.perf_counter() - t)
            for n, s in zip(names, spent, strict=True):
                per[n].append(s)
    finally:
        store.audit_query = real  # type: ignore[method-assign]
    for n, values in per.items():
        out[f"report_month_{n}"] = statistics.median(values)
    out["incident_queue"] = timed(lambda: inv.incidents(since=month[0], until=month[1]))
    out["retention"] = timed(lambda: inv.retention(START + timedelta(days=31)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--deadline", type=float, default=1800, help="seconds for the whole run")
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline
    results: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(default_dsn(tmp))
        store.migrate()
        have = 0
        for rows in sorted(args.rows):
            if time.monotonic() > deadline:
                print(f"deadline reached before {rows} rows", file=sys.stderr)
                break
            took = fill(store, rows - have, have)
            have = rows
            size = store.query(
                "SELECT sum(bytes_on_disk) FROM system.parts WHERE table = 'requests' AND active"
            )[0][0]
            print(
                f"{rows:,} rows inserted in {took:.1f} s ({size / 2**20:.0f} MiB)", file=sys.stderr
            )
            figures = measure(store)
            results["sizes"][str(rows)] = {"insert_s": took, "bytes": size, "seconds": figures}
            for name, s in figures.items():
                print(f"  {name:<42} {s * 1000:8.1f} ms", file=sys.stderr)
        store.close()
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(text)
        (args.out / "report.md").write_text(report_md(results))
    print(text)


def report_md(results: dict[str, Any]) -> str:
    sizes = list(results["sizes"])
    lines = ["# Auditor queries (embedded store)", "", "| query | " + " | ".join(
        f"{int(s):,} rows" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]  # fmt: skip
    names = list(results["sizes"][sizes[0]]["seconds"]) if sizes else []
    for n in names:
        cells = [f"{results['sizes'][s]['seconds'][n] * 1000:.0f} ms" for s in sizes]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
