"""A small driver for mitmproxy's HTTP layer, event by event, in process: a stand-in for the
Playbook of mitmproxy's own test suite, which the wheel does not ship. Blocking hooks go to the
given addon (its coroutines run to completion) or are answered at once; server connections open
at once; what the layer sends each connection is kept, so a test can ask what the upstream got
and when."""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
from mitmproxy import connection, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, context, events
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode

from egress_guard.runtime.protocol_errors import ProtocolErrorData, ProtocolErrorHook


@dataclass
class Proxy:
    """One client connection through mitmproxy's HttpLayer (regular mode). Blocking hooks are
    answered at once (no addon changes anything); server connections open at once."""

    alpn: bytes | None = None
    addon: Any = None  # gets every hook the layer raises, as mitmproxy would call it
    commands: list[commands.Command] = field(default_factory=list)
    servers: list[connection.Server] = field(default_factory=list)

    def __post_init__(self) -> None:
        opts = options.Options()
        Proxyserver().load(opts)
        self.client = connection.Client(
            peername=("127.0.0.1", 50000),
            sockname=("127.0.0.1", 8080),
            timestamp_start=time.time(),
            state=ConnectionState.OPEN,
        )
        self.client.alpn = self.alpn
        self.layer = HttpLayer(context.Context(self.client, opts), HTTPMode.regular)
        self.feed(events.Start())

    def feed(self, event: events.Event) -> list[commands.Command]:
        new: list[commands.Command] = []
        queue = [event]
        while queue:
            for command in self.layer.handle_event(queue.pop(0)):
                new.append(command)
                if isinstance(command, commands.StartHook) and command.blocking:
                    self.call_addon(command)
                    queue.append(events.HookCompleted(command))
                elif isinstance(command, commands.OpenConnection):
                    command.connection.state = ConnectionState.OPEN
                    command.connection.timestamp_start = time.time()
                    self.servers.append(command.connection)
                    queue.append(events.OpenConnectionCompleted(command, None))
                elif isinstance(command, commands.CloseConnection):
                    command.connection.state = ConnectionState.CLOSED
        self.commands += new
        return new

    def call_addon(self, hook: commands.StartHook) -> None:
        method = getattr(self.addon, hook.name, None) if self.addon is not None else None
        if method is None:
            return
        result = method(*hook.args())
        if inspect.isawaitable(result):
            asyncio.run(_awaited(result))

    def send(self, data: bytes) -> list[commands.Command]:
        return self.feed(events.DataReceived(self.client, data))

    def server_says(self, data: bytes) -> list[commands.Command]:
        return self.feed(events.DataReceived(self.servers[-1], data))

    def sent_to(self, conn: connection.Connection) -> bytes:
        return b"".join(
            c.data
            for c in self.commands
            if isinstance(c, commands.SendData) and c.connection is conn
        )

    def to_client(self) -> bytes:
        return self.sent_to(self.client)

    def to_server(self) -> bytes:
        return self.sent_to(self.servers[-1]) if self.servers else b""

    def hooks(self, kind: type) -> list[Any]:
        return [c for c in self.commands if isinstance(c, kind)]

    def refusals(self) -> list[ProtocolErrorData]:
        return [h.data for h in self.hooks(ProtocolErrorHook)]

    def closed(self) -> bool:
        return any(
            isinstance(c, commands.CloseConnection) and c.connection is self.client
            for c in self.commands
        )


@dataclass
class H2Client:
    """The client side of an HTTP/2 connection, lenient: it sends what a hostile client may."""

    proxy: Proxy
    h2: h2.connection.H2Connection = field(init=False)
    got: list[h2.events.Event] = field(default_factory=list)
    read: int = 0  # how much of what the proxy sent the client has been read

    def __post_init__(self) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        self.h2.local_settings.acknowledge()
        self.flush()

    def flush(self) -> None:
        """Send what the client has to send, read what the proxy has sent it."""
        if data := self.h2.data_to_send():
            self.proxy.send(data)
        received = self.proxy.to_client()
        self.got += self.h2.receive_data(received[self.read :])
        self.read = len(received)

    def request(
        self,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
        stream_id: int = 1,
        end: bool = True,
    ) -> None:
        self.h2.send_headers(stream_id, headers, end_stream=end and body is None and not trailers)
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=end and not trailers)
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        self.flush()

    def events(self, kind: type) -> list[Any]:
        return [e for e in self.got if isinstance(e, kind)]

    def status(self, stream_id: int = 1) -> bytes | None:
        for e in self.events(h2.events.ResponseReceived):
            if e.stream_id == stream_id:
                return dict(e.headers)[b":status"]
        return None


async def _awaited(awaitable: Any) -> None:
    await awaitable
