"""The console and admin API through the real gateway: roles on every action, CSRF, cookie
flags, login throttling, and the console's own audit trail."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.parse
from dataclasses import dataclass

import pytest

from egress_guard.console import app as console
from egress_guard.console.accounts import AccountBook, accounts_path
from harness import GatewayProcess, Reply, cli, curl

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"
ROLE_ACCOUNTS = {"admin": "ann", "auditor": "aud", "approver": "appr"}


@dataclass
class Login:
    session: str
    xsrf_cookie: str
    xsrf_field: str

    @property
    def cookie(self) -> str:
        return f"egress_session={self.session}; _xsrf={self.xsrf_cookie}"


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


def session_of(reply: Reply) -> str:
    return cookies_of(reply)["egress_session"].split(";")[0].split("=", 1)[1]


def login(gw, name: str) -> Login:
    form = login_form(gw)
    reply = post_login(gw, name, PASSWORD, form=form)
    assert reply.status == 303 and reply.headers["location"] == "/", reply.body[:300]
    return Login(session_of(reply), *form)


def implemented_methods(handler: type) -> set[str]:
    own = set()
    for klass in handler.__mro__:
        if klass in (console._Handler, console._Api) or not issubclass(klass, console._Handler):
            continue
        own |= {m for m in handler.SUPPORTED_METHODS if m.lower() in vars(klass)}
    return own


# Who may do what, written out: a change to a handler's roles must change this table too.
EVERYONE = {"admin", "auditor", "approver"}
WHO_MAY = {
    "/": {"GET": EVERYONE},
    "/login": {},  # public: GET the form, POST credentials
    "/logout": {"POST": EVERYONE},
    "/requests": {"GET": {"auditor"}},
    "/api/v1/requests": {"GET": {"auditor"}},
    "/api/v1/export": {"GET": {"auditor"}},
    "/api/v1/console-events": {"GET": {"admin", "auditor"}},
    "/api/v1/status": {"GET": {"admin"}},
    "/api/v1/whoami": {"GET": EVERYONE},
}


def test_the_roles_of_every_route_are_the_ones_intended():
    declared = {path: {m: set(r) for m, r in h.ROLES.items()} for path, h in console.ROUTES}
    assert declared == WHO_MAY
    assert {path for path, h in console.ROUTES if h.PUBLIC} == {"/login"}


def test_every_handler_declares_who_may_call_each_method_it_implements():
    for path, handler in console.ROUTES:
        methods = implemented_methods(handler)
        assert methods, path
        undeclared = methods - set(handler.ROLES) - handler.PUBLIC
        assert not undeclared, f"{path}: {undeclared} implemented without roles"
        assert set(handler.ROLES) <= methods, f"{path}: roles for methods it does not have"


def role_matrix():
    for path, handler in console.ROUTES:
        for method, allowed in handler.ROLES.items():
            yield path, method, allowed


@pytest.mark.parametrize(("path", "method", "allowed"), list(role_matrix()))
@pytest.mark.parametrize("via", ["token", "session"])
def test_every_action_is_refused_to_roles_it_is_not_for(gw, path, method, allowed, via):
    for role, name in ROLE_ACCOUNTS.items():
        headers = {"Origin": f"https://{gw.admin}"}
        if via == "token":
            token, body = gw.tokens[role], None
        else:
            session = login(gw, name)
            token, headers["Cookie"] = None, session.cookie
            body = urllib.parse.urlencode({"_xsrf": session.xsrf_field}).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        reply = gw.admin_call(path, token, method=method, body=body, headers=headers)
        if role in allowed:
            assert reply.status in (200, 303), (role, path, method, reply.status, reply.body)
        else:
            assert reply.status == 403, (role, path, method, reply.status)
            assert b"rows" not in reply.body


def test_the_bootstrap_token_is_an_admin_and_nothing_more(gw):
    token = gw.tokens["bootstrap"]
    assert gw.admin_call("/api/v1/status", token).status == 200
    assert gw.admin_call("/api/v1/whoami", token).json()["roles"] == ["admin"]
    assert gw.admin_call("/api/v1/requests", token).status == 403  # reading traffic: auditors


def test_a_revoked_role_or_removed_account_stops_working_at_the_next_request(gw):
    book = AccountBook(accounts_path(gw.data_dir))
    book.add("temp-aud", ["auditor"], PASSWORD)
    token = book.issue_token("temp-aud")
    session = login(gw, "temp-aud")
    assert gw.admin_call("/api/v1/requests", token).status == 200
    assert gw.admin_call("/requests?user=x", headers={"Cookie": session.cookie}).status == 200
    book.set_roles("temp-aud", ["approver"])
    assert gw.admin_call("/api/v1/requests", token).status == 403
    assert gw.admin_call("/requests?user=x", headers={"Cookie": session.cookie}).status == 403
    book.remove("temp-aud")
    assert gw.admin_call("/api/v1/whoami", token).status == 401
    reply = gw.admin_call("/", headers={"Cookie": session.cookie})
    assert reply.status == 302 and reply.headers["location"] == "/login"


def test_session_and_xsrf_cookies_carry_secure_flags(gw):
    reply = post_login(gw, "aud", PASSWORD)
    assert reply.status == 303
    session = cookies_of(reply)["egress_session"].lower()
    for flag in ("secure", "httponly", "samesite=strict", "path=/"):
        assert flag in session.split("; "), session
    assert "expires" not in session and "max-age" not in session  # gone with the browser
    xsrf = cookies_of(gw.admin_call("/login"))["_xsrf"].lower()
    for flag in ("secure", "httponly", "samesite=strict"):
        assert flag in xsrf.split("; "), xsrf
    for name in ("strict-transport-security", "content-security-policy", "x-frame-options"):
        assert name in reply.headers


def test_state_changes_need_the_xsrf_token_and_a_same_origin(gw):
    s = login(gw, "aud")
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    def logout(body: dict[str, str], **headers: str) -> int:
        return gw.admin_call(
            "/logout",
            method="POST",
            body=urllib.parse.urlencode(body).encode(),
            headers={**form, "Cookie": s.cookie, **headers},
        ).status

    def still_logged_in() -> bool:
        return gw.admin_call("/", headers={"Cookie": s.cookie}).status == 200

    assert logout({}) == 403 and still_logged_in()  # no token
    _, other_field = login_form(gw)  # a token that belongs to another cookie
    assert logout({"_xsrf": other_field}) == 403 and still_logged_in()
    assert logout({"_xsrf": s.xsrf_field}, Origin="https://evil.example") == 403
    assert still_logged_in()
    assert logout({"_xsrf": s.xsrf_field}, Origin=f"https://{gw.admin}") == 303
    assert not still_logged_in()
    # Login itself is protected, so nobody can log a victim into the attacker's account.
    body = urllib.parse.urlencode({"username": "aud", "password": PASSWORD}).encode()
    assert gw.admin_call("/login", method="POST", body=body, headers=form).status == 403


def test_a_login_gets_a_fresh_session_id(gw):
    first = login(gw, "aud")
    second = session_of(post_login(gw, "aud", PASSWORD, session=first.session))
    assert second != first.session
    assert gw.admin_call("/", headers={"Cookie": first.cookie}).status == 302  # the old one ended


def test_failed_logins_are_throttled_per_address_and_per_account(gw):
    # Per address: ten failures lock that address, right password or not; others are fine.
    for _ in range(10):
        assert post_login(gw, "ann", "wrong password!", source="127.0.0.5").status == 401
    assert post_login(gw, "aud", PASSWORD, source="127.0.0.5").status == 429
    assert gw.admin_call("/login", source="127.0.0.5").status == 429
    assert post_login(gw, "aud", PASSWORD, source="127.0.0.6").status == 303
    # Per account: twenty failures from many addresses lock the account name.
    for i in range(20):
        assert post_login(gw, "appr", "wrong password!", source=f"127.0.1.{i}").status == 401
    locked = post_login(gw, "appr", PASSWORD, source="127.0.0.7")
    assert locked.status == 429 and b"Too many failed logins" in locked.body
    assert post_login(gw, "ann", PASSWORD, source="127.0.0.7").status == 303


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
