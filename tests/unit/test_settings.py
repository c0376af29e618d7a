"""Settings: each declared once (``runtime.settings``) and seen alike by both run paths, the
options of ``egress-guard run`` and the ``egress_*`` mitmproxy options of ``mitmdump -s``; a
bad value stops either path before the proxy starts, naming the option and what it accepts."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from egress_guard import cli
from egress_guard.runtime import gateway as gateway_module
from egress_guard.runtime.gateway import Gateway
from egress_guard.runtime.settings import SETTINGS, Setting, SettingError, gateway_config
from egress_guard.runtime.setup import Setup
from harness import READY_LINE, egress_guard_bin, free_port
from support import POLICIES, REPO

ADDON = REPO / "addons" / "egress_guard_addon.py"

View = dict[str, tuple[Any, ...]]


def click_view(command: click.Command) -> View:
    """name → (flags, envvar, default, choices, help) of the command's options."""
    view = {}
    for p in command.params:
        if p.name == "mitm_sets":  # mitmproxy's own options, passed through as they are
            continue
        choices = tuple(p.type.choices) if isinstance(p.type, click.Choice) else ()
        view[str(p.name)] = (tuple(p.opts), p.envvar, p.default, choices, getattr(p, "help", ""))
    return view


def mitmproxy_view(addon: Any) -> View:
    """name → (default, choices, help) of the ``egress_*`` options the addon registers."""
    with taddons.context(Proxyserver(), addon) as tctx:
        return {
            name.removeprefix("egress_"): (o.default, tuple(o.choices or ()), o.help)
            for name, o in tctx.options.items()
            if name.startswith("egress_")
        }


def differences(table: tuple[Setting, ...], run: View, mitmdump: View) -> list[str]:
    """What either run path shows differently from the table (empty: they agree)."""
    want_run = {s.name: ((s.flag,), s.envvar, s.default, s.choices, s.help) for s in table}
    want_mitmdump = {s.name: (s.default, s.choices, s.help) for s in table if s.gateway}
    found = []
    for where, want, seen in (("run", want_run, run), ("mitmdump", want_mitmdump, mitmdump)):
        for name in sorted(want.keys() | seen.keys()):
            if want.get(name) != seen.get(name):
                found.append(f"{where} {name}: table {want.get(name)} != {seen.get(name)}")
    return found


def test_every_setting_is_in_both_run_paths_with_the_same_default():
    run, mitmdump = click_view(cli.run), mitmproxy_view(Setup(Gateway()))
    assert differences(SETTINGS, run, mitmdump) == []
    assert {s.name for s in SETTINGS} == {
        "listen",
        "admin",
        "metrics",
        "data_dir",
        "policies",
        "clickhouse",
        "node",
        "spool_max",
        "audit_fail",
        "audit_sync",
    }
    # mitmdump has its own --listen-host / --listen-port; everything else is in both.
    assert set(run) - set(mitmdump) == {"listen"}
    for name, (default, choices, _help) in mitmdump.items():
        assert (run[name][2], run[name][3]) == (default, choices), name


def test_the_comparison_sees_a_path_that_differs():
    """The check above can fail: a default, a choice or an option missing on one path."""
    run, mitmdump = click_view(cli.run), mitmproxy_view(Setup(Gateway()))
    bent = tuple(replace(s, default="3GiB") if s.name == "spool_max" else s for s in SETTINGS)
    found = differences(bent, run, mitmdump)
    assert [f.split(":")[0] for f in found] == ["run spool_max", "mitmdump spool_max"]
    assert all("3GiB" in f and "2GiB" in f for f in found), found
    del mitmdump["audit_fail"]
    (found,) = differences(SETTINGS, run, mitmdump)
    assert found.startswith("mitmdump audit_fail: table ('closed'") and found.endswith("!= None")


def test_gateway_config_from_the_values_as_written(tmp_path):
    values = {s.name: s.default for s in SETTINGS} | {
        "data_dir": str(tmp_path / "d" / ".." / "data"),
        "spool_max": "4KiB",
        "audit_sync": "request",
        "audit_fail": "open",
        "admin": "",
    }
    config = gateway_config(values)
    assert config.data_dir == tmp_path / "data"  # resolved
    assert (config.spool_max, config.audit_sync, config.audit_fail) == (4096, True, "open")
    assert (config.admin, config.metrics) == ("", "127.0.0.1:9464")
    assert config.dsn == f"chdb://{tmp_path / 'data' / 'clickhouse'}"


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("audit_fail", "close", "'close' is not one of 'closed', 'open'"),
        ("audit_sync", "always", "'always' is not one of 'batch', 'request'"),
        ("spool_max", "lots", "'lots' is not a size (examples: 10MiB, 1GB, 512KiB, 1048576)"),
        ("admin", "nowhere", "'nowhere' is not HOST:PORT"),
        ("metrics", "127.0.0.1:99999", "'127.0.0.1:99999' is not HOST:PORT"),
    ],
)
def test_a_bad_value_is_named_as_each_run_path_spells_it(name, value, problem):
    values = {s.name: s.default for s in SETTINGS} | {name: value}
    with pytest.raises(SettingError) as e:
        gateway_config(values)
    assert str(e.value) == f"--{name.replace('_', '-')}: {problem}"
    with pytest.raises(SettingError) as e:
        gateway_config(values, spelled=lambda s: s.option)
    assert str(e.value) == f"egress_{name}: {problem}"


class StartedGateway(Gateway):
    started = True  # type: ignore[assignment]  # as with egress-guard run: the CLI started it


def test_a_running_gateway_refuses_a_bad_mitmproxy_option():
    """``egress-guard run --set egress_audit_fail=close``, or a change at run time: mitmproxy
    rolls the change back and reports it."""
    with taddons.context(Proxyserver(), Setup(StartedGateway())) as tctx:
        with pytest.raises(exceptions.OptionsError, match="egress_audit_fail: 'close' is not"):
            tctx.options.update(egress_audit_fail="close")
        assert tctx.options.egress_audit_fail == "closed"


@pytest.fixture
def no_gateway(monkeypatch):
    """``egress-guard run`` must stop before it builds a gateway."""

    class Refused(Gateway):
        def start(self, config: Any) -> list[str]:
            raise AssertionError("the gateway was started")

    monkeypatch.setattr(gateway_module, "Gateway", Refused)


def run_args(tmp_path: Path) -> list[str]:
    return [
        "run",
        "--data-dir",
        str(tmp_path / "data"),
        "--policies",
        str(POLICIES),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin",
        "",
        "--metrics",
        "",
    ]


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--audit-fail", "close", "'close' is not one of 'closed', 'open'."),
        ("--spool-max", "lots", "'lots' is not a size"),
        ("--admin", "nowhere", "'nowhere' is not HOST:PORT"),
        ("--listen", "127.0.0.1:99999", "'127.0.0.1:99999' is not HOST:PORT"),
    ],
)
def test_run_refuses_a_bad_value_naming_the_option(tmp_path, no_gateway, flag, value, problem):
    result = CliRunner().invoke(cli.main, [*run_args(tmp_path), flag, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}': {problem}" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_run_refuses_a_bad_value_from_the_environment(tmp_path, no_gateway):
    result = CliRunner().invoke(
        cli.main, run_args(tmp_path), env={"EGRESS_GUARD_AUDIT_FAIL": "close"}
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--audit-fail': 'close' is not one of 'closed', 'open'." in (
        result.output
    )


def start_refused(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a start that must be refused; it must end by itself, long before the timeout."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert READY_LINE not in output and "listening at" not in output, output  # no proxy
    assert "Traceback" not in output, output
    return result


BAD = [
    ("audit_fail", "close", "'close' is not one of 'closed', 'open'"),
    ("spool_max", "lots", "'lots' is not a size"),
]


@pytest.mark.parametrize(("name", "value", "problem"), BAD)
def test_mitmdump_stops_before_the_proxy_on_a_bad_value(tmp_path, name, value, problem):
    mitmdump = str(Path(egress_guard_bin()).with_name("mitmdump"))
    sets = {
        "confdir": tmp_path / "mitmproxy",
        "egress_data_dir": tmp_path / "data",
        "egress_policies": POLICIES,
        "egress_admin": "",
        "egress_metrics": "",
        f"egress_{name}": value,
    }
    cmd = [mitmdump, "-s", str(ADDON), "--listen-host", "127.0.0.1"]
    cmd += ["--listen-port", str(free_port())]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    result = start_refused(cmd)
    assert f"egress_{name}: {problem}" in result.stderr


@pytest.mark.parametrize(("name", "value", "problem"), BAD)
def test_run_stops_before_the_proxy_on_a_bad_value(tmp_path, name, value, problem):
    flag = f"--{name.replace('_', '-')}"
    result = start_refused([egress_guard_bin(), *run_args(tmp_path), flag, value])
    assert f"Invalid value for '{flag}': {problem}" in result.stderr


def test_run_help_lists_every_option():
    result = CliRunner().invoke(cli.main, ["run", "--help"], terminal_width=100)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for s in SETTINGS:
        assert s.flag in text and " ".join(s.help.split()) in text, s.name
        if s.choices:
            assert f"[{'|'.join(s.choices)}]" in text
    assert "--set KEY=VALUE" in text and "Any mitmproxy option" in text
    assert "[default: 127.0.0.1:8080]" in text and "[default: closed]" in text
