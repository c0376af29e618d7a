"""CLI: ``egress-guard run | ca export | check-policy | policy import-ut1 | account … |
audit query | audit export | audit verify``.

``run`` owns the store (the embedded engine opens its directory in one process only); the
audit commands talk to that process's admin API over HTTPS, in embedded and server mode alike.
``account`` edits the account file on the gateway host; the running gateway re-reads it.
Every option of ``run`` can also come from an ``EGRESS_GUARD_<NAME>`` environment variable;
those options are made from the table of ``runtime.settings``, as mitmdump's ``egress_*`` are.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from . import __version__
from .core.policy import PolicyError, default_policy_dir, load_policy
from .requestlog import evidence
from .requestlog.store import COLUMN_NAMES, SUMMARY_COLUMNS, StoreError
from .runtime.settings import BY_NAME, SETTINGS, Setting, SettingError, gateway_config, value_of

DATA_DIR_OPTION = click.option(
    BY_NAME["data_dir"].flag,
    type=click.Path(file_okay=False, path_type=Path),
    default=BY_NAME["data_dir"].default,
    envvar=BY_NAME["data_dir"].envvar,
    show_default=True,
    help=BY_NAME["data_dir"].help,
)


def _data_dir(path: Path) -> Path:
    return path.expanduser().resolve()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="egress-guard")
def main() -> None:
    """egress-guard: egress-control gateway (webmail / cloud-drive blocking, request log)."""


# --- run -------------------------------------------------------------------------------------


class _Checked(click.ParamType):
    """Text its setting's parser takes, so a bad value stops ``run`` naming the option."""

    name = "text"

    def __init__(self, setting: Setting):
        self.setting = setting

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            self.setting.value(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return value  # as written: gateway_config parses it


def _click_type(setting: Setting) -> click.ParamType:
    if setting.choices:
        return click.Choice(setting.choices)
    if setting.kind == "directory":
        return click.Path(file_okay=False)
    return _Checked(setting)


def _setting_options(command: Any) -> Any:
    """One option per setting of the table, in its order (``--spool-max``, ``$EGRESS_GUARD_…``)."""
    for s in reversed(SETTINGS):
        command = click.option(
            s.flag,
            type=_click_type(s),
            default=s.default,
            envvar=s.envvar,
            show_default=s.show_default,
            help=s.help,
        )(command)
    return command


@main.command()
@_setting_options
@click.option(
    "--set",
    "mitm_sets",
    multiple=True,
    metavar="KEY=VALUE",
    envvar="EGRESS_GUARD_SET",
    help="Any mitmproxy option, e.g. --set proxyauth=@/etc/egress/htpasswd (repeatable).",
)
@click.pass_obj
def run(make_gateway: Callable[[], Any] | None, mitm_sets: tuple[str, ...], **values: str) -> None:
    """Run the gateway until SIGINT/SIGTERM; the request log is flushed on the way out."""
    # ``make_gateway`` (the context's obj, None here) builds the Gateway: a caller of
    # ``main(obj=…)`` can hand it other collaborators, e.g. a store that fails on purpose.
    from .runtime import gateway

    try:
        listen_host, listen_port = value_of(BY_NAME["listen"], values["listen"])
        config = gateway_config(values)
    except SettingError as e:  # click checked each value already; this is the config's word
        raise click.UsageError(str(e)) from None
    gw = (make_gateway or gateway.Gateway)()
    try:
        banner = gw.start(config)
    except PolicyError as e:
        click.echo(f"egress-guard: invalid policy, not starting:\n{e}", err=True)
        sys.exit(2)
    except StoreError as e:
        click.echo(f"egress-guard: {e}", err=True)
        sys.exit(2)
    click.echo(f"egress-guard {__version__} on node {config.node}")
    click.echo(
        f"proxy    {listen_host}:{listen_port} (CA for clients: "
        f"egress-guard ca export --data-dir {config.data_dir})"
    )
    for line in banner:
        click.echo(line)
    exit_code = asyncio.run(_serve(gw, listen_host, listen_port, config.data_dir, mitm_sets))
    sys.exit(exit_code)


async def _serve(
    gateway: Any, host: str, port: int, data_dir: Path, mitm_sets: tuple[str, ...]
) -> int:
    from mitmproxy import exceptions, master, options

    from .runtime.addon import make_addons, mitmproxy_addons, skip_test_task_names
    from .runtime.gateway import quiet_cancelled_clients

    skip_test_task_names()

    opts = options.Options(confdir=str(data_dir / "mitmproxy"))
    proxy = master.Master(opts, with_termlog=True)
    proxy.addons.add(*mitmproxy_addons())
    proxy.addons.add(*make_addons(gateway))
    try:
        proxy.options.update(listen_host=host, listen_port=port, connection_strategy="lazy")
        proxy.options.set(*mitm_sets)
    except exceptions.OptionsError as e:
        click.echo(f"egress-guard: bad --set: {e}", err=True)
        gateway.stop()
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, proxy.shutdown)
    try:
        await proxy.run()  # mitmproxy exits 1 itself on startup errors (e.g. port in use)
    finally:
        loop.set_exception_handler(quiet_cancelled_clients)
        gateway.stop()
    return 0


# --- ca --------------------------------------------------------------------------------------


@main.group()
def ca() -> None:
    """The certificate authority that HTTPS interception uses."""


@ca.command("export")
@DATA_DIR_OPTION
def ca_export(data_dir: Path) -> None:
    """Print the CA certificate (PEM) that clients must trust. Creates it on first use."""
    from mitmproxy import certs

    confdir = _data_dir(data_dir) / "mitmproxy"
    certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    click.echo((confdir / "mitmproxy-ca-cert.pem").read_text(), nl=False)


# --- policy ----------------------------------------------------------------------------------


@main.command("check-policy")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
def check_policy(directory: Path | None) -> None:
    """Validate a policy directory and print its rules and hosts per category."""
    directory = directory or default_policy_dir()
    try:
        policy = load_policy(directory)
    except PolicyError as e:
        click.echo(f"{directory}: invalid policy:\n{e}", err=True)
        sys.exit(2)
    click.echo(f"{directory}: OK")
    for name, stats in policy.stats.items():
        tier = f"  ({stats.ut1_rules} from UT1)" if stats.ut1_rules else ""
        click.echo(f"  {name:<16} {stats.rules:>6} rules {stats.hosts:>7} hosts{tier}")
    if policy.ut1_excluded:
        click.echo(f"  ut1 exclusions   {len(policy.ut1_excluded):>6} entries not loaded")
    click.echo(f"  retention        {policy.retention_months:>6} months")
    click.echo(f"  passthrough      {policy.passthrough.rule_count:>6} hosts")
    click.echo(f"  identities       {len(policy.identities):>6} networks")


@main.group()
def policy() -> None:
    """Policy tools."""


@policy.command("import-ut1")
@click.argument("category")
@click.argument("sources", nargs=-1, required=True, type=click.File("r", encoding="utf-8"))
@click.option(
    "--source-version",
    default="",
    help="Which UT1 release the files are (e.g. mirror commit and date), for the header.",
)
@click.option(
    "-o",
    "--output",
    type=click.File("w", encoding="utf-8"),
    default="-",
    help="Where to write the policy YAML [default: stdout].",
)
def import_ut1(
    category: str, sources: tuple[io.TextIOBase, ...], source_version: str, output: io.TextIOBase
) -> None:
    """Turn UT1 'domains' / 'urls' FILEs into rules of CATEGORY (e.g. cloud_drive), tier ut1."""
    from .core.ut1 import Source, render, source_name

    read = [Source(source_name(f.name), f.read()) for f in sources]
    result = render(category, read, source_version)
    for name, line, entry, why in result.skipped:
        click.echo(f"{name}:{line}: skipped {entry!r}: {why}", err=True)
    output.write(result.text)
    click.echo(f"{result.rules} rules written, {len(result.skipped)} entries skipped", err=True)


# --- account ---------------------------------------------------------------------------------


@main.group()
def account() -> None:
    """Console and API accounts (run on the gateway host; the gateway picks changes up)."""


def _book(data_dir: Path) -> Any:
    from .console.accounts import AccountBook, accounts_path

    return AccountBook(accounts_path(_data_dir(data_dir)))


def _new_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@contextmanager
def _account_errors() -> Iterator[None]:
    from .console.accounts import AccountError

    try:
        yield
    except AccountError as e:
        raise click.ClickException(str(e)) from None


ROLE_OPTION = click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(["admin", "approver", "auditor"]),
    help="A role; repeat for several. Roles are separate powers: none implies another.",
)


@account.command("add")
@click.argument("name")
@ROLE_OPTION
@click.option("--no-password", is_flag=True, help="API token only, no console login.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@DATA_DIR_OPTION
def account_add(
    name: str, roles: tuple[str, ...], no_password: bool, password_stdin: bool, data_dir: Path
) -> None:
    """Create account NAME with the given roles."""
    with _account_errors():
        password = None if no_password else _new_password(password_stdin)
        _book(data_dir).add(name, roles, password)
    click.echo(f"account {name} created with roles {', '.join(sorted(set(roles)))}")


@account.command("roles")
@click.argument("name")
@ROLE_OPTION
@DATA_DIR_OPTION
def account_roles(name: str, roles: tuple[str, ...], data_dir: Path) -> None:
    """Replace the roles of account NAME (takes effect at its next request)."""
    with _account_errors():
        _book(data_dir).set_roles(name, roles)
    click.echo(f"account {name} now has roles {', '.join(sorted(set(roles)))}")


@account.command("password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@DATA_DIR_OPTION
def account_password(name: str, password_stdin: bool, data_dir: Path) -> None:
    """Set a new password for NAME; its open console sessions end."""
    with _account_errors():
        _book(data_dir).set_password(name, _new_password(password_stdin))
    click.echo(f"password of {name} changed")


@account.command("token")
@click.argument("name")
@click.option("--revoke", is_flag=True, help="Revoke all of NAME's tokens instead.")
@DATA_DIR_OPTION
def account_token(name: str, revoke: bool, data_dir: Path) -> None:
    """Issue an API token for NAME (printed once; only its hash is kept)."""
    with _account_errors():
        if revoke:
            _book(data_dir).revoke_tokens(name)
            click.echo(f"all API tokens of {name} revoked", err=True)
        else:
            click.echo(_book(data_dir).issue_token(name))


@account.command("remove")
@click.argument("name")
@DATA_DIR_OPTION
def account_remove(name: str, data_dir: Path) -> None:
    """Remove account NAME; its sessions and tokens stop working."""
    with _account_errors():
        _book(data_dir).remove(name)
    click.echo(f"account {name} removed")


@account.command("list")
@DATA_DIR_OPTION
def account_list(data_dir: Path) -> None:
    """List accounts, their roles, and whether they can log in or hold tokens."""
    with _account_errors():
        accounts = _book(data_dir).all()
    for a in accounts:
        login = "password" if a.password_hash else "no password"
        click.echo(
            f"{a.name:<24} {','.join(sorted(a.roles)):<24} {login:<12} "
            f"{len(a.token_digests)} token(s)"
        )


# --- audit -----------------------------------------------------------------------------------


def _admin_get(
    admin: str, token: str, path: str, params: dict[str, str], ca_cert: Path | None
) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a GET to the admin API, or a ClickException saying what went wrong."""
    base = admin if "://" in admin else f"https://{admin}"
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    try:
        with urllib.request.urlopen(req, timeout=300, context=context) as resp:
            return {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        raise click.ClickException(f"admin API answered {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise click.ClickException(
            f"cannot reach the admin API at {base}: {e.reason} (is `egress-guard run` up?)"
        ) from None


def _admin_request(
    admin: str, token: str, path: str, params: dict[str, str], ca_cert: Path | None
) -> Any:
    return json.loads(_admin_get(admin, token, path, params, ca_cert)[1])


def _ca_cert(ca_cert: Path | None, data_dir: Path) -> Path | None:
    """The CA that signs the console's certificate: given, else the gateway's own in the data
    directory when this runs on the gateway host, else the system's trust store."""
    if ca_cert is not None:
        return ca_cert
    own = _data_dir(data_dir) / "mitmproxy" / "mitmproxy-ca-cert.pem"
    return own if own.exists() else None


@main.group()
def audit() -> None:
    """Query the request log through the running gateway's admin API."""


def _api_options(command: Any) -> Any:
    """--admin, --token, --ca-cert and --data-dir: how the CLI reaches the admin API."""
    for option in reversed(
        (
            click.option(
                "--admin",
                default="127.0.0.1:8081",
                envvar="EGRESS_GUARD_ADMIN",
                show_default=True,
                help="Admin API address (HOST:PORT or URL).",
            ),
            click.option(
                "--token",
                envvar="EGRESS_GUARD_TOKEN",
                required=True,
                help="An auditor's API token (egress-guard account token NAME).",
            ),
            click.option(
                "--ca-cert",
                type=click.Path(dir_okay=False, exists=True, path_type=Path),
                envvar="EGRESS_GUARD_CA_CERT",
                help="CA certificate of the console [default: the gateway's CA in DATA_DIR].",
            ),
            DATA_DIR_OPTION,
        )
    ):
        command = option(command)
    return command


def _filter_options(command: Any) -> Any:
    """Which rows: the request-log filters of the admin API."""
    for option in reversed(
        (
            click.option("--user", help="Exactly this user."),
            click.option("--host", help="This host and its subdomains."),
            click.option("--decision", type=click.Choice(["allow", "block", "alert"])),
            click.option("--since", help="From (ISO 8601, or a duration ago such as 24h)."),
            click.option("--until", help="Before (ISO 8601, or a duration ago)."),
            click.option(
                "--limit", type=click.IntRange(1, 100_000), default=100, show_default=True
            ),
        )
    ):
        command = option(command)
    return command


@audit.command("query")
@_api_options
@_filter_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
def audit_query(
    admin: str, token: str, ca_cert: Path | None, data_dir: Path, fmt: str, **filters: Any
) -> None:
    """List request-log rows, newest first (needs the auditor role)."""
    params = {k: str(v) for k, v in filters.items() if v is not None}
    result = _admin_request(admin, token, "/api/v1/requests", params, _ca_cert(ca_cert, data_dir))
    rows: list[dict[str, Any]] = result["rows"]
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
    elif fmt == "csv":
        columns = tuple(rows[0]) if rows else COLUMN_NAMES
        sys.stdout.write(evidence.to_csv(rows, columns).decode())
    else:
        table = [[evidence.cell(row.get(c, "")) for c in SUMMARY_COLUMNS] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(SUMMARY_COLUMNS)]
        click.echo("  ".join(c.ljust(w) for c, w in zip(SUMMARY_COLUMNS, widths, strict=True)))
        for r in table:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
        click.echo(f"({len(rows)} rows)", err=True)


@audit.command("export")
@_api_options
@_filter_options
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    required=True,
    help="The CSV to write; its SHA-256 goes next to it as OUT.sha256.",
)
def audit_export(
    admin: str, token: str, ca_cert: Path | None, data_dir: Path, out: Path, **filters: Any
) -> None:
    """Export rows as evidence: the gateway's canonical CSV, hashed, the hash kept in its log."""
    params = {k: str(v) for k, v in filters.items() if v is not None}
    headers, body = _admin_get(admin, token, "/api/v1/export", params, _ca_cert(ca_cert, data_dir))
    sha256 = evidence.digest(body)
    if sha256 != headers.get("x-egress-guard-sha256"):
        raise click.ClickException("the export arrived damaged: its hash does not match")
    out.write_bytes(body)
    out.with_name(out.name + ".sha256").write_text(f"{sha256}  {out.name}\n")
    rows = headers.get("x-egress-guard-rows", "?")
    click.echo(f"{out}: {rows} rows, sha256 {sha256} (recorded by the gateway)")


@audit.command("verify")
@_api_options
@click.argument("export", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def audit_verify(
    admin: str, token: str, ca_cert: Path | None, data_dir: Path, export: Path
) -> None:
    """Check that EXPORT is, byte for byte, what the gateway handed out, and say to whom."""
    sha256 = evidence.digest(export.read_bytes())
    result = _admin_request(
        admin,
        token,
        "/api/v1/console-events",
        {"contains": sha256, "limit": "10"},
        _ca_cert(ca_cert, data_dir),
    )
    exports = [e for e in result["rows"] if e["action"] == "export_requests"]
    if not exports:
        raise click.ClickException(
            f"{export}: sha256 {sha256} is not in the gateway's export log: "
            "not an unaltered export of this gateway"
        )
    e = exports[-1]
    detail = json.loads(e["detail"])
    filters = {k: v for k, v in detail.items() if k not in ("rows", "sha256")}
    click.echo(
        f"{export}: verified. Exported by {e['actor']} from {e['client_ip']} at {e['ts']}, "
        f"{detail['rows']} rows, filters {json.dumps(filters, ensure_ascii=False)}"
    )


if __name__ == "__main__":
    main()
