"""Gateway: the runtime the adapters share — the current policy, the clock, the upload windows,
the scan pool, the request log — with its startup and shutdown and the servers beside the proxy
(console, admin API, metrics). The adapters see it through the narrow ``adapters.Runtime``
interface; the addon mitmproxy sees is in ``addon``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from egress_guard import metrics
from egress_guard.console import app as console
from egress_guard.console import exception_ops
from egress_guard.console.accounts import AccountBook, accounts_path
from egress_guard.core.exceptions import ActiveExceptions, Event
from egress_guard.core.policy import Policy, PolicyWatcher, load_policy
from egress_guard.core.upload import UploadWindows
from egress_guard.notify import ExceptionNotice, Notifier
from egress_guard.requestlog.auditlog import AuditLog, RequestRow
from egress_guard.requestlog.exception_snapshot import ExceptionBook, ExceptionSnapshot
from egress_guard.requestlog.spool import Spool
from egress_guard.requestlog.store import Store, describe_dsn

from .background import DaemonExecutor
from .flows import FlowState
from .heldbody import HoldSpec
from .portal import Portal as PortalService
from .portal import load_key
from .resolver import Destinations
from .scanpool import ScanPool
from .settings import GatewayConfig, parse_listen

log = logging.getLogger("egress_guard")
NO_EXCEPTIONS = ActiveExceptions()


def quiet_cancelled_clients(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """After mitmproxy's run ends, asyncio cancels the tasks of clients still connected, and
    Python 3.11's stream callback reports each CancelledError with a traceback (fixed in
    3.12). Those are not errors; everything else goes to the default handler."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


class Gateway:
    """What the addons share: the current policy, the store, the audit log and the servers."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        open_store: Callable[[str], Store] = Store,
        after_insert: Callable[[], None] = lambda: None,
    ):
        self.clock = clock
        # Collaborators a caller may replace (the durability tests: a store that fails on
        # demand, a process that dies between an insert and its checkpoint).
        self._open_store = open_store
        self._after_insert = after_insert
        self.config: GatewayConfig | None = None
        self.watcher: PolicyWatcher | None = None
        self.store: Store | None = None
        self.audit: AuditLog | None = None
        self.tunnels: dict[str, FlowState] = {}  # the CONNECT's state, by client connection
        self.windows = UploadWindows(24 * 3600, clock)
        self.scans = ScanPool()
        self.destinations = Destinations(clock)
        self._hold: HoldSpec | None = None
        self.book: ExceptionBook | None = None  # approved exceptions: events, snapshot, store
        self.portal: PortalService | None = None  # employees' exception requests
        self.notifier: Notifier | None = None  # the policy's notifications, sent in background
        self._servers: list[Any] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._remote_task: asyncio.Task[None] | None = None
        self._accounts_task: asyncio.Task[None] | None = None
        self._exceptions_task: asyncio.Task[None] | None = None
        self._stopped = False
        self._notify_source: tuple[Any, Any] = (None, None)

    @property
    def started(self) -> bool:
        return self.audit is not None

    @property
    def policy(self) -> Policy:
        assert self.watcher is not None, "gateway not started"
        return self.watcher.policy

    @property
    def hold(self) -> HoldSpec:
        """How request bodies are held until their verdict, under the current policy."""
        assert self._hold is not None, "gateway not started"
        return self._hold

    @property
    def node(self) -> str:
        return self.config.node if self.config else ""

    @property
    def exceptions(self) -> ActiveExceptions:
        """The exceptions in force, swapped whole by the book (read without a lock)."""
        return self.book.active if self.book is not None else NO_EXCEPTIONS

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- lifecycle ---

    def start(self, config: GatewayConfig) -> list[str]:
        """Load the policy, open and migrate the store, start the audit writer. Raises
        PolicyError / StoreError with a message for the admin. Returns banner lines."""
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        policy = load_policy(config.policies)
        self.watcher = PolicyWatcher(config.policies, policy)
        self.store = self._open_store(config.dsn)
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
            after_insert=self._after_insert,
        )
        metrics.AUDIT_QUEUE_DEPTH.set_function(self.audit.depth)
        self._publish_policy(policy)
        self.hold.prepare()
        if self.store.schema_ready:
            self._seed_windows()
        self.book = ExceptionBook(
            ExceptionSnapshot(config.data_dir / "exceptions.snapshot"),
            self.store,
            clock=self.now_ms,
            node=config.node,
            on_error=lambda e: log.error("exceptions: %s", e),
        )
        self.book.start()  # the last known set, from disk: honoured (and expired) without a store
        self.portal = PortalService(
            load_key(config.data_dir / "portal-key"),
            self.clock,
            lambda: self.book,
            lambda: self.policy.approvals,
            notify=self._notify_request,
        )
        metrics.EXCEPTIONS_ACTIVE.set_function(
            lambda: self.exceptions.count_in_force(self.now_ms())
        )
        self.audit.start()
        kind = "embedded" if self.store.embedded else "server"
        return [
            f"policy   {config.policies} ({policy.summary()})",
            f"store    {describe_dsn(config.dsn)} ({kind}), request log kept "
            f"{policy.retention_months} months{store_note}",
        ]

    def start_servers(
        self, confdir: Path, proxy_listeners: Iterable[tuple[str, int]] = ()
    ) -> list[str]:
        """Console, admin API and metrics; called on the running event loop. ``confdir`` holds
        mitmproxy's CA, which signs the console's certificate; ``proxy_listeners`` are the
        addresses the proxy is bound to. None of these is ever reachable through the proxy."""
        # The proxy's loop shares the GIL with the log writer and the servers' threads; a
        # shorter switch interval than CPython's 5 ms keeps a busy writer from holding a
        # request up for a whole interval.
        sys.setswitchinterval(0.0005)
        # Background calls (store refreshes, the console's queries) on daemon threads: one
        # stuck in a hung store must not keep a stopping gateway alive.
        asyncio.get_running_loop().set_default_executor(DaemonExecutor())
        assert self.config is not None and self.store is not None
        lines = []
        own = [(str(a[0]), int(a[1])) for a in proxy_listeners]
        own += [
            parse_listen(v, w)
            for v, w in ((self.config.admin, "--admin"), (self.config.metrics, "--metrics"))
            if v
        ]
        self.destinations.listening(own)
        self.destinations.pin(asyncio.get_running_loop())
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
                # The approvers' workflow: this node's book, and the policy as it is now.
                exceptions=self.book,
                approval_rules=lambda: self.policy.approvals,
                target_category=lambda target: console.category_of(self.policy, target),
                groups_of=lambda name: console.groups_of(self.policy, name),
                notify=self.notify,
                exception_history=self.store.exception_events,
                wall_ms=self.now_ms,
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
        if self.policy.markers.active:
            self.scans.warm()
        self._watch_task = loop.create_task(self._watch_policy())
        self._exceptions_task = loop.create_task(self._refresh_exceptions())
        if not self.store.embedded:  # other nodes may write to a shared server
            self._remote_task = loop.create_task(self._refresh_remote_windows())
        return lines

    def stop(self) -> None:
        """Stop servers, flush the audit queue, close the store. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.scans.shutdown()
        if self.notifier is not None:  # what is waiting gets one more attempt
            self.notifier.close(timeout=5.0)
        for task in (
            self._watch_task,
            self._remote_task,
            self._accounts_task,
            self._exceptions_task,
        ):
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

    EXCEPTIONS_REFRESH = 2.0  # seconds: nodes sharing a store see each other's within 5 s

    async def _refresh_exceptions(self) -> None:
        """Pull what other nodes recorded, push what this node could not send yet, and let
        expiry bite: the book rebuilds its active set at each refresh and at each expiry."""
        assert self.book is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.EXCEPTIONS_REFRESH)
            try:
                await loop.run_in_executor(None, self.book.refresh)
            except Exception:  # never let the refresh die: expiry must go on biting
                log.exception("exceptions refresh crashed")

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
        assert self.config is not None
        self.windows.window_seconds = policy.uploads.window_seconds
        self._hold = HoldSpec(
            self.config.data_dir / "held",
            memory_bytes=policy.uploads.hold_in_memory,
            max_bytes=policy.markers.limits.max_body,
        )
        metrics.POLICY_RULES.clear()
        for name, stats in policy.stats.items():
            metrics.POLICY_RULES.labels(name).set(stats.rules)
        self._publish_notifications(policy)

    def _publish_notifications(self, policy: Policy) -> None:
        """A notifier for the policy's ``notifications`` section, replaced only when the
        section or its secrets changed (the old one flushes on a thread of its own)."""
        old = self.notifier
        if old is not None and self._notify_source == (
            policy.notifications,
            policy.notify_credentials,
        ):
            return
        self._notify_source = (policy.notifications, policy.notify_credentials)
        self.notifier = Notifier(
            policy.notifications,
            count=metrics.count_notification,
            depth=metrics.NOTIFICATION_QUEUE_DEPTH.set,
            base_dir=Path(policy.source),
            credentials=policy.notify_credentials,
        )
        if old is not None:
            threading.Thread(
                target=old.close, name="egress-guard-notify-close", daemon=True
            ).start()

    def notify(self, notice: ExceptionNotice) -> None:
        """Queue a notice of the exception workflow; returns at once, never raises."""
        if self.notifier is not None:
            self.notifier.submit(notice)

    def _notify_request(self, event: Event) -> None:
        """An employee's request from the block page: its approvers hear of it."""
        assert self.book is not None
        state = self.book.states().get(event.exception_id)
        outcome = exception_ops.Outcome("request", event.exception_id, state, event)
        exception_ops.send_notice(self.notify, outcome)

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

    @property
    def fails_closed(self) -> bool:
        """Requests are refused while the request log cannot keep their rows."""
        return self.config is not None and self.config.audit_fail == "closed"

    def refuses_for_audit(self) -> bool:
        """Fail closed: the request log cannot keep rows, so no request may pass unlogged."""
        return self.audit is not None and not self.audit.accepting and self.fails_closed
