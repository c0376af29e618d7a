"""Upload benchmark: what holding bodies until their verdict costs, against bare mitmdump in the
same run (A/B interleaved).

    python tests/benchmarks/bench_upload.py [--size 2GiB] [--rounds 1] [--json out.json]
    python tests/benchmarks/bench_upload.py --held [--sizes 1,32,100] [--json out.json]

The first form: peak RSS of the gateway during one large upload, and its throughput. The
second: text, docx and zip uploads of each size, held by the gateway (memory, then a private
file), decoded and scanned whole, then forwarded: upload MB/s, the latency the hold adds
(client sends its first byte → gets its answer, gateway minus mitmdump), and the memory curve
of the gateway and its scan workers. Loopback only; every loop is bounded by the upload size
and a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "e2e")]

from egress_guard.core.units import format_size, parse_size  # noqa: E402
from harness import GatewayProcess, start_mitmdump  # noqa: E402
from support import POLICIES  # noqa: E402

CHUNK = os.urandom(1024 * 1024)  # incompressible, like the files people upload


class SinkServer:
    """Reads request bodies (Content-Length) and discards them; answers 200 with the count."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            lengths = [
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            length = lengths[0] if lengths else 1 << 62  # chunked: read until cut
            got = len(rest)
            while got < length:
                data = conn.recv(1 << 20)
                if not data:
                    return
                got += len(data)
            body = str(got).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started (the gateway's scan workers)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def upload(
    proxy_port: int,
    sink_port: int,
    size: int,
    timeout: float,
    pid: int,
    body: bytes | None = None,
    content_type: str = "application/octet-stream",
) -> dict:
    """POST ``size`` bytes (``body``, else incompressible bytes) through the proxy; sample the
    proxy's RSS, and its workers', every 50 ms while it runs (the memory curve)."""
    start_rss = rss_kib(pid)
    curve: list[tuple[float, int, int]] = []  # (seconds, proxy KiB, workers KiB)
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.05):
            workers = sum(rss_kib(c) for c in children_of(pid))
            curve.append((time.perf_counter() - t0, rss_kib(pid), workers))

    threading.Thread(target=sample, daemon=True).start()
    head = (
        f"POST http://127.0.0.1:{sink_port}/sink HTTP/1.1\r\nHost: 127.0.0.1:{sink_port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as s:
        s.sendall(head)
        if body is not None:
            s.sendall(body)
        else:
            sent = 0
            while sent < size:
                n = min(len(CHUNK), size - sent)
                s.sendall(CHUNK[:n])
                sent += n
        answer = s.recv(4096)
    seconds = time.perf_counter() - t0
    done.set()
    end_rss = rss_kib(pid)
    return {
        "seconds": seconds,
        "mb_per_s": size / seconds / 1e6,
        "status": answer[9:12].decode(),
        "rss_start_kib": start_rss,
        "rss_peak_kib": max([end_rss] + [p for _, p, _ in curve]),
        "workers_peak_kib": max([0] + [w for _, _, w in curve]),
        "curve": curve[:: max(1, len(curve) // 20)],  # about 20 points
    }


# --- held uploads: text, docx, zip ------------------------------------------------------------


def held_body(kind: str, size: int) -> tuple[bytes, str]:
    """A clean upload of about ``size`` bytes: plain text, a docx whose bulk is an embedded
    picture (stored), or a zip of binary files (stored) — what people upload."""
    import random
    import zipfile
    from io import BytesIO

    rng = random.Random(size)
    if kind == "text":
        words = ["季度", "销售", "数据", "汇总", "会议", "纪要", "项目", "进度", "report", "plan"]
        line = " ".join(rng.choice(words) for _ in range(30)) + "\n"
        text = (line * (size // len(line.encode()) + 1)).encode()[:size]
        return text, "text/plain; charset=utf-8"
    out = BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        if kind == "docx":
            z.writestr("[Content_Types].xml", "<Types/>")
            z.writestr(
                "word/document.xml",
                "<w:document><w:body><w:p><w:t>季度报告</w:t></w:p></w:body></w:document>",
                zipfile.ZIP_DEFLATED,
            )
            z.writestr("word/media/image1.png", b"\x89PNG\r\n\x1a\n" + rng.randbytes(size))
        else:
            for i in range(max(1, size // (4 << 20))):
                z.writestr(f"data/part{i}.bin", rng.randbytes(min(4 << 20, size)))
    content_type = (
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        if kind == "docx"
        else "application/zip"
    )
    return out.getvalue(), content_type


def held_policies(tmp: Path, max_body: int) -> Path:
    """The shipped policy, with the caps and the scanner's limits raised so bodies of every
    size measured are held and decoded whole (by default a body over 32 MiB is unscannable and
    refused)."""
    policies = tmp / "policies-held"
    shutil.copytree(POLICIES, policies)
    (policies / "uploads.yaml").write_text(
        "uploads:\n  per_request: unlimited\n  per_user: unlimited\n  window: 24h\n"
    )
    markers = policies / "markers.yaml"
    mb = max_body // (1 << 20)
    text = markers.read_text().replace("max_body: 32MiB", f"max_body: {mb}MiB")
    markers.write_text(text.replace("max_expanded: 64MiB", f"max_expanded: {4 * mb}MiB"))
    return policies


def bench_held(sizes_mib: list[int], tmp: Path, timeout: float = 300) -> dict:
    """Held uploads (text, docx, zip × sizes) through the gateway and bare mitmdump."""
    sink = SinkServer()
    policies = held_policies(tmp, (max(sizes_mib) + 8) << 20)
    gw = GatewayProcess(tmp / "data-held", policies).start()
    bare, bare_port = start_mitmdump(tmp / "mitm-held")
    cases = []
    try:
        for kind in ("text", "docx", "zip"):
            for mib in sizes_mib:
                body, ctype = held_body(kind, mib << 20)
                b = upload(bare_port, sink.port, len(body), timeout, bare.pid, body, ctype)
                g = upload(gw.proxy_port, sink.port, len(body), timeout, gw.proc.pid, body, ctype)
                cases.append(
                    {
                        "kind": kind,
                        "size_mib": mib,
                        "mitmdump": b,
                        "gateway": g,
                        "ratio_mb_s": g["mb_per_s"] / b["mb_per_s"],
                        "added_ms": (g["seconds"] - b["seconds"]) * 1000,
                    }
                )
    finally:
        gw.stop()
        bare.terminate()
        bare.wait(30)
    return {"cases": cases}


def held_table(result: dict) -> list[str]:
    lines = [
        "| body | gateway MB/s | mitmdump MB/s | ratio | added latency | gateway RSS peak "
        "(start) | scan workers RSS peak | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        g, b = c["gateway"], c["mitmdump"]
        lines.append(
            f"| {c['kind']} {c['size_mib']} MiB | {g['mb_per_s']:.0f} | {b['mb_per_s']:.0f} | "
            f"{c['ratio_mb_s']:.2f} | {c['added_ms']:.0f} ms | "
            f"{g['rss_peak_kib'] / 1024:.0f} MiB ({g['rss_start_kib'] / 1024:.0f}) | "
            f"{g['workers_peak_kib'] / 1024:.0f} MiB | {g['status']} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--held", action="store_true", help="text/docx/zip held uploads instead")
    ap.add_argument("--sizes", default="1,32,100", help="MiB, for --held")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    if args.held:
        try:
            result = bench_held([int(x) for x in args.sizes.split(",")], tmp, args.timeout)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print("\n".join(held_table(result)))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    size = parse_size(args.size)
    sink = SinkServer()
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    # The override that allows this upload; a second host keeps the default cap to measure a
    # refusal mid-stream.
    (policies / "uploads.yaml").write_text(
        "uploads:\n  per_request: 10MiB\n  per_user: 200MiB\n  window: 24h\n  overrides:\n"
        "    - {id: uploads.bench, exact_hosts: [127.0.0.1], per_request: unlimited,"
        " per_user: unlimited}\n"
    )
    # ... and, like any trusted destination for big files, one the marker scan may only log
    # as unscannable (bodies over max_body cannot be decoded whole).
    markers = (
        (policies / "markers.yaml")
        .read_text()
        .replace(
            "  overrides: []",
            "  overrides:\n    - id: markers.bench-sink\n"
            "      exact_hosts: [127.0.0.1]\n      unscannable: log",
        )
    )
    (policies / "markers.yaml").write_text(markers)
    gw = GatewayProcess(tmp / "data", policies).start()
    bare, bare_port = start_mitmdump(tmp / "mitm")
    results: dict = {
        "size_bytes": size,
        "rounds": [],
        "machine": os.uname().machine,
        "cpus": os.cpu_count(),
    }
    try:
        for _ in range(args.rounds):
            b = upload(bare_port, sink.port, size, args.timeout, bare.pid)
            g = upload(gw.proxy_port, sink.port, size, args.timeout, gw.proc.pid)
            results["rounds"].append(
                {"mitmdump": b, "gateway": g, "throughput_ratio": g["mb_per_s"] / b["mb_per_s"]}
            )
        # Refused mid-stream: Content-Length unknown to the cap (localhost has the default).
        refused = upload_refused(gw.proxy_port, sink.port, size, args.timeout, gw.proc.pid)
        results["refused_midstream"] = refused
    finally:
        gw.stop()
        bare.terminate()
        bare.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results["rounds"]:
        g, b = r["gateway"], r["mitmdump"]
        print(
            f"upload {format_size(size)}: gateway {g['mb_per_s']:.0f} MB/s, mitmdump "
            f"{b['mb_per_s']:.0f} MB/s, ratio {r['throughput_ratio']:.2f}; gateway RSS "
            f"{g['rss_start_kib'] / 1024:.0f} → peak {g['rss_peak_kib'] / 1024:.0f} MiB "
            f"(+{(g['rss_peak_kib'] - g['rss_start_kib']) / 1024:.0f} MiB), mitmdump RSS "
            f"{b['rss_start_kib'] / 1024:.0f} → {b['rss_peak_kib'] / 1024:.0f} MiB"
        )
    ref = results["refused_midstream"]
    print(
        f"refused mid-stream (chunked, 10 MiB cap): status {ref['status']} after "
        f"{format_size(ref['sent_before_answer'])} sent, connection closed after "
        f"{format_size(ref['sent_until_closed'])}, gateway RSS "
        f"{ref['rss_start_kib'] / 1024:.0f} → peak {ref['rss_peak_kib'] / 1024:.0f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def upload_refused(proxy_port: int, sink_port: int, size: int, timeout: float, pid: int) -> dict:
    """A chunked upload to a capped host: the gateway cuts it at the cap and answers 413."""
    start = rss_kib(pid)
    peak = [start]
    head = (
        f"POST http://localhost:{sink_port}/sink HTTP/1.1\r\nHost: localhost:{sink_port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
    sent = [0]
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as s:
        s.sendall(head)

        def send() -> None:
            try:
                while sent[0] < size:
                    s.sendall(chunk)
                    sent[0] += len(CHUNK)
                    peak[0] = max(peak[0], rss_kib(pid))
            except OSError:
                pass  # the gateway closed: expected once it has answered

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = s.recv(4096)
        at_answer = sent[0]
        sender.join(timeout)
    return {
        "status": answer[9:12].decode() or "closed",
        "sent_before_answer": at_answer,
        "sent_until_closed": sent[0],
        "rss_start_kib": start,
        "rss_peak_kib": max(peak[0], rss_kib(pid)),
    }


if __name__ == "__main__":
    main()
