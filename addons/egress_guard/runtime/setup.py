"""Setup: the gateway's options, startup and shutdown inside mitmproxy. With ``egress-guard run``
the CLI starts the gateway before mitmproxy; with ``mitmdump -s`` this starts it from the
``egress_*`` options, which are made from the table of ``settings``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from egress_guard.core.policy import PolicyError

from .gateway import Gateway
from .settings import SETTINGS, Setting, SettingError, gateway_config, value_of

log = logging.getLogger("egress_guard")

OPTIONS = tuple(s for s in SETTINGS if s.gateway)  # the proxy's listen address is mitmproxy's


def _option_name(setting: Setting) -> str:
    return setting.option


class Setup:
    """Options, startup and shutdown. With ``egress-guard run`` the CLI starts the gateway
    before mitmproxy; with ``mitmdump -s`` this addon starts it from the ``egress_*`` options."""

    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def load(self, loader: Loader) -> None:
        for s in OPTIONS:
            loader.add_option(s.option, str, s.default, s.help, choices=s.choices or None)

    def configure(self, updated: set[str]) -> None:
        self._check([s for s in OPTIONS if s.option in updated])
        # A blocked host must never be contacted: no upstream connection before the first
        # request is decided, so no early DNS lookup or TCP connect at CONNECT time.
        if ctx.options.connection_strategy != "lazy":
            ctx.options.connection_strategy = "lazy"

    def _check(self, changed: list[Setting]) -> None:
        """Refuse a value its setting does not take (mitmproxy 11 keeps ``choices`` for its
        help only: ``--set egress_audit_fail=close`` would otherwise run failing open)."""
        try:
            for s in changed:
                value_of(s, getattr(ctx.options, s.option), _option_name)
        except SettingError as e:
            if self.gw.started:  # egress-guard run's --set, or a change at run time
                raise exceptions.OptionsError(str(e)) from None
            # mitmdump -s: the script loads in a task after the command line is read; an
            # OptionsError there is logged with a traceback and mitmdump exits only once its
            # proxy listens. Stop here, before it does, saying why, as mitmdump would.
            print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def running(self) -> None:
        if not self.gw.started:
            try:
                config = gateway_config(
                    {s.name: getattr(ctx.options, s.option) for s in OPTIONS}, _option_name
                )
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
        for line in self.gw.start_servers(
            Path(ctx.options.confdir).expanduser(),
            ctx.master.addons.get("proxyserver").listen_addrs(),
        ):
            print(line, flush=True)
        print("egress-guard ready", flush=True)

    def done(self) -> None:
        self.gw.stop()
