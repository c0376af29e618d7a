"""The console and admin API through the real gateway, for what needs its real store and CLI:
the console's audit trail in ClickHouse, a store that is down, filters as bound values, account
changes made with the CLI, and verifiable exports. Roles, CSRF, cookies, throttling and the
pages are tested in-process (tests/unit/test_console_app.py)."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.parse

import pytest

from egress_guard.console.accounts import AccountBook, accounts_path
from harness import GatewayProcess, Reply, cli, curl

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"
ROLE_ACCOUNTS = {"admin": "ann", "auditor": "aud", "approver": "appr"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    from support import POLICIES

    data = tmp_path_factory.mktemp("gw-console")
    g = GatewayProcess(data, POLICIES, fault_file=data / "faults")
    g.start()
    book = AccountBook(accounts_path(g.data_dir))
    g.tokens = {}
    for role, name in ROLE_ACCOUNTS.items():
        book.add(name, [role], PASSWORD)
        g.tokens[role] = book.issue_token(name)
    g.tokens["bootstrap"] = (g.data_dir / "admin-token").read_text().strip()
    yield g
    g.stop()


def cookies_of(reply: Reply) -> dict[str, str]:
    """name → the whole Set-Cookie line."""
    lines = reply.headers.get("set-cookie", "").split("\n")
    return {line.split("=", 1)[0]: line for line in lines if "=" in line}


def login_form(gw) -> tuple[str, str]:
    """(xsrf cookie, xsrf form field) from the login page."""
    page = gw.admin_call("/login")
    assert page.status == 200
    cookie = cookies_of(page)["_xsrf"].split(";")[0].split("=", 1)[1]
    field = re.search(rb'name="_xsrf" value="([^"]+)"', page.body).group(1).decode()
    return cookie, field


def post_login(
    gw,
    name: str,
    password: str,
    source: str | None = None,
    session: str | None = None,
    form: tuple[str, str] | None = None,
) -> Reply:
    """The login form, filled in and posted as a browser would (``source``: from another
    loopback address; the form itself is fetched from 127.0.0.1 unless ``form`` is given)."""
    cookie, field = form or login_form(gw)
    body = urllib.parse.urlencode({"username": name, "password": password, "_xsrf": field})
    jar = f"_xsrf={cookie}" + (f"; egress_session={session}" if session else "")
    reply = gw.admin_call(
        "/login",
        method="POST",
        body=body.encode(),
        headers={"Cookie": jar, "Content-Type": "application/x-www-form-urlencoded"},
        source=source,
    )
    return reply


def test_reads_of_the_log_logins_and_refusals_are_recorded_without_secrets(gw, upstream):
    curl(f"http://127.0.0.1:{upstream.http_port}/for-console-events", gw.proxy)
    aud = gw.tokens["auditor"]
    got = gw.admin_call("/api/v1/requests?user=someone&host=example.com", aud)
    assert got.status == 200
    assert post_login(gw, "aud", "not the password").status == 401
    assert gw.admin_call("/api/v1/status", aud).status == 403
    events = gw.admin_call("/api/v1/console-events?limit=1000", gw.tokens["admin"]).json()["rows"]
    query = [e for e in events if e["action"] == "query_requests" and e["actor"] == "aud"]
    assert query and json.loads(query[0]["detail"])["user"] == "someone"
    assert query[0]["via"] == "token" and query[0]["roles"] == ["auditor"]
    failed = [e for e in events if e["action"] == "login" and e["outcome"] == "failed"]
    assert failed and failed[0]["actor"] == "aud" and failed[0]["client_ip"] == "127.0.0.1"
    denied = [e for e in events if e["outcome"] == "denied" and e["actor"] == "aud"]
    assert any(e["detail"] == "/api/v1/status" for e in denied)
    assert all("not the password" not in json.dumps(e) for e in events)


def test_a_read_the_store_cannot_record_is_not_run(gw):
    aud = gw.tokens["auditor"]
    (gw.data_dir / "faults").write_text("store-down")
    try:
        reply = gw.admin_call("/api/v1/requests?user=alice", aud)
    finally:
        (gw.data_dir / "faults").unlink()
    assert reply.status == 503 and "rows" not in reply.json()
    assert gw.admin_call("/api/v1/requests?user=alice", aud).status == 200
    # A refusal is still a refusal while its event cannot be kept: 403, not an error.
    (gw.data_dir / "faults").write_text("store-down")
    try:
        denied = gw.admin_call("/api/v1/status", aud)
    finally:
        (gw.data_dir / "faults").unlink()
    assert denied.status == 403


@pytest.mark.parametrize(
    "host", ["x' OR 1=1 --", "') OR ('1'='1", "127.0.0.1' UNION SELECT * FROM system.users --"]
)
def test_filters_are_values_never_sql(gw, upstream, host):
    curl(f"http://127.0.0.1:{upstream.http_port}/sql-probe", gw.proxy)
    aud = gw.tokens["auditor"]
    gw.wait_rows(lambda rs: any(r["path"] == "/sql-probe" for r in rs), "--host", "127.0.0.1")
    reply = gw.admin_call(f"/api/v1/requests?host={urllib.parse.quote(host)}", aud)
    assert reply.status == 200 and reply.json()["rows"] == []


def test_accounts_are_managed_with_the_cli_and_take_effect_at_once(gw):
    d = ("--data-dir", str(gw.data_dir))
    added = cli(
        "account",
        "add",
        "li.cli",
        "--role",
        "auditor",
        "--password-stdin",
        *d,
        stdin=PASSWORD + "\n",
    )
    assert "account li.cli created with roles auditor" in added.stdout
    token = cli("account", "token", "li.cli", *d).stdout.strip()
    whoami = gw.admin_call("/api/v1/whoami", token).json()
    assert whoami == {"name": "li.cli", "roles": ["auditor"], "via": "token"}
    query = ("audit", "query", "--admin", gw.admin, "--token", token, *d, "--format", "json")
    assert isinstance(json.loads(cli(*query).stdout), list)
    assert post_login(gw, "li.cli", PASSWORD).status == 303
    listing = cli("account", "list", *d).stdout
    assert re.search(r"^li\.cli +auditor +password +1 token\(s\)$", listing, re.M), listing

    cli("account", "roles", "li.cli", "--role", "approver", *d)
    refused = cli(*query, check=False)
    assert refused.returncode == 1 and "admin API answered 403" in refused.stderr

    bad_role = cli("account", "add", "x.cli", "--role", "root", *d, check=False)
    assert bad_role.returncode == 2 and "root" in bad_role.stderr
    short = cli(
        "account",
        "add",
        "y.cli",
        "--role",
        "auditor",
        "--password-stdin",
        *d,
        check=False,
        stdin="short\n",
    )
    assert short.returncode == 1 and "at least 12 characters" in short.stderr
    no_token = cli("audit", "query", "--admin", gw.admin, *d, check=False)
    assert no_token.returncode == 2 and "--token" in no_token.stderr

    cli("account", "token", "li.cli", "--revoke", *d)
    assert gw.admin_call("/api/v1/whoami", token).status == 401
    cli("account", "remove", "li.cli", *d)
    assert "li.cli" not in cli("account", "list", *d).stdout
    assert post_login(gw, "li.cli", PASSWORD).status == 401

    # Every permission change is in the console's event log, with who made it.
    def changes():
        rows = gw.admin_call("/api/v1/console-events?limit=1000", gw.tokens["admin"]).json()
        return [
            json.loads(e["detail"])
            for e in rows["rows"]
            if e["action"] == "account_change" and "li.cli" in e["detail"]
        ]

    deadline = time.monotonic() + 20
    while len(changes()) < 5 and time.monotonic() < deadline:
        time.sleep(0.3)
    got = {c["change"] for c in changes()}
    assert {
        "added",
        "1 API token(s) issued",
        "roles auditor -> approver",
        "1 API token(s) revoked",
        "removed",
    } <= got, got
    assert all(PASSWORD not in json.dumps(c) for c in changes())


def test_an_export_is_hashed_recorded_and_verifiable(gw, upstream, tmp_path):
    for i in range(3):
        curl(f"http://127.0.0.1:{upstream.http_port}/evidence-{i}", gw.proxy)
    gw.wait_rows(lambda rs: sum(r["path"].startswith("/evidence-") for r in rs) == 3)
    d = ("--data-dir", str(gw.data_dir))
    api = ("--admin", gw.admin, "--token", gw.tokens["auditor"], *d)
    out = tmp_path / "case-17.csv"
    done = cli("audit", "export", *api, "--host", "127.0.0.1", "--limit", "1000", "--out", str(out))
    body = out.read_bytes()
    sha256 = hashlib.sha256(body).hexdigest()
    assert (tmp_path / "case-17.csv.sha256").read_text() == f"{sha256}  case-17.csv\n"
    assert sha256 in done.stdout
    lines = body.decode().split("\r\n")
    assert lines[0].startswith("ts,node,request_id,client_ip,user,")
    assert sum("/evidence-" in line for line in lines) == 3

    # The gateway kept the hash, the filters and who asked, where the auditor cannot edit it.
    events = gw.admin_call(f"/api/v1/console-events?contains={sha256}", gw.tokens["admin"])
    (event,) = [e for e in events.json()["rows"] if e["action"] == "export_requests"]
    detail = json.loads(event["detail"])
    assert event["actor"] == "aud" and detail["host"] == "127.0.0.1" and detail["sha256"] == sha256

    verified = cli("audit", "verify", *api, str(out))
    assert "verified. Exported by aud" in verified.stdout
    out.write_bytes(body.replace(b"/evidence-1", b"/evidence-X"))  # one altered row
    altered = cli("audit", "verify", *api, str(out), check=False)
    assert altered.returncode == 1 and "not an unaltered export" in altered.stderr

    approver = cli(
        "audit",
        "export",
        "--admin",
        gw.admin,
        "--token",
        gw.tokens["approver"],
        *d,
        "--out",
        str(tmp_path / "no.csv"),
        check=False,
    )
    assert approver.returncode == 1 and "403" in approver.stderr
    assert not (tmp_path / "no.csv").exists()
