"""Marker-scanning benchmark.

    python tests/benchmarks/bench_scan.py [--quick] [--json out.json]

1. The scanning path (decode UTF-8 + normalize + match) against pyahocorasick's bare ``iter``
   over the same already-decoded text, with a 200-marker policy (goal: ≥ 80 %).
2. MB/s per decoder (plain, gzip, base64-in-JSON, docx, PDF).
3. Through the real gateway vs bare mitmdump, A/B interleaved: median latency of a 100 KB form
   POST (goal: < 1 ms added), and the p99 of small GETs while 10 MiB uploads are being
   scanned vs without them (goal: ≤ 1.5×).

Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "e2e")]

import ahocorasick  # noqa: E402

from documents import docx, pdf  # noqa: E402
from egress_guard.core.policy import load_policy  # noqa: E402
from egress_guard.core.scan import Marker, MarkerSet, scan_body  # noqa: E402
from harness import GatewayProcess, Upstream, start_mitmdump  # noqa: E402
from support import POLICIES  # noqa: E402

COMMON = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能"
    "下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量"
    "都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各"
)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "report",
    "quarterly",
    "revenue",
    "meeting",
    "plan",
    "budget",
    "forecast",
    "draft",
]


def sample_text(size: int, seed: int = 7) -> str:
    rnd = random.Random(seed)
    parts: list[str] = []
    n = 0
    while n < size:
        piece = "".join(rnd.choice(COMMON) for _ in range(rnd.randint(4, 20)))
        piece += "，" if rnd.random() < 0.7 else "。\n"
        if rnd.random() < 0.2:
            piece += " " + " ".join(rnd.choice(WORDS) for _ in range(5)) + " "
        parts.append(piece)
        n += len(piece.encode())
    return "".join(parts)


def best_rate(nbytes: int, fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e6


def bench_matching(size: int, runs: int) -> dict:
    policy = load_policy(POLICIES).markers
    shipped = policy.markers.markers
    extra = tuple(
        Marker(f"corp.project.{i}", "project", "alert", (f"项目代号{chr(0x4E00 + i * 37)}{i}",))
        for i in range(200 - len(shipped))
    )
    markers = MarkerSet(shipped + extra, policy.markers.suppress)
    patterns = [p.lower() for m in markers.markers for p in m.patterns]
    bare = ahocorasick.Automaton()
    for i, p in enumerate(patterns):
        bare.add_word(p, i)
    bare.make_automaton()
    raw = sample_text(size).encode()
    decoded = raw.decode()
    bare_rate = best_rate(len(raw), lambda: sum(1 for _ in bare.iter(decoded)), runs)
    ours_rate = best_rate(len(raw), lambda: markers.find_utf8(raw), runs)
    return {
        "markers": len(markers.markers),
        "text_mb": len(raw) / 1e6,
        "bare_iter_mb_s": bare_rate,
        "scan_path_mb_s": ours_rate,
        "ratio": ours_rate / bare_rate,
    }


def bench_decoders(runs: int) -> dict:
    policy = load_policy(POLICIES).markers
    text = sample_text(2_000_000, seed=11)
    raw = text.encode()
    document = docx(text[:300_000], header="正文", split_runs=False)
    bodies = {
        "plain": (raw, "text/plain; charset=utf-8", ""),
        "gzip": (gzip.compress(raw), "text/plain; charset=utf-8", "gzip"),
        "base64-json": (
            json.dumps({"attachment": base64.b64encode(raw).decode()}).encode(),
            "application/json",
            "",
        ),
        "docx": (document, "application/octet-stream", ""),
        "pdf": (
            pdf([f"Quarterly report line {i}" for i in range(30)] * 20),
            "application/pdf",
            "",
        ),
    }
    out = {}
    for name, (body, ctype, enc) in bodies.items():
        out[name] = best_rate(
            len(body),
            lambda b=body, c=ctype, e=enc: scan_body(policy.markers, b, c, e, policy.limits),
            runs,
        )
    return out


# --- through the proxies ------------------------------------------------------------------


def timed_request(
    proxy_port: int, method: str, url: str, body: bytes | None = None, headers: dict | None = None
) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=60)
    t0 = time.perf_counter()
    conn.request(method, url, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    elapsed = time.perf_counter() - t0
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{method} {url}: {resp.status}")
    return elapsed


def form_body(size: int, seed: int) -> bytes:
    """A url-encoded form of Chinese and English text, ``size`` bytes long."""
    fields = {"subject": "周报", "content": sample_text(size, seed=seed)}
    return urlencode(fields).encode()[:size]


def form_latencies(proxy_port: int, upstream_port: int, n: int) -> list[float]:
    body = form_body(100_000, 3)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return [
        timed_request(proxy_port, "POST", f"http://127.0.0.1:{upstream_port}/form", body, headers)
        for _ in range(n)
    ]


def get_latencies(proxy_port: int, upstream_port: int, n: int) -> list[float]:
    return [
        timed_request(proxy_port, "GET", f"http://127.0.0.1:{upstream_port}/small")
        for _ in range(n)
    ]


def gets_during_uploads(
    proxy_port: int, upstream_port: int, body: Path, n: int, uploads: int
) -> tuple[list[float], int]:
    """Small GETs timed while 10 MiB uploads go through the same proxy. The uploads run in
    curl processes: they must not share this process's GIL with the GETs being timed."""
    stop = threading.Event()
    done = [0]

    def upload_loop() -> None:
        while not stop.is_set() and done[0] < uploads:
            subprocess.run(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "60",
                    "-x",
                    f"http://127.0.0.1:{proxy_port}",
                    "--data-binary",
                    f"@{body}",
                    "-H",
                    "Content-Type: text/plain; charset=utf-8",
                    f"http://127.0.0.1:{upstream_port}/big",
                ],
                check=False,
            )
            done[0] += 1

    uploader = threading.Thread(target=upload_loop, daemon=True)
    uploader.start()
    time.sleep(0.2)
    busy = get_latencies(proxy_port, upstream_port, n)
    stop.set()
    uploader.join(120)
    return busy, done[0]


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_proxy(rounds: int, n: int, uploads: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    upstream = Upstream(tmp / "up")
    (tmp / "up").mkdir()
    upstream.start()
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "uploads.yaml").write_text("uploads:\n  per_request: 64MiB\n  per_user: 100GiB\n")
    gw = GatewayProcess(tmp / "data", policies).start()
    bare, bare_port = start_mitmdump(tmp / "mitm")
    result: dict = {"form_100k": [], "small_get_p99": {}}
    try:
        for port in (bare_port, gw.proxy_port):  # warm-up
            form_latencies(port, upstream.http_port, 5)
        for _ in range(rounds):
            b = form_latencies(bare_port, upstream.http_port, n)
            g = form_latencies(gw.proxy_port, upstream.http_port, n)
            result["form_100k"].append(
                {
                    "mitmdump_median_ms": statistics.median(b) * 1000,
                    "gateway_median_ms": statistics.median(g) * 1000,
                    "added_ms": (statistics.median(g) - statistics.median(b)) * 1000,
                }
            )
        big = tmp / "big.txt"
        big.write_bytes(sample_text(10 * 1024 * 1024, seed=5).encode())
        for name, port in (("mitmdump", bare_port), ("gateway", gw.proxy_port)):
            quiet = get_latencies(port, upstream.http_port, n)
            busy, count = gets_during_uploads(port, upstream.http_port, big, n, uploads)
            result["small_get_p99"][name] = {
                "quiet_ms": p(quiet, 0.99) * 1000,
                "busy_ms": p(busy, 0.99) * 1000,
                "uploads": count,
            }
        g, b = result["small_get_p99"]["gateway"], result["small_get_p99"]["mitmdump"]
        g["busy_over_quiet"] = g["busy_ms"] / g["quiet_ms"]
        g["busy_over_mitmdump_busy"] = g["busy_ms"] / b["busy_ms"]
    finally:
        gw.stop()
        bare.terminate()
        bare.wait(30)
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size, runs, rounds, n, uploads = (
        (4_000_000, 3, 1, 60, 4) if args.quick else (20_000_000, 5, 3, 200, 12)
    )
    report = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    report["matching"] = m = bench_matching(size, runs)
    print(
        f"scan path {m['scan_path_mb_s']:.0f} MB/s vs bare iter {m['bare_iter_mb_s']:.0f} "
        f"MB/s over {m['text_mb']:.0f} MB, {m['markers']} markers: ratio {m['ratio']:.2f} "
        "(goal ≥ 0.80)"
    )
    report["decoders_mb_s"] = d = bench_decoders(runs)
    print("decoders (MB/s of body): " + ", ".join(f"{k} {v:.1f}" for k, v in d.items()))
    report["proxy"] = px = bench_proxy(rounds, n, uploads)
    for r in px["form_100k"]:
        print(
            f"100 KB form POST median: gateway {r['gateway_median_ms']:.2f} ms, mitmdump "
            f"{r['mitmdump_median_ms']:.2f} ms, added {r['added_ms']:.2f} ms (goal < 1 ms)"
        )
    for name, g in px["small_get_p99"].items():
        print(
            f"small GET p99 through {name}: {g['quiet_ms']:.2f} ms quiet, {g['busy_ms']:.2f} ms "
            f"while {g['uploads']} × 10 MiB uploads went through"
        )
    g = px["small_get_p99"]["gateway"]
    print(
        f"  gateway busy/quiet {g['busy_over_quiet']:.2f} (goal ≤ 1.5); gateway busy / "
        f"mitmdump busy {g['busy_over_mitmdump_busy']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
