"""Upload benchmark: peak RSS of the gateway during a large streamed upload, and the upload
throughput as a ratio to bare mitmdump measured in the same run (A/B interleaved).

    python tests/benchmarks/bench_upload.py [--size 2GiB] [--rounds 1] [--json out.json]

Loopback only; every loop is bounded by the upload size and a timeout.
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


def upload(proxy_port: int, sink_port: int, size: int, timeout: float, pid: int) -> dict:
    """POST ``size`` bytes through the proxy; sample the proxy's RSS while it streams."""
    peak = [rss_kib(pid)]
    start_rss = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_kib(pid))

    threading.Thread(target=sample, daemon=True).start()
    head = (
        f"POST http://127.0.0.1:{sink_port}/sink HTTP/1.1\r\nHost: 127.0.0.1:{sink_port}\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as s:
        s.sendall(head)
        sent = 0
        while sent < size:
            n = min(len(CHUNK), size - sent)
            s.sendall(CHUNK[:n])
            sent += n
        answer = s.recv(4096)
    seconds = time.perf_counter() - t0
    done.set()
    return {
        "seconds": seconds,
        "mb_per_s": size / seconds / 1e6,
        "status": answer[9:12].decode(),
        "rss_start_kib": start_rss,
        "rss_peak_kib": max(peak[0], rss_kib(pid)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = parse_size(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-upload-"))
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
        f"{format_size(ref['sent_before_answer'])} sent, gateway RSS "
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
        sender.join(timeout)
    return {
        "status": answer[9:12].decode() or "closed",
        "sent_before_answer": sent[0],
        "rss_start_kib": start,
        "rss_peak_kib": max(peak[0], rss_kib(pid)),
    }


if __name__ == "__main__":
    main()
