"""Gateway: the runtime the adapters share (policy, store, audit log, upload windows, scan pool,
servers), its startup and shutdown, and the one addon mitmproxy sees.

``EgressGuard`` calls, for every hook, Setup (here) and then the adapters in ``adapters/`` in
this order: Identity → Blocklist → Uploads → Markers → Audit. Each adapter turns a flow into
plain values, calls the pure functions (``identity``, ``decision``, ``upload``, ``scan``) and
acts on the answer; refusals that cannot wait for the body go through ``bodygate``. Per-flow
state lives in ``flow.metadata`` (``flows``); the only per-connection state is who opened a
CONNECT, dropped when the client disconnects.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx
from mitmproxy.addonmanager import Loader

from egress_guard import metrics
from egress_guard.console import app as console
from egress_guard.console.accounts import AccountBook, accounts_path
from egress_guard.core.hosts import split_host_port
from egress_guard.core.identity import Who
from egress_guard.core.policy import (
    Policy,
    PolicyError,
    PolicyWatcher,
    default_policy_dir,
    load_policy,
)
from egress_guard.core.scan import MarkerPolicy, ScanResult, scan_body, scan_in_worker
from egress_guard.core.units import parse_size
from egress_guard.core.upload import UploadWindows
from egress_guard.requestlog.auditlog import AuditLog, RequestRow
from egress_guard.requestlog.spool import Spool
from egress_guard.requestlog.store import Store, default_dsn, describe_dsn

from . import bodygate
from .adapters.audit import Audit
from .adapters.blocklist import Blocklist
from .adapters.identity import Identity
from .adapters.markers import Markers
from .adapters.uploads import Uploads

log = logging.getLogger("egress_guard")


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


def quiet_cancelled_clients(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """After mitmproxy's run ends, asyncio cancels the tasks of clients still connected, and
    Python 3.11's stream callback reports each CancelledError with a traceback (fixed in
    3.12). Those are not errors; everything else goes to the default handler."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def parse_listen(value: str, what: str) -> tuple[str, int]:
    host, port = split_host_port(value)
    if port is None or not 0 <= port <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, got {value!r}")
    return host or "127.0.0.1", port


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
        self._accounts_task: asyncio.Task[None] | None = None
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
        store_note = ""
        try:
            self.store.open_schema(policy.retention_months)
        except Exception as e:
            # The embedded store is a local directory: failing is fatal. A server may simply
            # be down; the proxy starts and its rows wait in the spool until it answers.
            if self.store.embedded:
                raise
            store_note = f"; UNREACHABLE now ({e}), rows are spooled until it answers"
            log.error("store unreachable at start, rows are spooled until it answers: %s", e)
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
        if self.store.schema_ready:
            self._seed_windows()
        self.audit.start()
        kind = "embedded" if self.store.embedded else "server"
        return [
            f"policy   {config.policies} ({policy.summary()})",
            f"store    {describe_dsn(config.dsn)} ({kind}), request log kept "
            f"{policy.retention_months} months{store_note}",
        ]

    def start_servers(self, confdir: Path) -> list[str]:
        """Console, admin API and metrics; called on the running event loop. ``confdir`` holds
        mitmproxy's CA, which signs the console's certificate."""
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
            console_ctx = console.ConsoleContext(
                bootstrap_token=token,
                accounts=AccountBook(accounts_path(self.config.data_dir)),
                store=self.store,
                status=self.status,
                node=self.node,
            )
            tls = console.tls_context(confdir, self.config.data_dir, host)
            self._servers.append(console.serve(console_ctx, host, port, tls))
            self._accounts_task = asyncio.get_running_loop().create_task(
                console.watch_accounts(console_ctx)
            )
            where = console.token_path(self.config.data_dir)
            url_host = f"[{host}]" if ":" in host else host
            lines.append(
                f"console  https://{url_host}:{port}/ and API /api/v1/ (bootstrap admin token in "
                f"{where}{', created now' if created else ''}; accounts: egress-guard account)"
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
        for task in (self._watch_task, self._remote_task, self._accounts_task):
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
                "store_ok": self.audit.store_ok and bool(self.store and self.store.schema_ready),
                "spool_bytes": self.audit.spool.size(),
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
                try:
                    await loop.run_in_executor(
                        None, self.store.open_schema, self.policy.retention_months
                    )
                except Exception as e:  # a store that is down gets it when it is back
                    log.error("cannot set the retention in the store now: %s", e)
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


class Setup:
    """Options, startup and shutdown. With ``egress-guard run`` the CLI starts the gateway
    before mitmproxy; with ``mitmdump -s`` this addon starts it from the ``egress_*`` options."""

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
        for line in self.gw.start_servers(Path(ctx.options.confdir).expanduser()):
            print(line, flush=True)
        print("egress-guard ready", flush=True)

    def done(self) -> None:
        self.gw.stop()

    def client_disconnected(self, client: connection.Client) -> None:
        self.gw.connect_who.pop(client.id, None)


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


def mitmproxy_addons() -> list[object]:
    """The mitmproxy addons ``egress-guard run`` loads: what a gateway needs, not the
    interactive tool's kit (replay, export, map local/remote, header rewriting, HAR files…).

    mitmproxy calls every hook on every addon in its chain, implemented or not, and under
    load that dispatch is most of the proxy's own CPU time; 10 addons instead of 34 make each
    request cheaper. Someone who wants the rest runs ``mitmdump -s egress_guard_addon.py``.
    """
    from mitmproxy.addons import (
        block,
        core,
        disable_h2c,
        errorcheck,
        next_layer,
        proxyauth,
        proxyserver,
        script,
        tlsconfig,
        upstream_auth,
    )

    return [
        core.Core(),
        block.Block(),  # block_global: no open proxy for the internet
        disable_h2c.DisableH2C(),  # no h2c upgrades past the HTTP/1 checks
        proxyauth.ProxyAuth(),  # identity
        proxyserver.Proxyserver(),
        script.ScriptLoader(),  # the admin's own extra scripts (--set scripts=…)
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        upstream_auth.UpstreamAuth(),  # a parent proxy that wants credentials
        errorcheck.ErrorCheck(),  # exit 1 on startup errors (port in use, bad options)
    ]


def skip_test_task_names() -> None:
    """mitmproxy 11 names every task it creates (several per request) and, for its own test
    suite, looks up ``PYTEST_CURRENT_TEST`` in the environment each time; the miss raises and
    catches a KeyError inside ``os.environ.get``. That lookup was about 8 % of the proxy
    loop's busy time under small-request load. ``egress-guard run`` names tasks the same way
    without it (only if the function still has the shape this was written for)."""
    from mitmproxy.utils import asyncio_utils

    def set_task_debug_info(
        task: asyncio.Task[Any], *, name: str, client: tuple[Any, ...] | None = None
    ) -> None:
        task.created = time.time()  # type: ignore[attr-defined]
        task.set_name(name)
        if client:
            task.client = client  # type: ignore[attr-defined]

    if asyncio_utils.set_task_debug_info.__code__.co_varnames[:3] == ("task", "name", "client"):
        asyncio_utils.set_task_debug_info = set_task_debug_info  # else: another mitmproxy


def make_addons(gateway: Gateway | None = None) -> list[object]:
    bodygate.install()
    guard = EgressGuard(gateway or Gateway())
    guard._chains = {}  # type: ignore[attr-defined]
    return [guard]
