"""Gateway: the mitmproxy addons (thin adapters) and the shared runtime they carry out decisions in.

Hook order is addon order: Setup → Identity → Blocklist → Audit. Each addon turns a flow into
plain values, calls the pure functions in ``identity`` / ``decision``, and acts on the answer.
Per-flow state lives in ``flow.metadata`` (gone with the flow); the only per-connection state
is who opened a CONNECT, dropped when the client disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks

from . import blockpage, console, metrics
from .auditlog import AuditLog, RequestRow, bounded, utc_from_timestamp
from .decision import ALLOW, Decision, RequestFacts, decide, is_passthrough, needs_interception
from .hosts import normalize_host, split_host_port
from .identity import Who, identify
from .policy import Policy, PolicyError, PolicyWatcher, default_policy_dir, load_policy
from .store import Store, default_dsn, describe_dsn

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


class Gateway:
    """What the addons share: the current policy, the store, the audit log and the servers."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.config: GatewayConfig | None = None
        self.watcher: PolicyWatcher | None = None
        self.store: Store | None = None
        self.audit: AuditLog | None = None
        self.connect_who: dict[str, Who] = {}
        self._servers: list[Any] = []
        self._watch_task: asyncio.Task[None] | None = None
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
        self.audit = AuditLog(
            self.store.insert_requests,
            on_written=metrics.AUDIT_ROWS_WRITTEN.inc,
            on_dropped=metrics.AUDIT_ROWS_DROPPED.inc,
            on_error=lambda e: metrics.AUDIT_INSERT_ERRORS.inc(),
        )
        metrics.AUDIT_QUEUE_DEPTH.set_function(self.audit.depth)
        self._publish_policy(policy)
        self.audit.start()
        kind = "embedded" if self.store.embedded else "server"
        return [
            f"policy   {config.policies} ({policy.summary()})",
            f"store    {describe_dsn(config.dsn)} ({kind}), request log kept "
            f"{policy.retention_months} months",
        ]

    def start_servers(self) -> list[str]:
        """Admin API and metrics; called on the running event loop."""
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
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_policy())
        return lines

    def stop(self) -> None:
        """Stop servers, flush the audit queue, close the store. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._watch_task:
            self._watch_task.cancel()
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

    def _publish_policy(self, policy: Policy) -> None:
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

    def record(self, row: RequestRow) -> None:
        row.node = self.node
        metrics.REQUESTS.labels(row.kind, row.decision, row.reason_kind, row.category).inc()
        if self.audit is not None:
            self.audit.submit(row)


# --- flow helpers ----------------------------------------------------------------------------


def _proxyauth_user(flow: http.HTTPFlow) -> str | None:
    auth = flow.metadata.get("proxyauth")
    return auth[0] if auth else None


def _client_ip(client: connection.Client) -> str:
    return client.peername[0] if client.peername else ""


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


def _refusal(flow: http.HTTPFlow, state: FlowState, now: float) -> http.Response:
    d = state.decision
    rule = d.rule
    assert rule is not None
    refusal = blockpage.Refusal(
        status=403,
        title_en="Access blocked by company policy",
        title_zh="根据公司规定，已阻止访问",
        reason_en=rule.reason.en,
        reason_zh=rule.reason.zh,
        category=d.category,
        rule_id=d.rule_id,
        user=state.who.user,
        client_ip=_client_ip(flow.client_conn),
        host=d.host,
        request_id=flow.id,
        when=datetime.fromtimestamp(now, UTC),
    )
    return http.Response.make(403, blockpage.render(refusal), blockpage.headers(refusal))


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


class Blocklist:
    """Carries out blocklist decisions at CONNECT, TLS ClientHello, request headers and, as
    the last line, before any upstream connection."""

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

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        host = data.client_hello.sni or (
            data.context.server.address[0] if data.context.server.address else ""
        )
        if not host:
            return
        hosts = (host,)
        policy = self.gw.policy
        blocked = decide(RequestFacts(hosts, None), policy).verdict == "block"
        if not blocked and not needs_interception(hosts, policy) and is_passthrough(host, policy):
            data.ignore_connection = True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        decision = self._decide(flow, flow.request.path)
        if decision.verdict == "block" and flow.response is None:  # keep proxyauth's 407
            flow.response = _refusal(flow, flow.metadata[STATE], self.gw.clock())

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if not address:
            return
        decision = decide(RequestFacts((address[0], data.server.sni or ""), None), self.gw.policy)
        if decision.verdict == "block":
            data.server.error = f"egress-guard: {address[0]} is blocked by rule {decision.rule_id}"


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
        body = len(req.raw_content) if req.raw_content else 0
        first_line = len(req.method) + len(req.path) + len(req.http_version) + 4
        error = flow.error.msg if flow.error else ""
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
        )

    def _finish(self, flow: http.HTTPFlow, kind: str = "http") -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is not None and state.logged:
            return
        if state is not None:
            state.logged = True
        self.gw.record(self._http_row(flow, state, kind))

    def http_connect(self, flow: http.HTTPFlow) -> None:
        row = self._http_row(flow, flow.metadata.get(STATE), "connect")
        row.status = flow.response.status_code if flow.response else 200  # 407 from proxyauth
        self.gw.record(row)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        row = self._http_row(flow, flow.metadata.get(STATE), "websocket")
        sent = sum(len(m.content) for m in flow.websocket.messages if m.from_client)
        received = sum(len(m.content) for m in flow.websocket.messages if not m.from_client)
        row.upload_bytes, row.request_bytes, row.response_bytes = sent, sent, received
        row.request_id = f"{flow.id}/ws"
        self.gw.record(row)

    def _tunnel_row(
        self,
        context_client: connection.Client,
        server: connection.Server,
        sni: str | None,
        error: str,
        intercepted: bool,
    ) -> RequestRow:
        host, port = server.address if server.address else (sni or "", 0)
        who = self.gw.connect_who.get(context_client.id) or identify(
            _client_ip(context_client), None, self.gw.policy
        )
        decision = decide(RequestFacts((host, sni or ""), None), self.gw.policy)
        return RequestRow(
            ts=utc_from_timestamp(context_client.timestamp_start),
            request_id=f"{context_client.id}/tunnel",
            client_ip=_client_ip(context_client),
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
            duration_ms=max(0, int((self.gw.clock() - context_client.timestamp_start) * 1000)),
        )

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if data.ignore_connection:  # pass-through (pinned app): log the tunnel we won't see into
            self.gw.record(
                self._tunnel_row(
                    data.context.client, data.context.server, data.client_hello.sni, "", False
                )
            )

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


def make_addons(gateway: Gateway | None = None) -> list[object]:
    gw = gateway or Gateway()
    return [Setup(gw), Identity(gw), Blocklist(gw), Audit(gw)]
