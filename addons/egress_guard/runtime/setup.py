"""Setup: the gateway's options, startup and shutdown inside mitmproxy. With ``egress-guard run``
the CLI starts the gateway before mitmproxy; with ``mitmdump -s`` this starts it from the
``egress_*`` options."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from egress_guard.core.policy import PolicyError, default_policy_dir
from egress_guard.core.units import parse_size

from .gateway import DEFAULT_DATA_DIR, Gateway, GatewayConfig

log = logging.getLogger("egress_guard")


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
