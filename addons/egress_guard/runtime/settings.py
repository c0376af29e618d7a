"""Settings: the gateway's startup settings, declared once, and the ``GatewayConfig`` made of
them. Both run paths are generated from the table: ``egress-guard run``'s options (``--spool-max``,
environment ``EGRESS_GUARD_SPOOL_MAX``; in ``cli``) and the mitmproxy options of
``mitmdump -s`` (``egress_spool_max``; in ``setup``), with the same defaults, choices and help,
and one function turns the values as written into the config, refusing a bad one by name.
Neither click nor mitmproxy is imported here.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_guard.core.hosts import split_host_port
from egress_guard.core.policy import default_policy_dir
from egress_guard.core.units import parse_size
from egress_guard.requestlog.store import default_dsn

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


def _host_port(value: str) -> tuple[str, int]:
    host, port = split_host_port(value)
    if port is None or not 0 <= port <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host or "127.0.0.1", port


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT; a ValueError names ``what`` (e.g. ``--metrics``)."""
    try:
        return _host_port(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _address_or_off(value: str) -> str:
    if value:
        _host_port(value)
    return value


def _directory(value: str) -> Path:
    return Path(value).expanduser().resolve()


def _text(value: str) -> str:
    return value


@dataclass(frozen=True)
class Setting:
    """One setting: ``name`` is the GatewayConfig field (``spool_max``); ``default`` and every
    value arrive as text, as a person writes them; ``parse`` turns one into the config's value
    or raises ValueError saying what is wrong (the caller adds the setting's name)."""

    name: str
    default: str
    help: str
    parse: Callable[[str], Any] = _text
    choices: tuple[str, ...] = ()
    kind: str = "text"  # on the command line: "text" or "directory"
    show_default: bool = True  # False where the help says the default itself
    # True: a GatewayConfig field, and under mitmdump an ``egress_*`` option. False: the
    # proxy's own (its listen address): egress-guard run hands it to mitmproxy, mitmdump
    # takes it as its own --listen-host/--listen-port.
    gateway: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return "EGRESS_GUARD_" + self.name.upper()

    @property
    def option(self) -> str:
        """The mitmproxy option's name."""
        return "egress_" + self.name

    def value(self, raw: str) -> Any:
        if self.choices and raw not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise ValueError(f"{raw!r} is not one of {allowed}")
        return self.parse(raw)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        "127.0.0.1:8080",
        "Proxy HOST:PORT that browsers point at.",
        _host_port,
        gateway=False,
    ),
    Setting("admin", "127.0.0.1:8081", "Admin API HOST:PORT ('' = off).", _address_or_off),
    Setting(
        "metrics", "127.0.0.1:9464", "Prometheus /metrics HOST:PORT ('' = off).", _address_or_off
    ),
    Setting(
        "data_dir",
        DEFAULT_DATA_DIR,
        "State directory: embedded store, mitmproxy CA, admin token.",
        _directory,
        kind="directory",
    ),
    Setting(
        "policies",
        str(default_policy_dir()),
        "Policy directory [default: packaged].",
        _directory,
        kind="directory",
        show_default=False,
    ),
    Setting(
        "clickhouse",
        "",
        "ClickHouse DSN, e.g. http://user:pass@host:8123/egress "
        "[default: embedded chdb://DATA_DIR/clickhouse].",
        show_default=False,
    ),
    Setting(
        "node",
        socket.gethostname(),
        "Node name in every log row [default: hostname].",
        show_default=False,
    ),
    Setting(
        "spool_max",
        "2GiB",
        "Disk for log rows the store has not taken yet (DATA_DIR/spool).",
        parse_size,
    ),
    Setting(
        "audit_fail",
        "closed",
        "When rows cannot be kept: refuse requests (closed) or forward them (open).",
        choices=("closed", "open"),
    ),
    Setting(
        "audit_sync",
        "batch",
        "batch: rows reach disk every 0.5 s; request: a response waits for its row.",
        lambda value: value == "request",
        choices=("batch", "request"),
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}


class SettingError(ValueError):
    """A value a setting does not take; the message names the setting as the user wrote it."""


def _flag(setting: Setting) -> str:
    return setting.flag


def value_of(setting: Setting, raw: str, spelled: Callable[[Setting], str] = _flag) -> Any:
    """The setting's value from ``raw``; a SettingError names it by ``spelled``."""
    try:
        return setting.value(raw)
    except ValueError as e:
        raise SettingError(f"{spelled(setting)}: {e}") from None


def gateway_config(
    values: Mapping[str, str], spelled: Callable[[Setting], str] = _flag
) -> GatewayConfig:
    """The config from every gateway setting's value as written (``{"spool_max": "2GiB", …}``);
    a SettingError names a bad one by ``spelled`` (``--spool-max``, or ``egress_spool_max``)."""
    return GatewayConfig(
        **{s.name: value_of(s, values[s.name], spelled) for s in SETTINGS if s.gateway}
    )
