"""Bounded load test: a steady mix of browsing, uploads and blocked requests through the gateway
(embedded store) for a set time; at the end the request log must hold exactly one row per
request the clients saw answered, RSS must stay flat, and nothing may appear in the error log.
The same mix through bare mitmdump gives the sustained-rate ratio.

    python tests/benchmarks/load.py --seconds 300 --json load.json

Loopback only. Each client process stops by itself at the deadline or after --max-requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "e2e")]

from egress_guard.requestlog.store import Store, default_dsn  # noqa: E402
from harness import GatewayProcess, Upstream, start_mitmdump  # noqa: E402
from support import POLICIES  # noqa: E402


def client(
    proxy_port: int,
    upstream_port: int,
    prefix: str,
    seconds: float,
    max_requests: int,
    seed: int,
    results: multiprocessing.Queue,
) -> None:
    """One client process: 70 % small GETs, 15 % form uploads (1–200 KB), 10 % blocked
    requests, 5 % larger uploads (1–3 MB). Reports what it saw answered."""
    rnd = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
    answered: dict[str, int] = {}
    errors = 0
    what_failed: list[str] = []  # the first few, for the report
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline and i < max_requests:
        i += 1
        roll = rnd.random()
        path = f"{prefix}{i}"
        body = None
        if roll < 0.70:
            method, url, expect = "GET", f"http://127.0.0.1:{upstream_port}{path}", 200
        elif roll < 0.85:
            method, url, expect = "POST", f"http://127.0.0.1:{upstream_port}{path}", 200
            body = b"q=" + b"x" * rnd.randint(1_000, 200_000)
        elif roll < 0.95:
            method, url, expect = "GET", f"http://mail.qq.com{path}", 403
        else:
            method, url, expect = "POST", f"http://127.0.0.1:{upstream_port}{path}", 200
            body = os.urandom(rnd.randint(1_000_000, 3_000_000))
        try:
            conn.request(
                method,
                url,
                body=body,
                headers={"Content-Type": "application/octet-stream"} if body else {},
            )
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as e:
            errors += 1
            if len(what_failed) < 5:
                what_failed.append(f"{method} {path}: {type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
            continue
        if resp.status == expect:
            answered[path] = resp.status
        else:
            errors += 1
            if len(what_failed) < 5:
                what_failed.append(f"{method} {path}: status {resp.status}, expected {expect}")
    conn.close()
    results.put((answered, errors, what_failed))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_mix(
    proxy_port: int,
    upstream_port: int,
    pid: int,
    prefix: str,
    seconds: float,
    clients: int,
    max_requests: int,
) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=client,
            args=(proxy_port, upstream_port, f"{prefix}{c}-", seconds, max_requests, c, results),
        )
        for c in range(clients)
    ]
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(1.0):
            samples.append((round(time.monotonic() - t0, 1), rss_kib(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.monotonic()
    for p in procs:
        p.start()
    sampler.start()
    collected = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    elapsed = time.monotonic() - start
    stop.set()
    answered: dict[str, int] = {}
    errors = 0
    failures: list[str] = []
    for a, e, f in collected:
        answered.update(a)
        errors += e
        failures += f
    return {
        "answered": answered,
        "errors": errors,
        "failures": failures,
        "seconds": elapsed,
        "rate": len(answered) / elapsed,
        "rss_kib": samples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-requests", type=int, default=200_000, help="per client, a bound")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="egress-load-"))
    (tmp / "up").mkdir()
    upstream = Upstream(tmp / "up").start()
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "uploads.yaml").write_text(
        "uploads:\n  per_request: 10MiB\n  per_user: 100GiB\n  window: 24h\n"
    )
    report: dict = {}
    try:
        # The same mix: bare mitmdump refuses the "blocked" requests with its own block_list
        # (it must not try to reach the real site).
        bare, bare_port = start_mitmdump(tmp / "mitm", ("--set", "block_list=/~d mail.qq.com/403"))
        try:
            b = run_mix(
                bare_port,
                upstream.http_port,
                bare.pid,
                "/bare-",
                args.seconds / 2,
                args.clients,
                args.max_requests,
            )
        finally:
            bare.terminate()
            bare.wait(30)
        gw = GatewayProcess(tmp / "gw", policies).start()
        g = run_mix(
            gw.proxy_port,
            upstream.http_port,
            gw.proc.pid,
            "/load-",
            args.seconds,
            args.clients,
            args.max_requests,
        )
        assert gw.stop() == 0
        store = Store(default_dsn(tmp / "gw"))
        try:
            rows = store.query(
                "SELECT path, count() FROM requests WHERE startsWith(path, '/load-') "
                "AND kind = 'http' GROUP BY path"
            )
        finally:
            store.close()
        logged = {path: n for path, n in rows}
        errors_in_log = [
            line for line in gw.output if "error" in line.lower() or "Traceback" in line
        ]
        rss = g["rss_kib"]
        third = max(1, len(rss) // 3)
        report = {
            "seconds": g["seconds"],
            "clients": args.clients,
            "gateway_rate": g["rate"],
            "mitmdump_rate": b["rate"],
            "rate_ratio": g["rate"] / b["rate"] if b["rate"] else None,
            "answered": len(g["answered"]),
            "client_errors": g["errors"],
            "client_failures": g["failures"],
            "rows": sum(logged.values()),
            "missing_rows": len(set(g["answered"]) - set(logged)),
            "duplicate_rows": sum(n - 1 for n in logged.values() if n > 1),
            "errors_in_gateway_log": errors_in_log[:20],
            "rss_mib_first_third": max(r for _, r in rss[:third]) / 1024 if rss else None,
            "rss_mib_last_third": max(r for _, r in rss[-third:]) / 1024 if rss else None,
            "rss_curve_mib": [(t, round(r / 1024)) for t, r in rss],
        }
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{report['answered']} requests answered in {report['seconds']:.0f} s "
        f"({report['gateway_rate']:.0f}/s; bare mitmdump {report['mitmdump_rate']:.0f}/s, "
        f"ratio {report['rate_ratio']:.2f}); rows {report['rows']}, missing "
        f"{report['missing_rows']}, duplicated {report['duplicate_rows']}; client errors "
        f"{report['client_errors']}; gateway RSS {report['rss_mib_first_third']:.0f} → "
        f"{report['rss_mib_last_third']:.0f} MiB; error lines "
        f"{len(report['errors_in_gateway_log'])}"
    )
    print(
        "RSS curve (s, MiB):",
        report["rss_curve_mib"][:: max(1, len(report["rss_curve_mib"]) // 20)],
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    ok = (
        report["missing_rows"] == 0
        and report["duplicate_rows"] == 0
        and not report["errors_in_gateway_log"]
        and report["client_errors"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
