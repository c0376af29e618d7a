"""Real parts for end-to-end tests: a loopback upstream (HTTP and HTTPS) that records what
reaches it, the gateway as a subprocess on free ports, and curl as the client."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from egress_guard.console.accounts import AccountBook, accounts_path
from support import POLICIES

PAYLOAD = random.Random(20261121).randbytes(300_000)  # what GET /payload serves
READY_LINE = "egress-guard ready"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- upstream --------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    host: str
    body_sha256: str
    body_len: int
    complete: bool = True  # False: the body ended before its announced end (a cut upload)


def _read_body(rfile: Any, headers: Any) -> tuple[bytes, bool]:
    """The request body as it arrived, and whether it arrived whole."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        parts = []
        while True:
            line = rfile.readline()
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                return b"".join(parts), False  # connection cut inside the body
            if size == 0:
                rfile.readline()
                return b"".join(parts), True
            chunk = rfile.read(size)
            parts.append(chunk)
            if len(chunk) < size:
                return b"".join(parts), False
            rfile.readline()
    length = int(headers.get("Content-Length") or 0)
    body = rfile.read(length) if length else b""
    return body, len(body) == length


@dataclass
class Upstream:
    """HTTP + HTTPS servers on a loopback address that record every request (and every
    connection) that reaches them."""

    tmp: Path
    host: str = "127.0.0.1"
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    http_port: int = 0
    https_port: int = 0
    ca_path: Path = Path()
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    def _write_cert(self) -> Path:
        from mitmproxy import certs

        ca_store = certs.CertStore.from_store(self.tmp / "upstream-ca", "upstream", 2048)
        self.ca_path = self.tmp / "upstream-ca" / "upstream-ca-cert.pem"
        entry = ca_store.get_cert(
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(self.host))],
        )
        cert_file = self.tmp / "upstream.pem"
        key = entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        cert_file.write_bytes(entry.cert.to_pem() + key)
        return cert_file

    def start(self) -> Upstream:
        cert_file = self._write_cert()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # or every response waits on a delayed ACK

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                body, complete = _read_body(self.rfile, self.headers)
                digest = hashlib.sha256(body).hexdigest()
                host = self.headers.get("Host", "")
                upstream.seen.append(
                    Seen(self.command, self.path, host, digest, len(body), complete)
                )
                if not complete:
                    self.close_connection = True
                    return
                if self.path.startswith("/payload"):
                    out, ctype = PAYLOAD, "application/octet-stream"
                else:
                    info = {"path": self.path, "sha256": digest, "len": len(body)}
                    out, ctype = json.dumps(info).encode(), "application/json"
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        class CountingServer(ThreadingHTTPServer):
            def process_request(self, request: Any, client_address: Any) -> None:
                upstream.connections += 1
                super().process_request(request, client_address)

        plain = CountingServer((self.host, 0), Handler)
        tls = CountingServer((self.host, 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file)
        tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
        for server in (plain, tls):
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.http_port = plain.server_address[1]
        self.https_port = tls.server_address[1]
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    def find(self, path: str, wait: float = 0) -> Seen | None:
        """The request for ``path``; with ``wait``, poll that long for a handler that is still
        reading a body the gateway cut (it records the request when the body ends)."""
        deadline = time.monotonic() + wait
        while True:
            found = next((s for s in self.seen if s.path == path), None)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)


# --- the gateway -----------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    data_dir: Path
    policies: Path
    upstream_ca: Path | None = None
    extra_args: tuple[str, ...] = ()
    via: str = "flags"  # flags | env (EGRESS_GUARD_* variables) | mitmdump (-s addon script)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the process
    fault_file: Path | None = None  # set: run through faulty_gateway.py, faults named here
    proxy_port: int = 0
    admin_port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[str] | None = None
    auditor_token: str = ""  # an API token of the account "e2e-auditor" (role auditor)
    allow_loopback: bool = True  # the test upstreams listen on 127.0.0.1: open it in policy
    output: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def settings(self) -> dict[str, str]:
        return {
            "listen": f"127.0.0.1:{self.proxy_port}",
            "admin": f"127.0.0.1:{self.admin_port}",
            "metrics": f"127.0.0.1:{self.metrics_port}",
            "data-dir": str(self.data_dir),
            "policies": str(self.policies),
            "node": "e2e-node",
        }

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        sets = [f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"] if self.upstream_ca else []
        if self.via == "mitmdump":
            addon = Path(__file__).resolve().parents[2] / "addons" / "egress_guard_addon.py"
            cmd = [
                str(Path(egress_guard_bin()).with_name("mitmdump")),
                "-q",
                "-s",
                str(addon),
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                str(self.proxy_port),
                "--set",
                f"confdir={self.data_dir / 'mitmproxy'}",
            ]
            for key, value in self.settings().items():
                if key != "listen":
                    sets.append(f"egress_{key.replace('-', '_')}={value}")
        else:
            cmd = [egress_guard_bin(), "run"]
            if self.fault_file is not None:
                launcher = Path(__file__).with_name("faulty_gateway.py")
                cmd = [sys.executable, str(launcher), str(self.fault_file), "run"]
            for key, value in self.settings().items():
                if self.via == "env":
                    env[f"EGRESS_GUARD_{key.upper().replace('-', '_')}"] = value
                else:
                    cmd += [f"--{key}", value]
        return cmd + [a for s in sets for a in ("--set", s)] + list(self.extra_args), env

    def start(self, timeout: float = 60) -> GatewayProcess:
        if self.allow_loopback:
            self.policies = with_loopback_open(self.policies, self.data_dir)
        if not self.auditor_token:
            book = AccountBook(accounts_path(self.data_dir))
            if book.get("e2e-auditor") is None:
                book.add("e2e-auditor", ["auditor"])
            self.auditor_token = book.issue_token("e2e-auditor")
        self.proxy_port, self.admin_port, self.metrics_port = free_port(), free_port(), free_port()
        self._ready.clear()
        cmd, env = self.command()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("gateway did not get ready:\n" + self.text())
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if READY_LINE in line:
                self._ready.set()

    def text(self) -> str:
        return "".join(self.output)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def ca_pem(self) -> Path:
        path = self.data_dir / "exported-ca.pem"
        if not path.exists():
            pem = cli("ca", "export", "--data-dir", str(self.data_dir)).stdout
            path.write_text(pem)
        return path

    def admin_context(self) -> ssl.SSLContext:
        """Trusts the gateway's CA, which signs the console's certificate."""
        return ssl.create_default_context(cafile=str(self.ca_pem()))

    def admin_call(
        self,
        path: str,
        token: str | None = None,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        source: str | None = None,
    ) -> Reply:
        """One request to the console/admin API over TLS, redirects not followed; ``token``
        None sends no credential; ``source`` is another loopback address to come from.
        Repeated headers (Set-Cookie) are joined by newlines."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1",
            self.admin_port,
            timeout=30,
            context=self.admin_context(),
            source_address=(source, 0) if source else None,
        )
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            got: dict[str, str] = {}
            for key, value in resp.getheaders():
                key = key.lower()
                got[key] = f"{got[key]}\n{value}" if key in got else value
            return Reply(resp.status, got, resp.read())
        finally:
            conn.close()

    def audit(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`egress-guard audit query` against this gateway, as the e2e auditor."""
        return cli(
            "audit",
            "query",
            "--admin",
            self.admin,
            "--data-dir",
            str(self.data_dir),
            "--token",
            self.auditor_token,
            *args,
            check=check,
        )

    def query(self, *args: str) -> list[dict[str, Any]]:
        result = self.audit("--format", "json", "--limit", "10000", *args)
        return json.loads(result.stdout)

    def wait_rows(self, predicate: Any, *args: str, timeout: float = 20) -> list[dict[str, Any]]:
        """Poll the admin API until rows satisfying ``predicate(rows)`` are there (the writer
        batches every half second), bounded in time."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.query(*args)
            if predicate(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


LOOPBACK_OPEN = """# Written by the test harness: the test upstreams listen on 127.0.0.1, which
# the gateway refuses by default (its own ports stay refused whatever this says).
destinations:
  allow_internal: [127.0.0.0/8, "::1/128"]
"""


def with_loopback_open(policies: Path, data_dir: Path) -> Path:
    """The policy directory with loopback opened: the shipped one is copied first (never
    written to); a test's own copy gets the file added, so its hot reloads still apply."""
    if policies.resolve() == POLICIES.resolve():
        copy = data_dir.parent / f"{data_dir.name}-policies"
        if not copy.exists():
            shutil.copytree(POLICIES, copy)
        policies = copy
    (policies / "e2e-loopback.yaml").write_text(LOOPBACK_OPEN, encoding="utf-8")
    return policies


def start_mitmdump(confdir: Path, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """Bare mitmdump, no addons: the baseline every benchmark ratio is measured against."""
    port = free_port()
    mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or "mitmdump"
    proc = subprocess.Popen(
        [
            mitmdump,
            "-q",
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(port),
            "--set",
            f"confdir={confdir}",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mitmdump did not start")


def egress_guard_bin() -> str:
    found = shutil.which("egress-guard", path=str(Path(sys.executable).parent))
    return found or "egress-guard"


def cli(
    *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [egress_guard_bin(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        input=stdin,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"egress-guard {' '.join(args)} failed:\n{result.stderr}")
    return result


# --- the client ------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    exit_code: int = 0
    stderr: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


def curl(
    url: str,
    proxy: str,
    cacert: Path | None = None,
    *,
    data: bytes | None = None,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Reply:
    """One request with the real curl through the proxy. Status 0 means no HTTP answer."""
    cmd = [
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--noproxy",
        "",
        "-x",
        proxy,
        "-D",
        "-",
        "-o",
        "-",
        "--http1.1",
    ]
    if cacert:
        cmd += ["--cacert", str(cacert)]
    if method:
        cmd += ["-X", method]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    cmd += [*extra, url]
    result = subprocess.run(cmd, input=data, capture_output=True, timeout=60, check=False)
    raw = result.stdout
    status, hdrs = 0, {}
    # Skip the proxy's "200 Connection established" block of an HTTPS CONNECT.
    while raw.startswith(b"HTTP/"):
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if "established" in lines[0].lower() or 100 <= status < 200:
            status = 0  # the proxy's CONNECT answer or an interim 1xx: the real one follows
            continue
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        break
    return Reply(status, hdrs, raw, result.returncode, result.stderr.decode(errors="replace"))


# --- WebSocket ---------------------------------------------------------------------------------


@dataclass
class WsEcho:
    """A WebSocket echo server on 127.0.0.1 that records the size of every message it got."""

    received: list[int] = field(default_factory=list)
    port: int = 0
    _sock: socket.socket | None = None

    def start(self) -> WsEcho:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, CloseConnection, Message, Request

        ws = WSConnection(ConnectionType.SERVER)
        with conn:
            while True:
                data = conn.recv(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, Request):
                        conn.sendall(ws.send(AcceptConnection()))
                    elif isinstance(event, Message) and event.message_finished:
                        self.received.append(len(event.data))
                        conn.sendall(ws.send(Message(data=f"got {len(event.data)}")))
                    elif isinstance(event, CloseConnection):
                        with contextlib.suppress(Exception):
                            conn.sendall(ws.send(event.response()))
                        return
                if not data:
                    return

    def stop(self) -> None:
        if self._sock:
            self._sock.close()


def ws_session(
    proxy_port: int,
    target_port: int,
    sizes: list[int],
    proxy_auth: str | None = None,
    timeout: float = 20,
) -> tuple[list[str], int | None]:
    """Open ws://127.0.0.1:target_port/ws through the proxy (plain HTTP proxying), send one
    binary message per size, collect the echoes; returns (echoes, close code or None)."""
    import base64 as b64

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Message, Request

    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    ws = WSConnection(ConnectionType.CLIENT)
    extra = []
    if proxy_auth:
        extra.append((b"proxy-authorization", b"Basic " + b64.b64encode(proxy_auth.encode())))
    host = f"127.0.0.1:{target_port}"
    sock.sendall(ws.send(Request(host=host, target=f"http://{host}/ws", extra_headers=extra)))
    echoes: list[str] = []
    close_code: int | None = None
    pending = list(sizes)
    accepted = False
    with sock:
        while True:
            if accepted and pending and len(echoes) == len(sizes) - len(pending):
                sock.sendall(ws.send(Message(data=b"x" * pending.pop(0))))
            if accepted and not pending and len(echoes) == len(sizes):
                return echoes, close_code
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, Message):
                    echoes.append(str(event.data))
                elif isinstance(event, CloseConnection):
                    close_code = event.code
                    return echoes, close_code
            if not data:
                return echoes, close_code


def ws_send_texts(
    proxy_port: int, target_port: int, texts: list[str], timeout: float = 20
) -> tuple[list[str], int | None]:
    """Like ws_session, with given text messages."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Message, Request

    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    ws = WSConnection(ConnectionType.CLIENT)
    host = f"127.0.0.1:{target_port}"
    sock.sendall(ws.send(Request(host=host, target=f"http://{host}/ws")))
    echoes: list[str] = []
    pending = list(texts)
    waiting = False
    with sock:
        while True:
            data = sock.recv(65536)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection) or (
                    isinstance(event, Message) and echoes.append(str(event.data)) is None
                ):
                    waiting = False
                elif isinstance(event, CloseConnection):
                    return echoes, event.code
            if not data:
                return echoes, None
            if not waiting and pending:
                sock.sendall(ws.send(Message(data=pending.pop(0))))
                waiting = True
            elif not waiting and not pending:
                return echoes, None
