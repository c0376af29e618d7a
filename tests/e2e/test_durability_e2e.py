"""The request log holds when things break: the store goes away mid-run, the gateway is killed
with SIGKILL mid-load, it dies between an insert and its checkpoint, the spool is corrupt or
full. Rows are counted exactly against what the clients saw answered."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import threading
import time

import pytest

from egress_guard.requestlog.store import Store, default_dsn
from harness import GatewayProcess, curl, free_port
from support import policy_copy

pytestmark = pytest.mark.slow


@pytest.fixture
def gateway(tmp_path):
    """A gateway factory over one data directory, with the fault switch file wired in."""
    faults = tmp_path / "faults"
    faults.write_text("")
    policies = policy_copy(tmp_path)
    started: list[GatewayProcess] = []

    def make(*args: str) -> GatewayProcess:
        g = GatewayProcess(
            tmp_path / "data",
            policies,
            extra_args=args,
            fault_file=faults,
        ).start()
        started.append(g)
        return g

    make.faults = faults  # type: ignore[attr-defined]
    yield make
    for g in started:
        if g.proc and g.proc.poll() is None:
            g.stop()


def stored_paths(data_dir, prefix: str) -> list[str]:
    store = Store(default_dsn(data_dir))
    try:
        rows = store.query(
            "SELECT path FROM requests WHERE startsWith(path, {p:String})", {"p": prefix}
        )
    finally:
        store.close()
    return [r[0] for r in rows]


class Load:
    """One client sending GETs with unique paths over keep-alive, recording what was answered
    (and when) until stopped or until the proxy goes away. Bounded in count."""

    def __init__(self, proxy_port: int, upstream_port: int, prefix: str, limit: int = 5000):
        self.proxy_port, self.upstream_port, self.prefix, self.limit = (
            proxy_port,
            upstream_port,
            prefix,
            limit,
        )
        self.answered: list[tuple[str, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=10)
        for i in range(self.limit):
            if self.stop.is_set():
                break
            path = f"{self.prefix}{i}"
            try:
                conn.request("GET", f"http://127.0.0.1:{self.upstream_port}{path}")
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                break
            if resp.status == 200:
                self.answered.append((path, time.monotonic()))
        conn.close()

    def run_until(self, answered: int, timeout: float = 60) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while len(self.answered) < answered and time.monotonic() < deadline:
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)


def test_store_unavailable_mid_run_loses_nothing_and_duplicates_nothing(gateway, upstream):
    gw = gateway()
    ok = [
        curl(f"http://127.0.0.1:{upstream.http_port}/before-{i}", gw.proxy).status
        for i in range(10)
    ]
    gateway.faults.write_text("store-down")
    during = [
        curl(f"http://127.0.0.1:{upstream.http_port}/during-{i}", gw.proxy).status
        for i in range(40)
    ]
    time.sleep(1.0)  # several writer rounds fail against the store meanwhile
    spool_files = list((gw.data_dir / "spool").glob("*.seg"))
    assert spool_files and sum(f.stat().st_size for f in spool_files) > 0
    gateway.faults.write_text("")
    after = [
        curl(f"http://127.0.0.1:{upstream.http_port}/after-{i}", gw.proxy).status for i in range(10)
    ]
    assert set(ok + during + after) == {200}  # the proxy never waited on the store
    gw.wait_rows(lambda rs: len([r for r in rs if r["path"].startswith("/after-")]) == 10)
    assert gw.stop() == 0
    for prefix, n in (("/before-", 10), ("/during-", 40), ("/after-", 10)):
        paths = stored_paths(gw.data_dir, prefix)
        assert len(paths) == n and len(set(paths)) == n, prefix


class Blackhole:
    """A hung or firewalled ClickHouse server: accepts connections and never answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while len(self.held) < 1000:  # bounded
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        for s in [*self.held, self.sock]:
            s.close()


def test_a_down_or_hung_clickhouse_server_never_stops_the_proxy_and_loses_nothing(
    gateway, upstream
):
    port = free_port()  # first nothing listens there: a stopped server
    # A read timeout far longer than any client waits: a hung store call must not matter.
    dsn = f"http://default:@127.0.0.1:{port}/default?connect_timeout=1&send_receive_timeout=120"
    # Every response waits for its row on disk, never for the store.
    gw = gateway("--clickhouse", dsn, "--audit-sync", "request")
    assert "UNREACHABLE now" in gw.text()

    def get(i: int) -> int:
        return curl(f"http://127.0.0.1:{upstream.http_port}/down-{i}", gw.proxy).status

    assert [get(i) for i in range(10)] == [200] * 10
    token = (gw.data_dir / "admin-token").read_text().strip()
    audit = gw.admin_call("/api/v1/status", token).json()["audit"]
    assert audit["store_ok"] is False and audit["spool_bytes"] > 0
    refused = gw.admin_call("/api/v1/requests", gw.auditor_token)
    assert refused.status == 503 and "store unavailable" in refused.json()["error"]

    hole = Blackhole(port)  # now the server accepts and never answers
    try:
        deadline = time.monotonic() + 30
        while not hole.held:  # the log writer's next retry connects, then hangs
            assert time.monotonic() < deadline, "the writer never retried"
            time.sleep(0.1)
        assert [get(i) for i in range(10, 30)] == [200] * 20
        assert gw.stop() == 0
    finally:
        hole.close()
    assert "Traceback" not in gw.text()
    # The spool kept every row: the same data directory on a working (embedded) engine
    # replays them, once each.
    gw = gateway()
    gw.wait_rows(lambda rs: len([r for r in rs if r["path"].startswith("/down-")]) == 30)
    assert gw.stop() == 0
    assert sorted(stored_paths(gw.data_dir, "/down-")) == sorted(f"/down-{i}" for i in range(30))


def test_sigkill_mid_load_loses_no_answered_request_in_request_sync_mode(gateway, upstream):
    gw = gateway("--audit-sync", "request")
    load = Load(gw.proxy_port, upstream.http_port, "/sync-")
    load.run_until(answered=200)
    gw.stop(signal.SIGKILL)
    load.finish()
    answered = {p for p, _ in load.answered}
    assert len(answered) >= 200
    gw2 = gateway("--audit-sync", "request")  # restart: the spool is replayed first
    assert gw2.stop() == 0
    stored = stored_paths(gw.data_dir, "/sync-")
    assert len(stored) == len(set(stored))  # nothing twice
    assert answered <= set(stored)  # every answered request is logged
    assert len(set(stored) - answered) <= 1  # at most the one in flight


def test_sigkill_in_batch_mode_loses_at_most_the_last_flush_interval(gateway, upstream):
    gw = gateway()
    load = Load(gw.proxy_port, upstream.http_port, "/batch-")
    load.run_until(answered=300)
    killed_at = time.monotonic()
    gw.stop(signal.SIGKILL)
    load.finish()
    gw2 = gateway()
    assert gw2.stop() == 0
    stored = set(stored_paths(gw.data_dir, "/batch-"))
    lost = [(p, t) for p, t in load.answered if p not in stored]
    # Only rows of the last flush interval (0.5 s, plus the fsync and scheduling) may be lost.
    assert all(killed_at - t < 1.5 for _, t in lost), lost[:5]
    assert len(stored) >= len(load.answered) - len(lost)


def test_crash_between_insert_and_checkpoint_does_not_duplicate(gateway, upstream):
    # Request-sync mode: every answered request's row is on disk before its response, so the
    # only question left is duplicates, not the in-flight window of batch mode.
    gw = gateway("--audit-sync", "request")

    def get(i: int) -> bool:
        return curl(f"http://127.0.0.1:{upstream.http_port}/dup-{i}", gw.proxy).status == 200

    answered = [f"/dup-{i}" for i in range(20) if get(i)]
    assert len(answered) == 20
    gateway.faults.write_text("crash-after-insert")  # the next insert is the last thing it does
    for i in range(20, 60):  # bounded: rows of these requests trigger that insert
        if gw.proc.poll() is not None:
            break
        if get(i):
            answered.append(f"/dup-{i}")
    deadline = time.monotonic() + 20
    while gw.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.proc.poll() == 137, gw.text()
    gateway.faults.write_text("")
    gw2 = gateway()  # replays the batch it had inserted but not checkpointed
    assert gw2.stop() == 0
    paths = stored_paths(gw.data_dir, "/dup-")
    assert len(paths) == len(set(paths)), "a replayed batch was written twice"
    assert set(answered) <= set(paths)  # nothing answered is lost
    assert set(paths) <= {f"/dup-{i}" for i in range(60)}


def test_corrupt_spool_frame_is_skipped_and_the_rest_replayed(gateway, upstream):
    gw = gateway()
    gateway.faults.write_text("store-down")
    for i in range(3):
        for j in range(5):
            curl(f"http://127.0.0.1:{upstream.http_port}/c{i}-{j}", gw.proxy)
        time.sleep(0.7)  # one spool frame per group
    gw.stop(signal.SIGKILL)
    (segment,) = sorted((gw.data_dir / "spool").glob("*.seg"))[-1:]
    data = bytearray(segment.read_bytes())
    data[20] ^= 0xFF  # inside the first frame's payload
    segment.write_bytes(bytes(data))
    gateway.faults.write_text("")
    gw2 = gateway()
    metrics = ""
    import urllib.request

    deadline = time.monotonic() + 20
    while "egress_guard_audit_spool_corrupt_frames_total 1.0" not in metrics:
        assert time.monotonic() < deadline, metrics[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{gw2.metrics_port}/metrics") as r:
            metrics = r.read().decode()
        time.sleep(0.2)
    assert gw2.stop() == 0
    paths = stored_paths(gw.data_dir, "/c")
    assert len(paths) == len(set(paths)) and len(paths) < 15  # the corrupt frame's rows lost
    assert {f"/c2-{j}" for j in range(5)} <= set(paths)  # the frames after it survived
    assert all(p.startswith(("/c0-", "/c1-", "/c2-")) for p in paths)  # nothing garbled


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_spool_full_fails_closed_or_open(gateway, upstream, mode):
    gw = gateway("--spool-max", "4KiB", "--audit-fail", mode)
    gateway.faults.write_text("store-down")
    # The spool (4 KiB) is full after a few dozen rows; how many depends on how the writer's
    # half-second batches fall, so go on until it is (bounded in count and time).
    deadline = time.monotonic() + 60
    for i in range(400):
        last = curl(f"http://127.0.0.1:{upstream.http_port}/full-{i}", gw.proxy)
        if (i >= 60 and mode == "open") or last.status != 200 or time.monotonic() > deadline:
            break
    if mode == "closed":
        assert last.status == 503 and "审计日志不可用" in last.body.decode()
        assert "Audit log unavailable" in last.body.decode()
        assert f"/full-{i}" not in upstream.paths()  # refused, never forwarded
    else:
        assert last.status == 200 and f"/full-{i}" in upstream.paths()
