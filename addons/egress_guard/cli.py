"""CLI: ``egress-guard run | ca export | check-policy | policy import-ut1 | account … |
audit query | export | verify | timeline | report | incidents … | retention |
exceptions list | show | grant | approve | deny | revoke``.

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


FORMAT_OPTION = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)


# --- audit -----------------------------------------------------------------------------------


def _admin_call(
    admin: str,
    token: str,
    path: str,
    ca_cert: Path | None,
    *,
    params: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a GET (or, with ``body``, a JSON POST) to the admin API, or a
    ClickException saying what went wrong."""
    base = admin if "://" in admin else f"https://{admin}"
    url = f"{base.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
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
    return json.loads(_admin_call(admin, token, path, ca_cert, params=params)[1])


def _admin_post(admin: str, token: str, path: str, body: Any, ca_cert: Path | None) -> Any:
    """POST a JSON body to the admin API; its JSON answer, or a ClickException."""
    return json.loads(_admin_call(admin, token, path, ca_cert, body=body)[1])


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
    reasons = ["blocklist", "destination", "upload_cap", "marker", "error", "exception", "none"]
    for option in reversed(
        (
            click.option("--user", help="Exactly this user."),
            click.option("--group", help="Users of this group."),
            click.option("--client", help="A client address, or a network (10.1.0.0/16)."),
            click.option("--host", help="This host and its subdomains."),
            click.option("--category", help="A destination category (webmail, cloud_drive…)."),
            click.option("--decision", type=click.Choice(["allow", "block", "alert"])),
            click.option(
                "--reason", type=click.Choice(reasons), help="Why (none: no reason recorded)."
            ),
            click.option("--rule", help="A rule id (webmail.qq, a marker id, a cap id)."),
            click.option("--level", help="A marker level that matched (national_secret…)."),
            click.option("--exception", help="An exception id; * for any."),
            click.option("--request-id", help="One request (the id a block page shows)."),
            click.option("--kind", type=click.Choice(["http", "connect", "tunnel", "websocket"])),
            click.option("--min-upload", help="Upload bytes at least (1MiB, 500k, 1048576)."),
            click.option("--since", help="From (ISO 8601, or a duration ago such as 24h)."),
            click.option("--until", help="Before (ISO 8601, or a duration ago)."),
            click.option(
                "--limit", type=click.IntRange(1, 100_000), default=100, show_default=True
            ),
            click.option("--after", help="The cursor a previous page printed (next page)."),
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
    if result.get("next"):
        click.echo(f"(more rows: --after {result['next']})", err=True)
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
    headers, body = _admin_call(
        admin, token, "/api/v1/export", _ca_cert(ca_cert, data_dir), params=params
    )
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


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    """Columns padded to their widest value, as ``audit query`` prints them."""
    text = [[evidence.cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in text:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _size(n: int) -> str:
    from .core.units import format_size

    return format_size(int(n))


def _when(value: str) -> str:
    """An API time (UTC ISO 8601) to the second, for a table."""
    return value[:19].replace("T", " ") + "Z" if value else ""


TIMELINE_PAGES = 50  # at most 100 000 rows: a person's year of blocks and uploads


@audit.command("timeline")
@click.argument("user")
@_api_options
@click.option("--since", default="7d", show_default=True, help="From (ISO 8601 or 7d ago).")
@click.option("--until", help="Before (ISO 8601 or a duration ago) [default: now].")
@click.option("--all", "everything", is_flag=True, help="Every request, not only the notable ones.")
@FORMAT_OPTION
def audit_timeline(
    user: str,
    admin: str,
    token: str,
    ca_cert: Path | None,
    data_dir: Path,
    since: str,
    until: str | None,
    everything: bool,
    fmt: str,
) -> None:
    """One person's egress in order (USER, or ip:ADDRESS): a summary per day, the sites
    reached, the exceptions used, then blocks, alerts, uploads and marker hits (--all: every
    request)."""
    params = {"user": user, "since": since}
    if until:
        params["until"] = until
    if everything:
        params["all"] = "1"
    ca = _ca_cert(ca_cert, data_dir)
    found = _admin_request(admin, token, "/api/v1/timeline", params, ca)
    events = list(found["events"])
    for _ in range(TIMELINE_PAGES):
        if not found.get("next"):
            break
        found = _admin_request(
            admin, token, "/api/v1/timeline", params | {"after": found["next"]}, ca
        )
        events += found["events"]
    found["events"], found["next"] = events, found.get("next")
    if fmt == "json":
        click.echo(json.dumps(found, ensure_ascii=False, indent=1))
        return
    click.echo(
        f"{user}: {_when(found['since'])} – {_when(found['until'])} (days in {found['timezone']})\n"
    )
    _table(
        ["day", "requests", "blocked", "alerts", "hosts", "uploaded", "forwarded", "markers",
         "exceptions"],
        [[d["day"], d["requests"], d["blocked"], d["alerts"], d["hosts"],
          _size(d["upload_bytes"]), _size(d["forwarded_bytes"]), d["marker_hits"],
          ",".join(d["exceptions"])] for d in found["days"]],
    )  # fmt: skip
    if found["exceptions"]:
        click.echo("\nexceptions used")
        _table(
            ["exception", "requests", "first", "last", "hosts"],
            [[e["exception_id"], e["requests"], _when(e["first"]), _when(e["last"]),
              ",".join(e["hosts"])] for e in found["exceptions"]],
        )  # fmt: skip
    click.echo("\nsites")
    _table(
        ["host", "first", "last", "requests", "reached", "blocked", "uploaded"],
        [[s["host"], _when(s["first"]), _when(s["last"]), s["requests"], s["reached"],
          s["blocked"], _size(s["upload_bytes"])] for s in found["sites"]],
    )  # fmt: skip
    click.echo(
        "\nin order" + ("" if everything else " (blocks, alerts, uploads, markers, exceptions)")
    )
    _table(
        ["time", "decision", "reason", "method", "host", "path", "status", "upload", "markers",
         "exception", "request_id"],
        [[_when(e["ts"]), e["decision"], e["reason_kind"], e["method"], e["host"], e["path"],
          e["status"], _size(e["upload_bytes"]), e["marker_levels"], e["exception_id"],
          e["request_id"]] for e in events],
    )  # fmt: skip
    if found["next"]:
        click.echo(f"(cut at {len(events)} rows; narrow --since/--until)", err=True)


def _report_rows(report: dict[str, Any]) -> list[list[Any]]:
    """Every report as (report, time, key, value) rows: a CSV a spreadsheet can pivot."""
    out: list[list[Any]] = [["totals", "", k, v] for k, v in report["totals"].items()]
    for r in report["requests_over_time"]:
        out += [
            ["requests_over_time", r["time"], k, r[k]] for k in ("requests", "blocked", "alerts")
        ]
    for name in ("top_blocked_users", "top_blocked_hosts", "top_blocked_categories"):
        out += [[name, "", r["key"], r["value"]] for r in report[name]]
    out += [["upload_per_user_day", r["day"], r["user"], r["upload_bytes"]]
            for r in report["upload_per_user_day"]]  # fmt: skip
    out += [["marker_hits_over_time", r["time"], r["level"], r["hits"]]
            for r in report["marker_hits_over_time"]]  # fmt: skip
    out += [["exception_usage", "", r["exception_id"], r["requests"]]
            for r in report["exception_usage"]]  # fmt: skip
    out += [["busiest_destinations", "", r["host"], r["requests"]]
            for r in report["busiest_destinations"]]  # fmt: skip
    return out


@audit.command("report")
@_api_options
@click.option("--since", default="7d", show_default=True, help="From (ISO 8601 or 7d ago).")
@click.option("--until", help="Before [default: now].")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
def audit_report(
    admin: str, token: str, ca_cert: Path | None, data_dir: Path, since: str, until: str | None,
    fmt: str,
) -> None:  # fmt: skip
    """The reports: requests and blocks over time, the most blocked users, hosts and
    categories, upload bytes per user per day, marker hits per level, exception usage and the
    busiest destinations."""
    params = {"since": since} | ({"until": until} if until else {})
    report = _admin_request(admin, token, "/api/v1/report", params, _ca_cert(ca_cert, data_dir))
    if fmt == "json":
        click.echo(json.dumps(report, ensure_ascii=False, indent=1))
        return
    rows = _report_rows(report)
    if fmt == "csv":
        sys.stdout.write(
            evidence.to_csv(
                [dict(zip(("report", "time", "key", "value"), r, strict=True)) for r in rows],
                ("report", "time", "key", "value"),
            ).decode()
        )
        return
    click.echo(f"{_when(report['since'])} – {_when(report['until'])}, per {report['bucket']}")
    current = None
    for name, when, key, value in rows:
        if name != current:
            click.echo(f"\n{name}")
            current = name
        shown = _when(when) if "T" in str(when) else when
        click.echo(f"  {shown:<20} {key or '(none)':<40} {value}")


@audit.group("incidents")
def audit_incidents() -> None:
    """DLP incidents: marker blocks and alerts and unscannable refusals, and their triage."""


def _incident_line(r: dict[str, Any]) -> list[Any]:
    return [
        r["severity"], r["status"], _when(r["ts"]), r["user"], r["host"], r["decision"],
        ",".join(r["marker_levels"]) or "unscannable", ",".join(r["marker_ids"]) or r["rule_id"],
        r["assignee"], r["classification"], r["request_id"],
    ]  # fmt: skip


@audit_incidents.command("list")
@_api_options
@click.option("--status", type=click.Choice(["new", "investigating", "resolved"]))
@click.option("--assignee")
@click.option("--user")
@click.option("--since", help="Opened from [default: 186 days ago].")
@click.option("--until")
@FORMAT_OPTION
def incidents_list(
    admin: str, token: str, ca_cert: Path | None, data_dir: Path, fmt: str, **filters: Any
) -> None:
    """The queue: open incidents first, by severity, then the oldest."""
    params = {k: v for k, v in filters.items() if v}
    found = _admin_request(admin, token, "/api/v1/incidents", params, _ca_cert(ca_cert, data_dir))
    if fmt == "json":
        click.echo(json.dumps(found["rows"], ensure_ascii=False, indent=1))
        return
    _table(
        ["severity", "status", "opened", "user", "host", "decision", "level", "markers",
         "assignee", "classification", "incident"],
        [_incident_line(r) for r in found["rows"]],
    )  # fmt: skip
    click.echo(f"({found['count']} incidents)", err=True)


def _show_incident(found: dict[str, Any]) -> None:
    r = found["row"]
    click.echo(
        f"incident {r['request_id']}: {found['severity']} {found['kind']}, {found['status']}, "
        f"assignee {found['assignee'] or 'nobody'}, "
        f"classification {found['classification'] or 'none yet'}"
    )
    click.echo(f"  when         {_when(r['ts'])}")
    click.echo(f"  user         {r['user'] or '(none)'} from {r['client_ip']}")
    click.echo(f"  destination  {r['method']} {r['host']}:{r['port']}{r['path']}")
    click.echo(f"  decision     {r['decision']} ({r['reason_kind']}, rule {r['rule_id']})")
    click.echo(f"  levels       {', '.join(r['marker_levels']) or 'none (unscannable)'}")
    click.echo(f"  markers      {', '.join(r['marker_ids']) or 'none'}")
    click.echo(f"  bytes        upload {r['upload_bytes']}, forwarded {r['forwarded_bytes']}")
    if r["error"]:
        click.echo(f"  error        {r['error']}")
    click.echo("history")
    for e in found["history"]:
        what = {
            "comment": f"comment: {e['comment']}",
            "assign": f"assigned to {e['value'] or 'nobody'}",
            "classify": f"classified {e['value']}",
            "status": f"status {e['value']}",
        }[e["kind"]]
        click.echo(f"  {_when(e['ts'])}  {e['actor']:<16} {what}")


@audit_incidents.command("show")
@click.argument("request_id")
@_api_options
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def incidents_show(
    request_id: str, admin: str, token: str, ca_cert: Path | None, data_dir: Path, fmt: str
) -> None:
    """One incident (REQUEST_ID): its request, its state and its whole history."""
    found = _admin_request(
        admin, token, "/api/v1/incident", {"id": request_id}, _ca_cert(ca_cert, data_dir)
    )
    if fmt == "json":
        click.echo(json.dumps(found, ensure_ascii=False, indent=1))
    else:
        _show_incident(found)


@audit_incidents.command("update")
@click.argument("request_id")
@_api_options
@click.option("--status", type=click.Choice(["new", "investigating", "resolved"]))
@click.option("--assignee", help="An auditor's account name; - for nobody.")
@click.option(
    "--classification", type=click.Choice(["true_positive", "false_positive", "expected_activity"])
)
@click.option("--comment")
def incidents_update(
    request_id: str, admin: str, token: str, ca_cert: Path | None, data_dir: Path, **change: Any
) -> None:
    """Append to incident REQUEST_ID's history: a status, an assignee, a classification
    (needed to resolve) and/or a comment."""
    body = {"id": request_id} | {k: v for k, v in change.items() if v is not None}
    found = _admin_post(admin, token, "/api/v1/incident", body, _ca_cert(ca_cert, data_dir))
    _show_incident(found)


@audit.command("retention")
@_api_options
@FORMAT_OPTION
def audit_retention(admin: str, token: str, ca_cert: Path | None, data_dir: Path, fmt: str) -> None:
    """The proof that the log is kept: each table's TTL, oldest and newest row, rows and bytes
    per month, and whether each of the last six months is present."""
    found = _admin_request(admin, token, "/api/v1/retention", {}, _ca_cert(ca_cert, data_dir))
    if fmt == "json":
        click.echo(json.dumps(found, ensure_ascii=False, indent=1))
        return
    for t in found["tables"]:
        click.echo(
            f"{t['table']}: TTL {t['ttl_months']} months, {t['rows']} rows, "
            f"oldest {_when(t['oldest'] or '') or '-'}, newest {_when(t['newest'] or '') or '-'}"
        )
        for m in t["months"]:
            click.echo(
                f"  {m['month'][:4]}-{m['month'][4:]}  {m['rows']:>12,} rows  "
                f"{_size(m['bytes']):>10} on disk"
            )
        six = " ".join(
            f"{'ok' if m['present'] else 'MISSING'} {m['month'][:4]}-{m['month'][4:]}"
            for m in t["last_six_months"]
        )
        verdict = (
            "every month present"
            if t["all_six_present"]
            else f"gaps: {', '.join(t['gaps'])}"
            if t["gaps"]
            else "the log starts later (months before it were never written)"
            if t["rows"]
            else "empty"
        )
        click.echo(f"  last six months: {six} — {verdict}")


# --- exceptions ------------------------------------------------------------------------------

EXCEPTION_STATES = (
    "pending", "scheduled", "active", "denied", "cancelled", "revoked", "expired", "live", "all",
)  # fmt: skip


@main.group()
def exceptions() -> None:
    """Temporary exceptions through the running gateway's admin API: approvers grant,
    approve, deny and revoke; approvers and auditors list and show (--token: an approver's
    or auditor's API token)."""


def _exception_api_options(command: Any) -> Any:
    """``_api_options``, the token being an approver's (an auditor's, to read)."""
    command = _api_options(command)
    for param in command.__click_params__:
        if param.name == "token":
            param.help = "An approver's API token (to list and show: an auditor's too)."
    return command


def _exception_path(exception_id: str, action: str = "") -> str:
    path = f"/api/v1/exceptions/{urllib.parse.quote(exception_id, safe='')}"
    return f"{path}/{action}" if action else path


def _lets_through(terms: dict[str, Any]) -> str:
    grant = terms["grant"]
    if grant:
        parts = [f"{_size(grant[k])} {w}" for k, w in (("per_request", "per request"),
                 ("per_window", "per window")) if grant[k]]  # fmt: skip
        return ", ".join(parts)
    return f"block → {terms['lowered_to']}" if terms["lowered_to"] else "the rule"


def _exception_line(e: dict[str, Any]) -> list[Any]:
    t = e["terms"]
    return [
        e["id"], e["state"], t["subject"], t["control"], t["target"]["text"],
        e["category"] or "-", _when(t["start"]), _when(t["expiry"]), _lets_through(t),
        e["requester"], f"{len(e['approvers'])}/{e['approvals_needed']}",
    ]  # fmt: skip


def _show_exception(e: dict[str, Any]) -> None:
    t = e["terms"]
    click.echo(f"exception {e['id']}: {e['state']} ({e['origin']} by {e['requester']})")
    click.echo(f"  for          {t['subject']}")
    click.echo(f"  control      {t['control']} · lets through {_lets_through(t)}")
    click.echo(f"  target       {t['target']['text']} · category {e['category'] or 'none'}")
    click.echo(f"  from         {_when(t['start'])} until {_when(t['expiry'])} ({t['duration']})")
    click.echo(f"  approvals    {len(e['approvers'])} of {e['approvals_needed']}: "
               f"{', '.join(e['approvers']) or 'none yet'}")  # fmt: skip
    if e["request_id"]:
        click.echo(f"  blocked      request {e['request_id']}")
    click.echo(f"  reason       {e['reason']}")
    if e["ended_by"] or e["end_reason"]:
        click.echo(f"  ended        {_when(e['ended_at'] or '')} by {e['ended_by'] or 'time'}"
                   + (f": {e['end_reason']}" if e["end_reason"] else ""))  # fmt: skip
    click.echo("history")
    for ev in e.get("events", []):
        terms = ev["terms"]
        what = f" {terms['target']['text']} until {_when(terms['expiry'])}" if terms else ""
        ignored = "" if ev["applied"] else "  (ignored: not a valid step when it came)"
        reason = f" — {ev['reason']}" if ev["reason"] else ""
        click.echo(f"  {_when(ev['at'])}  {ev['kind']:<9} {ev['actor']:<16}{what}{reason}{ignored}")


def _decided(change: dict[str, Any], fmt: str) -> None:
    """A change's answer: the exception id on stdout (for scripts), what it came to on
    stderr; or the whole answer as JSON."""
    if fmt == "json":
        click.echo(json.dumps(change, ensure_ascii=False, indent=1))
        return
    e = change["exception"]
    click.echo(e["id"])
    t = e["terms"]
    click.echo(
        f"{e['state']}: {t['subject']} past {t['control']} for {t['target']['text']} until "
        f"{_when(t['expiry'])} (approvals {len(e['approvers'])} of {e['approvals_needed']})",
        err=True,
    )


def _bytes(value: str | None) -> int | None:
    from .core.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@exceptions.command("list")
@_exception_api_options
@click.option("--state", type=click.Choice(EXCEPTION_STATES), default="all", show_default=True)
@click.option("--user", help="The requester, or the user an exception is for.")
@click.option("--subject", help="user:NAME, group:NAME or client:CIDR, exactly.")
@click.option("--control", help="block, upload, marker, marker:LEVEL or unscannable.")
@click.option("--since", help="Created since (ISO 8601, or 30d ago); also reads the store's.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@FORMAT_OPTION
def exceptions_list(
    admin: str, token: str, ca_cert: Path | None, data_dir: Path, fmt: str, **filters: Any
) -> None:
    """The exceptions: pending the oldest first, the others the newest first."""
    params = {k: str(v) for k, v in filters.items() if v is not None}
    found = _admin_request(admin, token, "/api/v1/exceptions", params, _ca_cert(ca_cert, data_dir))
    if found.get("partial"):
        click.echo("(the store's older history could not be read)", err=True)
    if fmt == "json":
        click.echo(json.dumps(found["exceptions"], ensure_ascii=False, indent=1))
        return
    _table(
        ["exception", "state", "for", "control", "target", "category", "from", "until",
         "lets through", "requested by", "approvals"],
        [_exception_line(e) for e in found["exceptions"]],
    )  # fmt: skip
    click.echo(f"({found['count']} exceptions)", err=True)


@exceptions.command("show")
@click.argument("exception_id", metavar="ID")
@_exception_api_options
@FORMAT_OPTION
def exceptions_show(
    exception_id: str, admin: str, token: str, ca_cert: Path | None, data_dir: Path, fmt: str
) -> None:
    """One exception as it stands, and every event of its history."""
    found = _admin_request(
        admin, token, _exception_path(exception_id), {}, _ca_cert(ca_cert, data_dir)
    )
    if fmt == "json":
        click.echo(json.dumps(found, ensure_ascii=False, indent=1))
    else:
        _show_exception(found)


@exceptions.command("grant")
@_exception_api_options
@click.option("--user", help="For this proxy user.")
@click.option("--group", help="For the users of this group.")
@click.option("--client", help="For a client network (10.1.20.0/24; an address: /32).")
@click.option("--host", help="A host and its subdomains.")
@click.option("--exact", is_flag=True, help="With --host: the host alone.")
@click.option("--path", help="With --host: only under this path prefix.")
@click.option("--category", help="A destination category (webmail, cloud_drive…).")
@click.option("--rule", help="A rule id (webmail.qq-mail, an upload cap, a marker).")
@click.option(
    "--control",
    default="block",
    show_default=True,
    help="block, upload, marker:LEVEL or unscannable.",
)
@click.option("--max-bytes", help="upload: the bytes one request may carry (500MiB).")
@click.option("--window-bytes", help="upload: the bytes the rolling window may hold (2GiB).")
@click.option("--lowered-to", type=click.Choice(["alert", "log"]), help="marker, unscannable.")
@click.option("--for", "duration", required=True, help="How long (12h, 7d).")
@click.option("--start", help="When it starts (ISO 8601) [default: now].")
@click.option("--reason", required=True, help="Why: kept with the decision.")
@FORMAT_OPTION
def exceptions_grant(
    admin: str,
    token: str,
    ca_cert: Path | None,
    data_dir: Path,
    fmt: str,
    user: str | None,
    group: str | None,
    client: str | None,
    host: str | None,
    exact: bool,
    path: str | None,
    category: str | None,
    rule: str | None,
    **rest: Any,
) -> None:
    """Grant an exception without a request (approver); prints its id. Nobody grants one for
    themselves; a control that needs two approvers waits for another's approval."""
    subjects = [(k, v) for k, v in (("user", user), ("group", group), ("client", client)) if v]
    if len(subjects) != 1:
        raise click.UsageError("give exactly one of --user, --group, --client")
    kind, value = subjects[0]
    if kind == "client" and "/" not in value:
        value += "/128" if ":" in value else "/32"
    targets = [t for t in (host, category, rule) if t]
    if len(targets) != 1:
        raise click.UsageError("give exactly one of --host, --category, --rule")
    if (path or exact) and not host:
        raise click.UsageError("--path and --exact go with --host")
    body: dict[str, Any] = {
        "subject": f"{kind}:{value}",
        "control": rest["control"],
        "duration": rest["duration"],
        "reason": rest["reason"],
    }
    extra = {
        "host": host,
        "exact": exact or None,
        "path": path,
        "category": category,
        "rule": rule,
        "start": rest["start"],
        "per_request": _bytes(rest["max_bytes"]),
        "per_window": _bytes(rest["window_bytes"]),
        "lowered_to": rest["lowered_to"],
    }
    body |= {k: v for k, v in extra.items() if v is not None}
    change = _admin_post(admin, token, "/api/v1/exceptions", body, _ca_cert(ca_cert, data_dir))
    _decided(change, fmt)


@exceptions.command("approve")
@click.argument("exception_id", metavar="ID")
@_exception_api_options
@click.option("--for", "duration", help="Shorter than asked (12h).")
@click.option("--host", help="Narrow to this host (within what was asked).")
@click.option("--exact", is_flag=True, help="With --host: the host alone.")
@click.option("--path", help="Narrow to this path prefix.")
@click.option("--max-bytes", help="upload: fewer bytes per request than asked.")
@click.option("--reason", help="A note kept with the approval.")
@FORMAT_OPTION
def exceptions_approve(
    exception_id: str,
    admin: str,
    token: str,
    ca_cert: Path | None,
    data_dir: Path,
    fmt: str,
    duration: str | None,
    host: str | None,
    exact: bool,
    path: str | None,
    max_bytes: str | None,
    reason: str | None,
) -> None:
    """Approve a pending exception, as asked or narrowed (approver); prints its id."""
    body = {
        "duration": duration,
        "host": host,
        "exact": exact or None,
        "path": path,
        "per_request": _bytes(max_bytes),
        "reason": reason,
    }
    change = _admin_post(
        admin,
        token,
        _exception_path(exception_id, "approve"),
        {k: v for k, v in body.items() if v is not None},
        _ca_cert(ca_cert, data_dir),
    )
    _decided(change, fmt)


def _ending_command(action: str, help_text: str) -> None:
    @exceptions.command(action, help=help_text)
    @click.argument("exception_id", metavar="ID")
    @_exception_api_options
    @click.option("--reason", required=True, help="Why: the requester is told.")
    @FORMAT_OPTION
    def command(
        exception_id: str,
        admin: str,
        token: str,
        ca_cert: Path | None,
        data_dir: Path,
        fmt: str,
        reason: str,
    ) -> None:
        change = _admin_post(
            admin,
            token,
            _exception_path(exception_id, action),
            {"reason": reason},
            _ca_cert(ca_cert, data_dir),
        )
        _decided(change, fmt)


_ending_command("deny", "Deny a pending exception (approver), with the reason.")
_ending_command("revoke", "End an approved exception now (approver), with the reason.")


if __name__ == "__main__":
    main()
