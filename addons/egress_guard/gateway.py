"""Gateway: the mitmproxy addons (thin adapters) and the shared runtime they carry out decisions in.

Hook order is addon order: Setup → Identity → Blocklist → Uploads → Markers → Audit. Each
addon turns a flow into plain values, calls the pure functions in ``identity`` / ``decision`` /
``upload`` / ``scan``, and acts on the answer (refusals that cannot wait for the body go
through ``bodygate``).
Per-flow state lives in ``flow.metadata`` (gone with the flow); the only per-connection state
is who opened a CONNECT, dropped when the client disconnects.
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
import logging
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, http, tcp, tls, websocket
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layers, server_hooks
from mitmproxy.proxy.layers.tls import parse_client_hello

from . import blockpage, bodygate, console, metrics
from .auditlog import AuditLog, RequestRow, bounded, utc_from_timestamp
from .decision import ALLOW, Decision, RequestFacts, decide, is_passthrough, needs_interception
from .decode import looks_binary
from .hosts import normalize_host, split_host_port
from .identity import Who, identify
from .policy import Policy, PolicyError, PolicyWatcher, default_policy_dir, load_policy
from .scan import MarkerPolicy, ScanResult, StreamScanner, Verdict, scan_body, scan_in_worker
from .spool import Spool
from .store import Store, default_dsn, describe_dsn
from .units import parse_size
from .upload import CapHit, Limits, UploadGate, UploadWindows, check, describe, limits_for

log = logging.getLogger("egress_guard")

STATE = "egress_guard"
DEFAULT_DATA_DIR = "~/.egress-guard"


@dataclass(frozen=True)
class GatewayConfig:
    policies: Path
    data_dir: Path
    clickhouse: str  # DSN; "" = embedded under data_dir
    admin: str  # HOST:PORT, "" = off
    metrics: str  # HOST:PORT, "" = off
    node: str
    policy_poll: float = 2.0
    spool_max: int = 2 << 30  # bytes of unsent rows kept on disk
    audit_fail: str = "closed"  # closed: refuse requests when rows cannot be kept; open: forward
    audit_sync: bool = False  # True: a response waits until its row is on disk

    @property
    def dsn(self) -> str:
        return self.clickhouse or default_dsn(self.data_dir)


def parse_listen(value: str, what: str) -> tuple[str, int]:
    host, port = split_host_port(value)
    if port is None or not 0 <= port <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, got {value!r}")
    return host or "127.0.0.1", port


@dataclass
class FlowState:
    who: Who
    decision: Decision
    logged: bool = False
    limits: Limits | None = None  # upload caps in force for this flow
    gate: UploadGate | None = None  # set when the body (or tunnel) is counted as it streams
    declared: int | None = None  # Content-Length as announced
    window_bytes: int = 0  # bytes this flow put into the user's upload window
    ws_sent: int = 0
    ws_received: int = 0
    ws_cut: bool = False


class Gateway:
    """What the addons share: the current policy, the store, the audit log and the servers."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.config: GatewayConfig | None = None
        self.watcher: PolicyWatcher | None = None
        self.store: Store | None = None
        self.audit: AuditLog | None = None
        self.connect_who: dict[str, Who] = {}
        self.windows = UploadWindows(24 * 3600, clock)
        self._scan_pool: ProcessPoolExecutor | None = None
        self._servers: list[Any] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._remote_task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def started(self) -> bool:
        return self.audit is not None

    @property
    def policy(self) -> Policy:
        assert self.watcher is not None, "gateway not started"
        return self.watcher.policy

    @property
    def node(self) -> str:
        return self.config.node if self.config else ""

    # --- lifecycle ---

    def start(self, config: GatewayConfig) -> list[str]:
        """Load the policy, open and migrate the store, start the audit writer. Raises
        PolicyError / StoreError with a message for the admin. Returns banner lines."""
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        policy = load_policy(config.policies)
        self.watcher = PolicyWatcher(config.policies, policy)
        self.store = Store(config.dsn)
        self.store.migrate()
        self.store.ensure_retention(policy.retention_months)
        spool = Spool(
            config.data_dir / "spool",
            max_bytes=config.spool_max,
            on_corrupt=metrics.AUDIT_SPOOL_CORRUPT.inc,
        )
        metrics.AUDIT_SPOOL_BYTES.set_function(spool.size)
        self.audit = AuditLog(
            self.store.insert_requests,
            spool,
            sync=config.audit_sync,
            on_written=metrics.AUDIT_ROWS_WRITTEN.inc,
            on_dropped=metrics.AUDIT_ROWS_DROPPED.inc,
            on_error=lambda e: metrics.AUDIT_INSERT_ERRORS.inc(),
        )
        metrics.AUDIT_QUEUE_DEPTH.set_function(self.audit.depth)
        self._publish_policy(policy)
        self._seed_windows()
        self.audit.start()
        kind = "embedded" if self.store.embedded else "server"
        return [
            f"policy   {config.policies} ({policy.summary()})",
            f"store    {describe_dsn(config.dsn)} ({kind}), request log kept "
            f"{policy.retention_months} months",
        ]

    def start_servers(self) -> list[str]:
        """Admin API and metrics; called on the running event loop."""
        # The proxy's loop shares the GIL with the log writer and the servers' threads; a
        # shorter switch interval than CPython's 5 ms keeps a busy writer from holding a
        # request up for a whole interval.
        sys.setswitchinterval(0.0005)
        assert self.config is not None and self.store is not None
        lines = []
        if self.config.metrics:
            host, port = parse_listen(self.config.metrics, "--metrics")
            self._servers.append(metrics.serve(host, port))
            lines.append(f"metrics  http://{host}:{port}/metrics")
        if self.config.admin:
            host, port = parse_listen(self.config.admin, "--admin")
            token, created = console.ensure_admin_token(self.config.data_dir)
            ctx_ = console.AdminContext(token=token, store=self.store, status=self.status)
            self._servers.append(console.serve(ctx_, host, port))
            where = console.token_path(self.config.data_dir)
            lines.append(
                f"admin    http://{host}:{port}/api/v1/ (bearer token in {where}"
                f"{', created now' if created else ''}; the CLI reads it from there)"
            )
        loop = asyncio.get_running_loop()
        self.warm_scan_pool()
        self._watch_task = loop.create_task(self._watch_policy())
        if not self.store.embedded:  # other nodes may write to a shared server
            self._remote_task = loop.create_task(self._refresh_remote_windows())
        return lines

    # --- scanning ---

    INLINE_SCAN_BYTES = 128 * 1024  # smaller bodies are scanned on the event loop (< 1 ms)

    def _pool(self) -> ProcessPoolExecutor:
        if self._scan_pool is None:
            # spawn, not fork: the workers need the scanner, not the store engine or the loop.
            workers = max(1, (os.cpu_count() or 2) - 1)
            self._scan_pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=os.nice,  # the proxy's own loop comes first
                initargs=(10,),
            )
        return self._scan_pool

    async def scan(
        self, policy: MarkerPolicy, data: bytes, content_type: str, content_encoding: str
    ) -> ScanResult:
        """Scan a whole body: inline when small, else in a worker process so the proxy's
        event loop keeps serving everyone else."""
        start = time.perf_counter()
        markers = policy.markers
        if len(data) <= self.INLINE_SCAN_BYTES:
            result = scan_body(markers, data, content_type, content_encoding, policy.limits)
            metrics.SCAN_SECONDS.labels("inline").observe(time.perf_counter() - start)
            return result
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._pool(),
            scan_in_worker,
            id(markers),
            markers.markers,
            markers.suppress,
            data,
            content_type,
            content_encoding,
            policy.limits,
        )
        metrics.SCAN_SECONDS.labels("worker").observe(time.perf_counter() - start)
        return result

    def warm_scan_pool(self) -> None:
        """Start the worker processes now rather than on the first large upload."""
        if self.policy.markers.active:
            self._pool().submit(len, b"")

    def stop(self) -> None:
        """Stop servers, flush the audit queue, close the store. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._scan_pool is not None:
            self._scan_pool.shutdown(wait=False, cancel_futures=True)
        for task in (self._watch_task, self._remote_task):
            if task:
                task.cancel()
        for server in self._servers:
            (getattr(server, "stop", None) or server.shutdown)()
        self._servers.clear()
        if self.audit:
            self.audit.close()
        if self.store:
            self.store.close()

    def status(self) -> dict[str, Any]:
        assert self.config is not None and self.audit is not None and self.watcher is not None
        err = self.watcher.last_error
        return {
            "node": self.node,
            "policy": {
                "source": str(self.config.policies),
                "categories": {k: vars(v) for k, v in self.policy.stats.items()},
                "last_reload_error": err.problems if err else None,
                "retention_months": self.policy.retention_months,
            },
            "store": describe_dsn(self.config.dsn),
            "audit": {
                "queued": self.audit.depth(),
                "written": self.audit.written,
                "dropped": self.audit.dropped,
            },
        }

    def _window_start(self) -> datetime:
        return datetime.fromtimestamp(self.clock() - self.windows.window_seconds, UTC)

    def _seed_windows(self) -> None:
        """A restart must not hand users a fresh upload window: recount this node's uploads
        within the window from the request log."""
        assert self.store is not None
        for key, second, n in self.store.window_usage(self._window_start(), self.node, own=True):
            self.windows.add(key, n, at=second)

    async def _refresh_remote_windows(self, every: float = 30.0) -> None:
        """Multi-node: what the other nodes counted, from the shared store (≤ 30 s + their
        flush interval behind; documented as at most a minute)."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                rows = await loop.run_in_executor(
                    None, self.store.window_usage, self._window_start(), self.node, False
                )
                remote: dict[str, int] = {}
                for key, _second, n in rows:
                    remote[key] = remote.get(key, 0) + n
                self.windows.remote = remote
            except Exception as e:  # the store being down must not stop the proxy
                log.error("cannot refresh upload windows from the store: %s", e)
            await asyncio.sleep(every)

    def _publish_policy(self, policy: Policy) -> None:
        self.windows.window_seconds = policy.uploads.window_seconds
        metrics.POLICY_RULES.clear()
        for name, stats in policy.stats.items():
            metrics.POLICY_RULES.labels(name).set(stats.rules)

    async def _watch_policy(self) -> None:
        assert self.config is not None and self.watcher is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.policy_poll)
            try:
                result = await loop.run_in_executor(None, self.watcher.check)
            except Exception:  # never let the watcher die silently
                log.exception("policy reload crashed")
                continue
            if result == "unchanged":
                continue
            metrics.POLICY_RELOADS.labels(result).inc()
            metrics.POLICY_VALID.set(result == "reloaded")
            if result == "reloaded":
                self._publish_policy(self.policy)
                assert self.store is not None
                await loop.run_in_executor(
                    None, self.store.ensure_retention, self.policy.retention_months
                )
                log.warning("policy reloaded: %s", self.policy.summary())
            else:
                assert self.watcher.last_error is not None
                log.error(
                    "policy reload failed, keeping the last good policy:\n%s",
                    self.watcher.last_error,
                )

    # --- rows ---

    def record(self, row: RequestRow) -> Future[None] | None:
        """Queue a row; in sync mode, a future done when it is on disk."""
        row.node = self.node
        metrics.REQUESTS.labels(row.kind, row.decision, row.reason_kind, row.category).inc()
        return self.audit.submit(row) if self.audit is not None else None

    def refuses_for_audit(self) -> bool:
        """Fail closed: the request log cannot keep rows, so no request may pass unlogged."""
        return (
            self.audit is not None
            and not self.audit.accepting
            and self.config is not None
            and self.config.audit_fail == "closed"
        )


# --- flow helpers ----------------------------------------------------------------------------


def _proxyauth_user(flow: http.HTTPFlow) -> str | None:
    auth = flow.metadata.get("proxyauth")
    return auth[0] if auth else None


def _client_ip(client: connection.Client) -> str:
    return client.peername[0] if client.peername else ""


def window_key(who: Who, client: connection.Client) -> str:
    """Whose upload window: the user, or the client address when nobody is known."""
    return who.user or f"ip:{_client_ip(client)}"


def request_hosts(flow: http.HTTPFlow) -> tuple[str, ...]:
    """Every name this request could reach: the URL/connection host, the SNI the client sent,
    and the Host header (a client can make them disagree to sneak past a check on one)."""
    req = flow.request
    hosts = [req.host]
    if flow.client_conn.sni:
        hosts.append(flow.client_conn.sni)
    if flow.server_conn.address:
        hosts.append(flow.server_conn.address[0])
    host_header = req.host_header
    if host_header:
        hosts.append(split_host_port(host_header)[0])
    return tuple(hosts)


def _header_bytes(message: http.Message, first_line: int) -> int:
    return first_line + sum(len(k) + len(v) + 4 for k, v in message.headers.fields) + 2


def refusal_response(
    flow: http.HTTPFlow,
    state: FlowState,
    now: float,
    status: int,
    titles: tuple[str, str],
    reasons: tuple[str, str],
    details: tuple[tuple[str, str], ...] = (),
) -> http.Response:
    """The block page for this flow: titles and reasons as (en, zh)."""
    d = state.decision
    refusal = blockpage.Refusal(
        status=status,
        title_en=titles[0],
        title_zh=titles[1],
        reason_en=reasons[0],
        reason_zh=reasons[1],
        category=d.category,
        rule_id=d.rule_id,
        user=state.who.user,
        client_ip=_client_ip(flow.client_conn),
        host=d.host or normalize_host(flow.request.host),
        request_id=flow.id,
        when=datetime.fromtimestamp(now, UTC),
        details=details,
    )
    return http.Response.make(status, blockpage.render(refusal), blockpage.headers(refusal))


def blocked_response(flow: http.HTTPFlow, state: FlowState, now: float) -> http.Response:
    rule = state.decision.rule
    assert rule is not None
    return refusal_response(
        flow,
        state,
        now,
        403,
        ("Access blocked by company policy", "根据公司规定，已阻止访问"),
        (rule.reason.en, rule.reason.zh),
    )


def cap_response(flow: http.HTTPFlow, state: FlowState, hit: CapHit, now: float) -> http.Response:
    window = state.limits.window_seconds if state.limits else 86400
    en, zh = describe(hit, window)
    return refusal_response(
        flow,
        state,
        now,
        413,
        ("Upload over the allowed size", "上传超过允许的大小"),
        (
            en + " Company rules limit how much data may be uploaded to the Internet.",
            zh + " 公司规定限制向外部网络上传的数据量。",
        ),
        (
            ("限额 Limit", f"{hit.cap:,} bytes ({hit.kind})"),
            ("本次 This upload", f"{hit.size:,} bytes"),
            ("窗口已用 Used in window", f"{hit.used:,} bytes"),
        ),
    )


def audit_unavailable_response(flow: http.HTTPFlow, state: FlowState, now: float) -> http.Response:
    return refusal_response(
        flow,
        state,
        now,
        503,
        ("Audit log unavailable", "审计日志不可用"),
        (
            "The gateway cannot record requests right now, and company rules do not allow "
            "unrecorded access to the Internet. Please try again later or tell IT.",
            "网关当前无法记录访问日志，按公司规定不得在无记录的情况下访问外部网络。请稍后再试或联系信息部门。",
        ),
    )


def marker_response(
    flow: http.HTTPFlow, state: FlowState, verdict: Verdict, now: float
) -> http.Response:
    """The refusal for a marked (or unscannable) upload: level and marker id, never the text."""
    if verdict.hits and any(h.action == "block" for h in verdict.hits):
        reasons = (
            f"The content carries a confidentiality marking (level {verdict.level}, "
            f"rule {verdict.rule_id}). Documents with this marking may not leave the company.",
            f"内容带有密级或商业秘密标志（级别 {verdict.level}，规则 {verdict.rule_id}），"
            "按公司规定不得外发。",
        )
    else:
        reasons = (
            f"The content could not be fully checked for confidentiality markings "
            f"({verdict.unscannable}), so company policy blocks it.",
            f"无法完整检查内容是否带有密级标志（{verdict.unscannable}），按公司规定予以阻止。",
        )
    return refusal_response(
        flow,
        state,
        now,
        403,
        ("Upload blocked: confidential content", "已阻止外发：内容涉密"),
        reasons,
        (("级别 Level", verdict.level or "-"),),
    )


# --- the addons ------------------------------------------------------------------------------
class Setup:
    """Options, startup and shutdown. With ``egress-guard run`` the CLI starts the gateway
    before mitmproxy; with ``mitmdump -s`` this addon starts it from the ``egress_*`` options."""

    name = "egress_setup"

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "egress_policies", str, str(default_policy_dir()), "Policy directory (YAML files)."
        )
        loader.add_option(
            "egress_data_dir",
            str,
            DEFAULT_DATA_DIR,
            "State directory: embedded store, admin token.",
        )
        loader.add_option(
            "egress_clickhouse",
            str,
            "",
            "ClickHouse DSN; empty = embedded chdb under egress_data_dir.",
        )
        loader.add_option(
            "egress_admin", str, "127.0.0.1:8081", "Admin API HOST:PORT; empty = off."
        )
        loader.add_option(
            "egress_metrics", str, "127.0.0.1:9464", "Prometheus /metrics HOST:PORT; empty = off."
        )
        loader.add_option(
            "egress_node", str, socket.gethostname(), "Node name written into every log row."
        )
        loader.add_option("egress_spool_max", str, "2GiB", "Disk for rows not yet stored.")
        loader.add_option(
            "egress_audit_fail",
            str,
            "closed",
            "closed: refuse requests when rows cannot be kept; open: forward.",
        )
        loader.add_option(
            "egress_audit_sync",
            str,
            "batch",
            "batch: rows reach disk every 0.5 s; request: responses wait for it.",
        )

    def configure(self, updated: set[str]) -> None:
        # A blocked host must never be contacted: no upstream connection before the first
        # request is decided, so no early DNS lookup or TCP connect at CONNECT time.
        if ctx.options.connection_strategy != "lazy":
            ctx.options.connection_strategy = "lazy"

    def running(self) -> None:
        if not self.gw.started:
            opts = ctx.options
            config = GatewayConfig(
                policies=Path(opts.egress_policies).expanduser(),
                data_dir=Path(opts.egress_data_dir).expanduser(),
                clickhouse=opts.egress_clickhouse,
                admin=opts.egress_admin,
                metrics=opts.egress_metrics,
                node=opts.egress_node,
                spool_max=parse_size(opts.egress_spool_max),
                audit_fail=opts.egress_audit_fail,
                audit_sync=opts.egress_audit_sync == "request",
            )
            try:
                for line in self.gw.start(config):
                    print(line, flush=True)
            except PolicyError as e:
                log.error("invalid policy, not starting:\n%s", e)
                ctx.master.shutdown()
                return
            except Exception as e:
                log.error("cannot start egress-guard: %s", e)
                ctx.master.shutdown()
                return
        for line in self.gw.start_servers():
            print(line, flush=True)
        print("egress-guard ready", flush=True)

    def done(self) -> None:
        self.gw.stop()

    def client_disconnected(self, client: connection.Client) -> None:
        self.gw.connect_who.pop(client.id, None)


class Identity:
    """Who is asking, for every CONNECT and request."""

    name = "egress_identity"

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def _who(self, flow: http.HTTPFlow) -> Who:
        user = _proxyauth_user(flow)
        if user is None and (known := self.gw.connect_who.get(flow.client_conn.id)):
            return known
        return identify(_client_ip(flow.client_conn), user, self.gw.policy)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        who = self._who(flow)
        self.gw.connect_who[flow.client_conn.id] = who
        flow.metadata[STATE] = FlowState(who, ALLOW)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.metadata[STATE] = FlowState(self._who(flow), ALLOW)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        who = self.gw.connect_who.get(flow.client_conn.id) or identify(
            _client_ip(flow.client_conn), None, self.gw.policy
        )
        flow.metadata[STATE] = FlowState(who, ALLOW)


class Blocklist:
    """Carries out blocklist decisions at CONNECT, at the start of a tunnel, at request headers
    and, as the last line, before any upstream connection."""

    name = "egress_blocklist"  # mitmproxy has its own "blocklist" addon

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def _decide(self, flow: http.HTTPFlow, path: str | None) -> Decision:
        state: FlowState = flow.metadata[STATE]
        facts = RequestFacts(
            request_hosts(flow), path, flow.request.method, state.who.user, state.who.groups
        )
        state.decision = decide(facts, self.gw.policy)
        return state.decision

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A blocked CONNECT is still answered 200: the TLS session is then terminated here
        # (certificate from the SNI, no upstream) so the browser can show the block page.
        self._decide(flow, None)

    def next_layer(self, nextlayer: layers.NextLayer) -> None:
        """Pass-through hosts (pinned apps): relay the tunnel as raw TCP, uninspected but
        counted (a TCP flow, so its client→server bytes meet the upload window).

        mitmproxy's own next-layer addon may run before this one (``egress-guard run``) or
        after it (``mitmdump -s``): either nothing is chosen yet, or it has just chosen TLS
        interception for the inside of a CONNECT tunnel."""
        if not self.gw.policy.passthrough.rule_count:
            return
        context = nextlayer.context
        stack = context.layers
        proposed = nextlayer.layer
        if proposed is None:
            base = len(stack)
        elif isinstance(proposed, layers.ServerTLSLayer) and proposed in stack:
            base = stack.index(proposed)
        else:
            return
        if not base or not isinstance(stack[base - 1], layers.http.HttpStream):
            return  # only the inside of a CONNECT tunnel
        if not context.server.address:
            return
        try:
            client_hello = parse_client_hello(nextlayer.data_client())
        except ValueError:
            return  # not TLS: decided per request
        if client_hello is None:
            return  # not all of the ClientHello yet
        hosts = tuple(h for h in (context.server.address[0], client_hello.sni) if h)
        policy = self.gw.policy
        if decide(RequestFacts(hosts, None), policy).verdict == "block":
            return
        if needs_interception(hosts, policy) or not any(is_passthrough(h, policy) for h in hosts):
            return
        del stack[base:]  # drop the TLS layers mitmproxy had stacked for interception
        nextlayer.layer = layers.TCPLayer(context)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        decision = self._decide(flow, flow.request.path)
        if decision.verdict == "block" and flow.response is None:  # keep proxyauth's 407
            state: FlowState = flow.metadata[STATE]
            bodygate.refuse_at_headers(flow, blocked_response(flow, state, self.gw.clock()))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if not address:
            return
        decision = decide(RequestFacts((address[0], data.server.sni or ""), None), self.gw.policy)
        if decision.verdict == "block":
            data.server.error = f"egress-guard: {address[0]} is blocked by rule {decision.rule_id}"


class Uploads:
    """Upload caps: per request and per user window, for request bodies, WebSocket messages
    and pass-through tunnels. Decided at the headers when the size is announced, counted as
    the bytes stream otherwise."""

    name = "egress_uploads"

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def _limits(self, state: FlowState, host: str) -> Limits:
        who = state.who
        return limits_for(
            self.gw.policy.uploads, who.user, who.groups, host, state.decision.category
        )

    def _refuse(self, flow: http.HTTPFlow, state: FlowState, hit: CapHit) -> http.Response:
        state.decision = replace(state.decision, verdict="block", reason_kind="upload_cap", cap=hit)
        return cap_response(flow, state, hit, self.gw.clock())

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or flow.response is not None:  # already refused
            return
        limits = state.limits = self._limits(state, normalize_host(flow.request.host))
        key = window_key(state.who, flow.client_conn)
        declared = state.declared = bodygate.declared_length(flow.request)
        windows = self.gw.windows
        reserved = 0
        if declared:
            hit = check(limits, declared, windows.used(key) if limits.per_user is not None else 0)
            if hit is not None:
                bodygate.refuse_at_headers(flow, self._refuse(flow, state, hit))
                return
            if limits.per_user is not None:
                windows.add(key, declared)
                state.window_bytes = reserved = declared
        if declared is None or declared > self.gw.policy.uploads.stream_above:
            state.gate = UploadGate(
                limits, windows, key, lambda hit: self._refuse(flow, state, hit), reserved
            )
            bodygate.add_gate(flow, state.gate)

    def request(self, flow: http.HTTPFlow) -> None:
        """A buffered body nobody announced the size of (HTTP/2 without Content-Length): check
        it now, before it is forwarded."""
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or state.limits is None or state.gate is not None or flow.response:
            return
        size = len(flow.request.raw_content or b"")
        if state.declared is not None or not size:
            return
        key = window_key(state.who, flow.client_conn)
        limits = state.limits
        used = self.gw.windows.used(key) if limits.per_user is not None else 0
        hit = check(limits, size, used)
        if hit is not None:
            flow.response = self._refuse(flow, state, hit)
        elif limits.per_user is not None:
            self.gw.windows.add(key, size)
            state.window_bytes = size

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        state: FlowState | None = flow.metadata.get(STATE)
        message = flow.websocket.messages[-1]
        if state is None or not message.from_client or state.limits is None:
            return
        if state.ws_cut:
            message.drop()
            return
        size = len(message.content)
        key = window_key(state.who, flow.client_conn)
        limits = state.limits
        used = self.gw.windows.used(key) if limits.per_user is not None else 0
        hit = check(limits, size, used)
        if hit is not None:
            state.ws_cut = True
            state.decision = replace(
                state.decision, verdict="block", reason_kind="upload_cap", cap=hit
            )
            bodygate.cut_websocket(flow, message)
        elif limits.per_user is not None:
            self.gw.windows.add(key, size)
            state.window_bytes += size

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        state: FlowState = flow.metadata[STATE]
        host = normalize_host(flow.server_conn.address[0]) if flow.server_conn.address else ""
        state.decision = decide(RequestFacts((host,), None), self.gw.policy)
        state.limits = limits = self._limits(state, host)
        # A tunnel is many requests: only the user's window applies to it, not the
        # per-request cap.
        tunnel_limits = Limits(None, limits.per_user, limits.window_seconds, "", limits.per_user_id)
        state.gate = UploadGate(
            tunnel_limits,
            self.gw.windows,
            window_key(state.who, flow.client_conn),
            self._tunnel_refused(state),
        )
        bodygate.add_gate(flow, state.gate)

    @staticmethod
    def _tunnel_refused(state: FlowState) -> Callable[[CapHit], http.Response]:
        def refuse(hit: CapHit) -> http.Response:
            state.decision = replace(
                state.decision, verdict="block", reason_kind="upload_cap", cap=hit
            )
            return http.Response.make(413)  # never sent: a tunnel has no HTTP answer

        return refuse


class ScanGate:
    """Watches a streamed body for markers: its raw text as it passes (a marker there stops
    the upload at once), and a copy up to ``max_body`` for the full decode at the end."""

    hold_last = True  # the upstream gets the last chunk only after the end-of-body verdict

    def __init__(self, policy: MarkerPolicy, on_found: Callable[[set[int]], http.Response | None]):
        self.policy = policy
        self.on_found = on_found
        self.buffer: bytearray | None = bytearray()
        self.stream: StreamScanner | None = StreamScanner(policy.markers)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> http.Response | None:
        if self.buffer is not None:
            self.buffer += data
            if len(self.buffer) <= self.policy.limits.max_body:
                return None  # decoded and scanned whole at the end, off the event loop
            # Too big to decode whole: from here on only its raw text is scanned, as it
            # passes (binary has none), and the verdict at the end is `unscannable`.
            buffered, self.buffer = self.buffer, None
            if looks_binary(bytes(buffered[:8192])):
                self.stream = None
                return None
            for at in range(0, len(buffered), self.SLICE):  # bounded memory per step
                found = self._scan(bytes(buffered[at : at + self.SLICE]))
                if found is not None:
                    return found
            return None
        return self._scan(data) if self.stream is not None else None

    SLICE = 256 * 1024

    def _scan(self, data: bytes) -> http.Response | None:
        assert self.stream is not None
        new = self.stream.feed(self.decoder.decode(data))
        return self.on_found(self.stream.found) if new else None


class Markers:
    """Secret-marker scanning of request bodies and client WebSocket messages: buffered
    bodies when complete, streamed ones as they pass and again, whole, at their end."""

    name = "egress_markers"

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def _policy(self, flow: http.HTTPFlow) -> tuple[FlowState, MarkerPolicy] | None:
        state: FlowState | None = flow.metadata.get(STATE)
        policy = self.gw.policy.markers
        if state is None or not policy.active or state.decision.verdict == "block":
            return None
        return state, policy

    def _apply(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        policy: MarkerPolicy,
        found: set[int],
        unscannable: str = "",
    ) -> http.Response | None:
        """Record the verdict on the flow; the block page when it blocks."""
        who = state.who
        verdict = policy.verdict(
            found,
            unscannable,
            who.user,
            who.groups,
            normalize_host(flow.request.host),
            state.decision.category,
        )
        category = state.decision.category
        for hit in verdict.hits:
            metrics.MARKER_MATCHES.labels(hit.level, category).inc()
        metrics.SCAN_VERDICTS.labels(verdict.action or "clean").inc()
        if verdict.action in ("", "log") and not verdict.hits:
            return None
        kind = (
            "block"
            if verdict.action == "block"
            else ("alert" if verdict.action == "alert" else state.decision.verdict)
        )
        if kind == "alert":
            metrics.MARKER_ALERTS.labels(verdict.level).inc()
        state.decision = replace(state.decision, verdict=kind, reason_kind="marker", scan=verdict)
        if kind == "block":
            return marker_response(flow, state, verdict, self.gw.clock())
        return None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.request.stream:
            return  # refused already, or buffered: scanned whole in `request`
        found = self._policy(flow)
        if found is None:
            return
        state, policy = found
        bodygate.add_gate(
            flow, ScanGate(policy, lambda f: self._refuse_now(flow, state, policy, f))
        )

    def _refuse_now(
        self, flow: http.HTTPFlow, state: FlowState, policy: MarkerPolicy, found: set[int]
    ) -> http.Response | None:
        """Mid-stream: stop at once for a blocking marker; alerts wait for the end."""
        who = state.who
        verdict = policy.verdict(
            found,
            "",
            who.user,
            who.groups,
            normalize_host(flow.request.host),
            state.decision.category,
        )
        if verdict.action != "block":
            return None
        return self._apply(flow, state, policy, found)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response is not None or flow.request.stream:
            return None
        found = self._policy(flow)
        if found is None or not flow.request.raw_content:
            return None  # nothing to scan: no coroutine on the hot path
        return self._scan_buffered(flow, *found)

    async def _scan_buffered(
        self, flow: http.HTTPFlow, state: FlowState, policy: MarkerPolicy
    ) -> None:
        body = flow.request.raw_content
        assert body is not None
        headers = flow.request.headers
        result = await self.gw.scan(
            policy, body, headers.get("content-type", ""), headers.get("content-encoding", "")
        )
        refusal = self._apply(flow, state, policy, result.found, result.unscannable)
        if refusal is not None:
            flow.response = refusal

    async def egress_body_end(self, flow: http.HTTPFlow) -> None:
        gate = next((g for g in bodygate.gates_of(flow) if isinstance(g, ScanGate)), None)
        found = self._policy(flow)
        if gate is None or found is None:
            return
        state, policy = found
        if gate.buffer is None:
            result = ScanResult(
                set(gate.stream.found) if gate.stream else set(),
                f"body over {policy.limits.max_body} bytes: only its text was scanned",
            )
        else:
            headers = flow.request.headers
            result = await self.gw.scan(
                policy,
                gate.buffer,
                headers.get("content-type", ""),
                headers.get("content-encoding", ""),
            )
            gate.buffer = None
        refusal = self._apply(flow, state, policy, result.found, result.unscannable)
        if refusal is not None:
            bodygate.refuse_at_end(flow, refusal)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        found = self._policy(flow)
        if found is None or not message.from_client or message.dropped:
            return
        state, policy = found
        if state.ws_cut:
            return
        result = await self.gw.scan(policy, message.content, "", "")
        if self._apply(flow, state, policy, result.found, result.unscannable) is not None:
            state.ws_cut = True
            bodygate.cut_websocket(flow, message)


class Audit:
    """One row per CONNECT, request, WebSocket and failed or passed-through tunnel."""

    name = "egress_audit"

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def _http_row(self, flow: http.HTTPFlow, state: FlowState | None, kind: str) -> RequestRow:
        req = flow.request
        resp = flow.response
        who = state.who if state else Who("")
        decision = state.decision if state else ALLOW
        end = (resp.timestamp_end if resp and resp.timestamp_end else None) or self.gw.clock()
        if state is not None and state.gate is not None:
            body = state.gate.seen
        else:
            body = len(req.raw_content) if req.raw_content else 0
        first_line = len(req.method) + len(req.path) + len(req.http_version) + 4
        error = flow.error.msg if flow.error else ""
        if decision.scan and decision.scan.unscannable:
            error = f"unscannable: {decision.scan.unscannable}" + (f"; {error}" if error else "")
        return RequestRow(
            ts=utc_from_timestamp(req.timestamp_start),
            request_id=flow.id,
            client_ip=_client_ip(flow.client_conn),
            user=who.user,
            groups=list(who.groups),
            method=req.method,
            scheme=req.scheme,
            host=normalize_host(req.host),
            port=req.port,
            path=bounded(req.path.split("?", 1)[0], "path"),
            query=bounded(req.path.partition("?")[2], "query"),
            http_version=req.http_version,
            kind=kind,
            status=resp.status_code if resp else (502 if error else 0),
            decision=decision.verdict,
            reason_kind=decision.reason_kind or ("error" if error else ""),
            rule_id=decision.rule_id,
            category=decision.category,
            request_bytes=_header_bytes(req, first_line) + body,
            upload_bytes=body,
            response_bytes=len(resp.raw_content) if resp and resp.raw_content else 0,
            content_type=bounded(req.headers.get("content-type", ""), "content_type"),
            user_agent=bounded(req.headers.get("user-agent", ""), "user_agent"),
            duration_ms=max(0, int((end - req.timestamp_start) * 1000)),
            tls_intercepted=flow.client_conn.tls_established,
            error=bounded(error, "error"),
            marker_ids=[h.marker_id for h in decision.scan.hits] if decision.scan else [],
            marker_levels=[h.level for h in decision.scan.hits] if decision.scan else [],
            declared_bytes=(state.declared or 0) if state else 0,
            window_bytes=(state.window_bytes + (state.gate.counted if state.gate else 0))
            if state
            else 0,
        )

    def _finish(self, flow: http.HTTPFlow, kind: str = "http") -> Future[None] | None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None and state.logged:
            return None
        if state is not None:
            state.logged = True
        return self.gw.record(self._http_row(flow, state, kind))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Fail closed: when the log cannot keep rows, nothing passes unlogged."""
        if self.gw.refuses_for_audit() and flow.response is None:
            metrics.AUDIT_REFUSED.inc()
            state = flow.metadata.get(STATE) or FlowState(Who(""), ALLOW)
            state.decision = replace(state.decision, verdict="block", reason_kind="error")
            bodygate.refuse_at_headers(
                flow, audit_unavailable_response(flow, state, self.gw.clock())
            )

    def http_connect(self, flow: http.HTTPFlow) -> None:
        row = self._http_row(flow, flow.metadata.get(STATE), "connect")
        row.status = flow.response.status_code if flow.response else 200  # 407 from proxyauth
        self.gw.record(row)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        durable = self._finish(flow)
        # A coroutine only in sync mode: mitmproxy awaits what a hook returns, and a plain
        # return costs the hot path nothing.
        return None if durable is None else self._answer_when_durable(flow, durable)

    async def _answer_when_durable(self, flow: http.HTTPFlow, durable: Future[None]) -> None:
        try:  # sync mode: the client is answered only once its row is on disk
            await asyncio.wrap_future(durable)
        except Exception:
            if self.gw.config is not None and self.gw.config.audit_fail == "closed":
                metrics.AUDIT_REFUSED.inc()
                state = flow.metadata.get(STATE) or FlowState(Who(""), ALLOW)
                flow.response = audit_unavailable_response(flow, state, self.gw.clock())

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Count, then forget the message: a long-lived WebSocket must not grow the process."""
        assert flow.websocket is not None
        state: FlowState | None = flow.metadata.get(STATE)
        message: websocket.WebSocketMessage = flow.websocket.messages[-1]
        if state is not None:
            if message.from_client:
                state.ws_sent += len(message.content)
            else:
                state.ws_received += len(message.content)
        del flow.websocket.messages[:]

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        row = self._http_row(flow, state, "websocket")
        sent, received = (state.ws_sent, state.ws_received) if state else (0, 0)
        row.upload_bytes, row.request_bytes, row.response_bytes = sent, sent, received
        row.declared_bytes = 0
        row.window_bytes = state.window_bytes if state else 0
        row.request_id = f"{flow.id}/ws"
        if flow.websocket and flow.websocket.close_code == 1009 and not row.error:
            row.error = "WebSocket closed by egress-guard: upload limit"
        self.gw.record(row)

    def _tunnel_row(
        self,
        client: connection.Client,
        server: connection.Server,
        sni: str | None,
        error: str,
        intercepted: bool,
        state: FlowState | None = None,
    ) -> RequestRow:
        host, port = server.address if server.address else (sni or "", 0)
        who = self.gw.connect_who.get(client.id) or identify(
            _client_ip(client), None, self.gw.policy
        )
        decision = decide(RequestFacts((host, sni or ""), None), self.gw.policy)
        if state is not None and state.decision.verdict == "block":
            decision = state.decision
        gate = state.gate if state else None
        return RequestRow(
            ts=utc_from_timestamp(client.timestamp_start),
            request_id=f"{client.id}/tunnel",
            client_ip=_client_ip(client),
            user=who.user,
            groups=list(who.groups),
            method="CONNECT",
            scheme="tls",
            host=normalize_host(host),
            port=port,
            kind="tunnel",
            decision=decision.verdict,
            reason_kind=decision.reason_kind or ("error" if error else ""),
            rule_id=decision.rule_id,
            category=decision.category,
            tls_intercepted=intercepted,
            error=bounded(error, "error"),
            duration_ms=max(0, int((self.gw.clock() - client.timestamp_start) * 1000)),
            upload_bytes=gate.seen if gate else 0,
            request_bytes=gate.seen if gate else 0,
            window_bytes=gate.counted if gate else 0,
        )

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """Bytes are counted by the gate; the messages themselves are not kept."""
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None:
            message = flow.messages[-1]
            if not message.from_client:
                state.ws_received += len(message.content)
        del flow.messages[:]

    def _tcp_done(self, flow: tcp.TCPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or state.logged:
            return
        state.logged = True
        row = self._tunnel_row(
            flow.client_conn,
            flow.server_conn,
            flow.client_conn.sni,
            flow.error.msg if flow.error else "",
            False,
            state,
        )
        row.response_bytes = state.ws_received
        self.gw.record(row)

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self._tcp_done(flow)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        self._tcp_done(flow)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        client = data.context.client
        reason = client.error or "client TLS handshake failed"
        self.gw.record(
            self._tunnel_row(
                client,
                data.context.server,
                client.sni,
                f"TLS interception failed, tunnel closed: {reason}",
                False,
            )
        )


class EgressGuard:
    """The one addon mitmproxy sees. It calls the concern adapters above in hook order.

    mitmproxy wraps every call of every addon's hook in its own error-handling context; with
    six addons that dispatch cost more per request than all of the gateway's own decisions
    (py-spy under load). One addon, calling the adapters directly, pays it once per hook.
    An adapter's coroutine is awaited before the next adapter runs, as mitmproxy would.
    """

    name = "egress_guard"

    def __init__(self, gateway: Gateway):
        self.parts = (
            Setup(gateway),
            Identity(gateway),
            Blocklist(gateway),
            Uploads(gateway),
            Markers(gateway),
            Audit(gateway),
        )

    def _chain(self, hook: str) -> tuple[Callable[..., Any], ...]:
        return tuple(m for part in self.parts if (m := getattr(part, hook, None)) is not None)

    @staticmethod
    async def _finish(
        pending: Awaitable[Any], rest: tuple[Callable[..., Any], ...], args: tuple[Any, ...]
    ) -> None:
        await pending
        for method in rest:
            result = method(*args)
            if result is not None and inspect.isawaitable(result):
                await result


def _dispatch(hook: str) -> Callable[..., Any]:
    def call(self: EgressGuard, *args: Any) -> Awaitable[None] | None:
        chain = self._chains.get(hook)
        if chain is None:
            chain = self._chains[hook] = self._chain(hook)
        for i, method in enumerate(chain):
            result = method(*args)
            if result is not None and inspect.isawaitable(result):
                return self._finish(result, chain[i + 1 :], args)
        return None

    call.__name__ = hook
    return call


EgressGuard._chains = {}  # type: ignore[attr-defined]
for _hook in sorted(
    {
        name
        for cls in (Setup, Identity, Blocklist, Uploads, Markers, Audit)
        for name in vars(cls)
        if not name.startswith("_") and name != "name" and callable(vars(cls)[name])
    }
    - {"SLICE"}
):
    setattr(EgressGuard, _hook, _dispatch(_hook))


def make_addons(gateway: Gateway | None = None) -> list[object]:
    bodygate.install()
    guard = EgressGuard(gateway or Gateway())
    guard._chains = {}  # type: ignore[attr-defined]
    return [guard]
