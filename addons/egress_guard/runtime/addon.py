"""The addon mitmproxy sees, and the mitmproxy addons it runs beside.

``EgressGuard`` is one addon whose hooks are written out below, each calling the concern
adapters in the order the gateway's decisions need: Identity (who) → Portal (the gateway's own
exception-request host, answered here) → Blocklist (may this destination be reached) →
Uploads (byte caps) → Markers (secret markings) → Audit (the row, last, so it records what
the others decided). Only the methods written here are hooks: an
adapter's public method never becomes one by accident.

Why one addon: mitmproxy wraps every call of every addon's hook in its own error-handling
context, and with six addons that dispatch cost more per request than all of the gateway's own
decisions (py-spy under load). An adapter's coroutine is awaited before the next adapter runs,
as mitmproxy would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import connection, http, tcp, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layers, server_hooks

from . import bodygate
from .adapters.audit import Audit
from .adapters.blocklist import Blocklist
from .adapters.identity import Identity
from .adapters.markers import Markers
from .adapters.portal import Portal
from .adapters.uploads import Uploads
from .gateway import Gateway
from .protocol_errors import ProtocolErrorData
from .setup import Setup


async def _then(first: Awaitable[None], then: Callable[[Any], None], arg: Any) -> None:
    await first
    then(arg)


class EgressGuard:
    name = "egress_guard"

    def __init__(self, gateway: Gateway):
        self.setup = Setup(gateway)
        self.identity = Identity(gateway)
        self.portal = Portal(gateway)
        self.blocklist = Blocklist(gateway)
        self.uploads = Uploads(gateway)
        self.markers = Markers(gateway)
        self.audit = Audit(gateway)

    # --- lifecycle ---

    def load(self, loader: Loader) -> None:
        self.setup.load(loader)

    def configure(self, updated: set[str]) -> None:
        self.setup.configure(updated)

    def running(self) -> None:
        self.setup.running()

    def done(self) -> None:
        self.setup.done()

    def client_disconnected(self, client: connection.Client) -> None:
        self.identity.client_disconnected(client)
        self.blocklist.client_disconnected(client)

    # --- CONNECT and the layers inside a tunnel ---

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        self.identity.http_connect(flow)
        lookup = self.blocklist.http_connect(flow)  # a coroutine when a name must be resolved
        if lookup is None:
            self.audit.http_connect(flow)
            return None
        return _then(lookup, self.audit.http_connect, flow)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        self.blocklist.tls_clienthello(data)

    def next_layer(self, nextlayer: layers.NextLayer) -> None:
        self.blocklist.next_layer(nextlayer)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> Awaitable[None]:
        return self.blocklist.server_connect(data)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        self.audit.tls_failed_client(data)

    def egress_protocol_error(self, data: ProtocolErrorData) -> None:
        """A request refused before any flow hook saw it (malformed, unparsable): its row."""
        self.audit.egress_protocol_error(data)

    # --- HTTP requests ---

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        self.identity.requestheaders(flow)
        if self.portal.requestheaders(flow):
            return None  # the gateway's own portal host: answered here, never forwarded
        lookup = self.blocklist.requestheaders(flow)  # a coroutine when a name must be resolved
        if lookup is None:
            self._after_destination(flow)
            return None
        return _then(lookup, self._after_destination, flow)

    def _after_destination(self, flow: http.HTTPFlow) -> None:
        self.blocklist.refuse(flow)
        self.uploads.requestheaders(flow)
        self.markers.requestheaders(flow)
        self.audit.requestheaders(flow)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The body is complete and held, nothing of it forwarded: its verdict (a coroutine
        when there is something to scan; None keeps the hot path free of one). The caps were
        counted as it arrived."""
        if self.portal.request(flow):
            return None
        self.uploads.request(flow)
        return self.markers.request(flow)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self.audit.response(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.audit.error(flow)

    # --- WebSocket ---

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.markers.websocket_start(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        self.uploads.websocket_message(flow)
        scanning = self.markers.websocket_message(flow)
        if scanning is None:
            self.audit.websocket_message(flow)
            return None
        return _then(scanning, self.audit.websocket_message, flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.audit.websocket_end(flow)

    # --- raw TCP: pass-through tunnels, and non-HTTP bytes inside tunnels ---

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self.identity.tcp_start(flow)
        self.blocklist.tcp_start(flow)
        self.uploads.tcp_start(flow)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        self.audit.tcp_message(flow)

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self.audit.tcp_end(flow)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        self.audit.tcp_error(flow)


def make_addons(gateway: Gateway | None = None) -> list[object]:
    bodygate.install()
    return [EgressGuard(gateway or Gateway())]


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
