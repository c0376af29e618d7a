"""The benchmark suite: what the gateway's controls cost, as ratios against bare mitmdump
measured in the same run (A/B rounds interleaved: bare, gateway, bare, gateway, …).

    python tests/benchmarks/run.py            # full run (several minutes)
    python tests/benchmarks/run.py --quick    # under two minutes
    python tests/benchmarks/run.py --out DIR  # where results.json and report.md go

Loopback only; every loop is bounded in count and time. Not part of the test run (a smoke
test checks that the suite starts and writes its report).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "e2e")]

from bench_scan import bench_decoders, bench_matching, form_body  # noqa: E402
from bench_upload import SinkServer, bench_held, held_table, upload  # noqa: E402

from harness import GatewayProcess, Upstream, start_mitmdump  # noqa: E402
from support import POLICIES  # noqa: E402

# --- modes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    rounds: int  # A/B pairs per proxy measurement
    requests: int  # requests per round
    upload_mb: int
    held_mib: tuple[int, ...]  # held text/docx/zip uploads of these sizes
    text_mb: int
    rows: int
    rules: tuple[int, ...]
    deadline: float  # seconds: every loop stops by then


MODES = {
    "full": Mode("full", 3, 400, 100, (1, 32, 100), 20, 300_000, (10, 1_000, 100_000), 900),
    "quick": Mode("quick", 2, 120, 32, (1, 32), 4, 60_000, (10, 1_000, 100_000), 110),
    "smoke": Mode("smoke", 1, 10, 2, (1,), 1, 2_000, (10, 1_000), 60),
}


# --- the exceptions in force while the proxies are measured ----------------------------------

ACTIVE_EXCEPTIONS = 10_000


def seed_exceptions(data_dir: Path, n: int) -> int:
    """``n`` approved exceptions in the gateway's snapshot, as a large company might hold: for
    users, groups and client networks, past blocks and caps, by host and by category — and
    some for the benchmark client's own address (on hosts it never asks for), so its lookups
    find entries and must check them. Returns the number written."""
    from egress_guard.core import exceptions as ex
    from egress_guard.requestlog.exception_snapshot import ExceptionSnapshot, Snapshot

    now = int(time.time() * 1000)
    events = []
    for i in range(n):
        if i % 100 == 0:
            subject = ex.Subject.client("127.0.0.1/32")
        elif i % 5 == 0:
            subject = ex.Subject.group(f"team{i % 300}")
        elif i % 5 == 1:
            subject = ex.Subject.client(f"10.{i // 256 % 256}.{i % 256}.0/24")
        else:
            subject = ex.Subject.user(f"user{i}")
        control = ex.Control.parse("upload") if i % 7 == 0 else ex.BLOCK
        grant = ex.UploadGrant(per_request=50 * 1024 * 1024) if i % 7 == 0 else None
        target = (
            ex.Target.for_category("webmail")
            if i % 11 == 0 and control == ex.BLOCK and subject.kind != "client"
            else ex.Target.for_host(f"site{i}.example.com")
        )
        terms = ex.Terms(subject, control, target, now, now + 30 * ex.DAY, grant)
        events.append(
            ex.Event(
                id=ex.new_event_id(),
                exception_id=f"ex-bench{i:07d}",
                kind="granted",
                ts_ms=now,
                actor="bench.approver",
                actor_roles=("approver",),
                client_ip="10.9.9.9",
                terms=terms,
                reason="benchmark",
                approvals_needed=1,
                decide_by_ms=now + ex.DAY,
            )
        )
    ExceptionSnapshot(data_dir / "exceptions.snapshot").write(
        Snapshot(tuple(events), written_ms=now)
    )
    return len(events)


# --- measuring the proxies ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    """Sequential requests through a proxy, keep-alive or a new connection each time."""

    def __init__(self, proxy_port: int, ca: Path | None):
        self.proxy_port = proxy_port
        self.ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
        self.conn: http.client.HTTPConnection | None = None

    def _conn(self, scheme: str, host: str, port: int, fresh: bool) -> http.client.HTTPConnection:
        if self.conn is not None and not fresh:
            return self.conn
        if self.conn is not None:
            self.conn.close()
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.proxy_port, context=self.ctx, timeout=30
            )
            conn.set_tunnel(host, port)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=30)
        self.conn = conn
        return conn

    def request(
        self,
        scheme: str,
        host: str,
        port: int,
        method: str,
        path: str,
        body: bytes | None = None,
        fresh: bool = False,
        expect: int = 200,
    ) -> float:
        conn = self._conn(scheme, host, port, fresh)
        target = path if scheme == "https" else f"http://{host}:{port}{path}"
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        t0 = time.perf_counter()
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        elapsed = time.perf_counter() - t0
        if resp.status != expect:
            raise RuntimeError(f"{method} {scheme}://{host}{path}: {resp.status}")
        if fresh:
            conn.close()
            self.conn = None
        return elapsed

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def summarize(latencies: list[float], cpu: float) -> dict:
    ordered = sorted(latencies)

    def q(x: float) -> float:
        return ordered[min(len(ordered) - 1, int(x * len(ordered)))] * 1000

    return {
        "requests_per_s": len(latencies) / sum(latencies),
        "p50_ms": q(0.5),
        "p95_ms": q(0.95),
        "p99_ms": q(0.99),
        "cpu_ms_per_request": cpu / len(latencies) * 1000,
    }


@dataclass
class Target:
    name: str
    port: int
    pid: int
    ca: Path | None


def run_case(
    target: Target,
    n: int,
    scheme: str,
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    fresh: bool,
    expect: int,
    deadline: float,
) -> dict:
    client = Client(target.port, target.ca)
    client.request(scheme, host, port, method, path, body, fresh, expect)  # warm-up
    cpu0 = cpu_seconds(target.pid)
    latencies = []
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        latencies.append(client.request(scheme, host, port, method, path, body, fresh, expect))
    client.close()
    return summarize(latencies, cpu_seconds(target.pid) - cpu0)


def bench_proxies(mode: Mode, tmp: Path, deadline: float) -> dict:
    (tmp / "up").mkdir()
    upstream = Upstream(tmp / "up").start()
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "uploads.yaml").write_text(
        "uploads:\n  per_request: 1GiB\n  per_user: 1000GiB\n  window: 24h\n"
    )
    exceptions = seed_exceptions(tmp / "gw", ACTIVE_EXCEPTIONS)
    gw = GatewayProcess(tmp / "gw", policies, upstream.ca_path).start()
    bare, bare_port = start_mitmdump(
        tmp / "mitm",
        extra=(
            "--set",
            f"ssl_verify_upstream_trusted_ca={upstream.ca_path}",
            "--set",
            "block_list=/~d mail.qq.com/403",
        ),
    )
    targets = {
        "mitmdump": Target("mitmdump", bare_port, bare.pid, tmp / "mitm" / "mitmproxy-ca-cert.pem"),
        "gateway": Target("gateway", gw.proxy_port, gw.proc.pid, gw.ca_pem()),
    }
    up = upstream

    def case(
        scheme: str,
        host: str,
        port: int,
        method: str = "GET",
        path: str = "/small",
        body: bytes | None = None,
        fresh: bool = False,
        expect: int = 200,
    ) -> tuple:
        return (scheme, host, port, method, path, body, fresh, expect)

    cases = {
        "http_get_keepalive": case("http", "127.0.0.1", up.http_port),
        "https_get_keepalive": case("https", "127.0.0.1", up.https_port),
        "https_get_new_connection": case("https", "127.0.0.1", up.https_port, fresh=True),
        "form_post_1k": case(
            "http", "127.0.0.1", up.http_port, "POST", "/form", form_body(1_000, 2)
        ),
        "form_post_100k": case(
            "http", "127.0.0.1", up.http_port, "POST", "/form", form_body(100_000, 3)
        ),
        "blocked_request": case("http", "mail.qq.com", 80, expect=403),
    }
    results: dict = {"active_exceptions": exceptions}
    try:
        for case, args in cases.items():
            rounds = []
            for _ in range(mode.rounds):
                pair = {
                    name: run_case(t, mode.requests, *args, deadline=deadline)
                    for name, t in targets.items()
                }
                pair["ratio_requests_per_s"] = (
                    pair["gateway"]["requests_per_s"] / pair["mitmdump"]["requests_per_s"]
                )
                pair["ratio_p50"] = pair["gateway"]["p50_ms"] / pair["mitmdump"]["p50_ms"]
                rounds.append(pair)
            results[case] = {
                "rounds": rounds,
                "median_ratio_requests_per_s": statistics.median(
                    r["ratio_requests_per_s"] for r in rounds
                ),
                "median_ratio_p50": statistics.median(r["ratio_p50"] for r in rounds),
            }
        # A blocked CONNECT: TLS terminated by the gateway, block page inside (gateway only;
        # bare mitmdump would connect to the blocked site).
        results["blocked_connect"] = run_case(
            targets["gateway"],
            mode.requests,
            "https",
            "pan.baidu.com",
            443,
            "GET",
            "/",
            None,
            True,
            403,
            deadline,
        )
        sink = SinkServer()
        size = mode.upload_mb * 1024 * 1024
        pairs = []
        for _ in range(mode.rounds):
            b = upload(bare_port, sink.port, size, 300, bare.pid)
            g = upload(gw.proxy_port, sink.port, size, 300, gw.proc.pid)
            pairs.append({"mitmdump": b, "gateway": g, "ratio_mb_s": g["mb_per_s"] / b["mb_per_s"]})
        results["large_upload"] = {"size_mb": mode.upload_mb, "rounds": pairs}
    finally:
        gw.stop()
        bare.terminate()
        bare.wait(30)
        upstream.stop()
    return results


# --- blocklist lookup scaling ----------------------------------------------------------------


def bench_lookup(rule_counts: tuple[int, ...], requests: int) -> dict:
    from mitmproxy import options
    from mitmproxy.addons.blocklist import BlockList
    from mitmproxy.test import taddons, tflow

    from egress_guard.core.blocklist import HostIndex, Reason, Rule

    hosts = [
        "www.unlisted-site.org",
        "a.b.svc5.example5.com",
        "cdn.static.example.net",
        "mail.qq.com",
    ]
    out: dict = {}
    for n in rule_counts:
        index = HostIndex.build(
            [
                Rule(f"r.{i}", "c", "block", Reason("", ""), hosts=(f"svc{i}.example{i % 97}.com",))
                for i in range(n)
            ]
        )
        t0 = time.perf_counter()
        for i in range(requests):
            index.lookup(hosts[i % len(hosts)], "/index.html")
        ours = (time.perf_counter() - t0) / requests * 1e6
        row = {"egress_guard_us": ours}
        if n <= 10_000:  # block_list compiles one flow filter per rule; 100 000 takes minutes
            with taddons.context(BlockList(), options=options.Options()) as tctx:
                addon = tctx.master.addons.get("blocklist")
                tctx.configure(
                    addon, block_list=[f"/~d svc{i}.example{i % 97}.com/403" for i in range(n)]
                )
                flows = []
                for h in hosts:
                    f = tflow.tflow()
                    f.request.host = h
                    flows.append(f)
                count = max(20, requests // max(1, n // 10))
                t0 = time.perf_counter()
                for i in range(count):
                    f = flows[i % len(flows)]
                    f.response = None
                    addon.request(f)
                row["mitmproxy_block_list_us"] = (time.perf_counter() - t0) / count * 1e6
        out[str(n)] = row
    return out


# --- the log pipeline --------------------------------------------------------------------------


def bench_log_pipeline(rows: int, tmp: Path) -> dict:
    from datetime import UTC, datetime

    from egress_guard.requestlog.auditlog import AuditLog, RequestRow
    from egress_guard.requestlog.spool import Spool
    from egress_guard.requestlog.store import Store, default_dsn

    store = Store(default_dsn(tmp / "pipeline"))
    store.migrate()
    log = AuditLog(store.insert_requests, Spool(tmp / "spool"), max_queue=rows + 1)
    now = datetime.now(UTC)
    batch = [
        RequestRow(
            ts=now,
            request_id=f"r{i}",
            user=f"user{i % 500}",
            host=f"host{i % 2000}.example.com",
            path="/p",
            method="GET",
            status=200,
            decision="allow",
        )
        for i in range(rows)
    ]
    log.start()
    t0 = time.perf_counter()
    submit_t0 = time.perf_counter()
    for row in batch:
        log.submit(row)
    submit_s = time.perf_counter() - submit_t0
    log.close(timeout=300)
    seconds = time.perf_counter() - t0
    (count,) = store.query("SELECT count() FROM requests")[0]
    store.close()
    return {
        "rows": rows,
        "written": int(count),
        "rows_per_s": rows / seconds,
        "submit_us_per_row": submit_s / rows * 1e6,
        "dropped": log.dropped,
    }


# --- report ----------------------------------------------------------------------------------


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    import mitmproxy.version

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_mib": mem,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "system": platform.platform(),
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# egress-guard benchmark ({results['mode']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB, Python "
        f"{m['python']}, mitmproxy {m['mitmproxy']}. Started {results['started']}, "
        f"{results['seconds']:.0f} s. Ratios are gateway / bare mitmdump, same run.",
        "",
    ]
    px = results.get("proxies", {})
    if px:
        lines += [
            "## Through the proxy",
            "",
            "| case | gateway req/s | mitmdump req/s | ratio req/s (goal ≥ 0.90) | gateway "
            "p50/p95/p99 ms | mitmdump p50 ms | ratio p50 (goal ≤ 1.10) | gateway CPU ms/req |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case, r in px.items():
            if case in ("blocked_connect", "large_upload", "active_exceptions"):
                continue
            last = r["rounds"][-1]
            g, b = last["gateway"], last["mitmdump"]
            lines.append(
                f"| {case} | {g['requests_per_s']:.0f} | {b['requests_per_s']:.0f} | "
                f"{r['median_ratio_requests_per_s']:.2f} | {g['p50_ms']:.2f}/"
                f"{g['p95_ms']:.2f}/{g['p99_ms']:.2f} | {b['p50_ms']:.2f} | "
                f"{r['median_ratio_p50']:.2f} | {g['cpu_ms_per_request']:.2f} |"
            )
        lines += ["", f"With {px.get('active_exceptions', 0)} exceptions in force."]
        bc = px.get("blocked_connect")
        if bc:
            lines += [
                "",
                f"Blocked CONNECT (TLS terminated by the gateway, block page inside, new "
                f"connection each): {bc['requests_per_s']:.0f} req/s, p50 "
                f"{bc['p50_ms']:.2f} ms.",
            ]
        lu = px.get("large_upload")
        if lu:
            for r in lu["rounds"]:
                lines.append(
                    f"Upload of {lu['size_mb']} MiB: gateway {r['gateway']['mb_per_s']:.0f}"
                    f" MB/s, mitmdump {r['mitmdump']['mb_per_s']:.0f} MB/s, ratio "
                    f"{r['ratio_mb_s']:.2f}; gateway RSS +"
                    f"{(r['gateway']['rss_peak_kib'] - r['gateway']['rss_start_kib']) / 1024:.0f}"
                    " MiB."
                )
    held = results.get("held_uploads")
    if held:
        lines += [
            "",
            "## Held uploads (text, docx, zip): held until scanned, then forwarded",
            "",
            *held_table(held),
        ]
    lk = results.get("lookup")
    if lk:
        lines += [
            "",
            "## Blocklist lookup (µs per request, in process)",
            "",
            "| rules | egress-guard suffix map | mitmproxy block_list |",
            "|---|---|---|",
        ]
        for n, r in lk.items():
            bl = r.get("mitmproxy_block_list_us")
            lines.append(
                f"| {n} | {r['egress_guard_us']:.2f} | "
                f"{f'{bl:.1f}' if bl is not None else 'not run (minutes to compile)'} |"
            )
    sc = results.get("scanning")
    if sc:
        mt = sc["matching"]
        lines += [
            "",
            "## Marker scanning",
            "",
            f"Scanning path {mt['scan_path_mb_s']:.0f} MB/s vs bare Automaton.iter "
            f"{mt['bare_iter_mb_s']:.0f} MB/s ({mt['markers']} markers): ratio "
            f"{mt['ratio']:.2f} (goal ≥ 0.80).",
            "",
            "Decoders, MB/s of body: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sc["decoders_mb_s"].items()),
        ]
    lp = results.get("log_pipeline")
    if lp:
        lines += [
            "",
            "## Log pipeline (embedded store)",
            "",
            f"{lp['rows']} rows: {lp['rows_per_s']:.0f} rows/s sustained (goal ≥ 20 000), "
            f"{lp['submit_us_per_row']:.2f} µs per row on the proxy's side, "
            f"{lp['written']} written, {lp['dropped']} dropped.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run under two minutes")
    ap.add_argument("--smoke", action="store_true", help="seconds: checks the suite runs")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    start = time.monotonic()
    deadline = start + mode.deadline
    results: dict = {
        "mode": mode.name,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    tmp = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    try:
        results["proxies"] = bench_proxies(mode, tmp, deadline)
        results["held_uploads"] = bench_held(list(mode.held_mib), tmp)
        results["lookup"] = bench_lookup(mode.rules, 20_000 if mode.name != "smoke" else 1_000)
        results["scanning"] = {
            "matching": bench_matching(mode.text_mb * 1_000_000, 2 if mode.name != "full" else 5),
            "decoders_mb_s": bench_decoders(1 if mode.name != "full" else 3),
        }
        results["log_pipeline"] = bench_log_pipeline(mode.rows, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = time.monotonic() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (args.out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
