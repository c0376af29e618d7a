"""Exceptions through the real gateway: an approver grants one with ``egress-guard
exceptions`` over the admin API, and the proxy user it is for (proxy login from an htpasswd
file) passes at the next request — the upstream receives what was blocked before, plain and
intercepted HTTPS, and the request log carries the exception's id — while everyone else is
still blocked; a revocation bites at the next request. Refusals (wrong role, self-grant) are
refused and recorded in the console's events in ClickHouse; the events reach the store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from egress_guard.console.accounts import AccountBook, accounts_path
from harness import GatewayProcess, cli, curl
from support import policy_copy

pytestmark = pytest.mark.slow

# The upstream under its other name is a webmail site here: blocked for everyone.
E2E_RULES = """\
categories:
  webmail:
    rules:
      - id: webmail.e2e-localhost
        service: "Test: localhost"
        exact_hosts: [localhost]
"""
USERS = ("alice", "bob", "appr")  # appr: an approver who is also a proxy user


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    from passlib.apache import HtpasswdFile

    base = tmp_path_factory.mktemp("gw-exceptions")
    policies = policy_copy(base, {"e2e.yaml": E2E_RULES})
    htpasswd = HtpasswdFile(str(base / "htpasswd"), new=True)
    for user in USERS:
        htpasswd.set_password(user, "pw")
    htpasswd.save()
    g = GatewayProcess(
        base / "data",
        policies,
        upstream.ca_path,
        extra_args=("--set", f"proxyauth=@{base / 'htpasswd'}"),
    ).start()
    book = AccountBook(accounts_path(g.data_dir))
    g.tokens = {"bootstrap": (g.data_dir / "admin-token").read_text().strip()}
    for name, role in (("appr", "approver"), ("appr2", "approver"), ("aud", "auditor")):
        book.add(name, [role])
        g.tokens[name] = book.issue_token(name)
    yield g
    g.stop()
    assert "Traceback" not in g.text(), g.text()


def exceptions(gw, who: str, *args: str, check: bool = True) -> Any:
    command, rest = args[0], args[1:]
    return cli(
        "exceptions",
        command,
        "--admin",
        gw.admin,
        "--data-dir",
        str(gw.data_dir),
        "--token",
        gw.tokens[who],
        *rest,
        check=check,
    )


def as_user(user: str) -> tuple[str, ...]:
    return ("--proxy-user", f"{user}:pw")


def console_events(gw) -> list[dict[str, Any]]:
    reply = gw.admin_call("/api/v1/console-events?limit=10000", gw.tokens["bootstrap"])
    assert reply.status == 200
    return reply.json()["rows"]


def test_a_grant_lets_its_user_through_at_once_and_a_revocation_blocks_again(gw, upstream):
    plain = f"http://localhost:{upstream.http_port}"
    tls = f"https://localhost:{upstream.https_port}"
    before = curl(f"{plain}/before-the-grant", gw.proxy, extra=as_user("alice"))
    assert before.status == 403 and before.headers["x-egress-guard-rule"] == "webmail.e2e-localhost"
    assert upstream.find("/before-the-grant") is None

    why = "the customer only answers by this webmail"
    granted = exceptions(gw, "appr", "grant", "--user", "alice", "--host", "localhost",
                         "--for", "2h", "--reason", why)  # fmt: skip
    exception_id = granted.stdout.strip()
    assert exception_id.startswith("ex-"), granted.stdout
    assert "active: user:alice past block for localhost" in granted.stderr

    # In force on this node at once: no wait, no reload.
    after = curl(f"{plain}/after-the-grant", gw.proxy, extra=as_user("alice"))
    assert after.status == 200, (after.status, after.body[:300])
    assert upstream.find("/after-the-grant") is not None  # the upstream got what was blocked
    inside = curl(f"{tls}/after-the-grant-tls", gw.proxy, gw.ca_pem(), extra=as_user("alice"))
    assert inside.status == 200 and upstream.find("/after-the-grant-tls") is not None
    other = curl(f"{plain}/bob-after-the-grant", gw.proxy, extra=as_user("bob"))
    assert other.status == 403 and upstream.find("/bob-after-the-grant") is None

    rows = gw.wait_rows(
        lambda rs: {"/after-the-grant", "/after-the-grant-tls"} <= {r["path"] for r in rs},
        "--user",
        "alice",
    )
    passed = [r for r in rows if r["path"] in ("/after-the-grant", "/after-the-grant-tls")]
    assert len(passed) == 2 and all(r["exception_id"] == exception_id for r in passed)
    assert all(r["decision"] == "allow" and r["reason_kind"] == "exception" for r in passed)
    assert all(r["rule_id"] == "webmail.e2e-localhost" for r in passed)  # what it lifted
    blocked = [r for r in rows if r["path"] == "/before-the-grant"]
    assert blocked and blocked[0]["exception_id"] == "" and blocked[0]["decision"] == "block"

    shown = json.loads(exceptions(gw, "aud", "show", exception_id, "--format", "json").stdout)
    assert shown["state"] == "active" and shown["category"] == "webmail"
    assert [(e["kind"], e["actor"]) for e in shown["events"]] == [("granted", "appr")]
    # The event reached the store too: the history read from ClickHouse lists it.
    since = exceptions(gw, "aud", "list", "--since", "1d", "--format", "json").stdout
    assert exception_id in {e["id"] for e in json.loads(since)}

    revoked = exceptions(gw, "appr2", "revoke", exception_id, "--reason", "the project ended")
    assert revoked.stdout.strip() == exception_id
    again = curl(f"{plain}/after-the-revocation", gw.proxy, extra=as_user("alice"))
    assert again.status == 403 and upstream.find("/after-the-revocation") is None
    history = json.loads(exceptions(gw, "appr", "show", exception_id, "--format", "json").stdout)
    assert history["state"] == "revoked" and history["end_reason"] == "the project ended"
    assert [(e["kind"], e["actor"]) for e in history["events"]] == [
        ("granted", "appr"),
        ("revoked", "appr2"),
    ]
    events = console_events(gw)
    noted = {(e["action"], e["actor"], e["outcome"]) for e in events}
    assert {("exception_grant", "appr", "ok"), ("exception_revoke", "appr2", "ok")} <= noted
    grant_note = next(e for e in events if e["action"] == "exception_grant")
    assert json.loads(grant_note["detail"])["exception_id"] == exception_id


def test_wrong_roles_and_self_grants_are_refused_and_recorded(gw, upstream):
    as_auditor = exceptions(gw, "aud", "grant", "--user", "bob", "--host", "localhost",
                            "--for", "1h", "--reason", "x", check=False)  # fmt: skip
    assert as_auditor.returncode == 1 and "admin API answered 403" in as_auditor.stderr
    as_admin = exceptions(gw, "bootstrap", "list", check=False)
    assert as_admin.returncode == 1 and "admin API answered 403" in as_admin.stderr
    for_self = exceptions(gw, "appr", "grant", "--user", "appr", "--host", "localhost",
                          "--for", "1h", "--reason", "me", check=False)  # fmt: skip
    assert for_self.returncode == 1
    assert "nobody grants an exception for themselves" in for_self.stderr
    assert (
        curl(f"http://localhost:{upstream.http_port}/self", gw.proxy, extra=as_user("appr")).status
        == 403
    )

    events = console_events(gw)
    denied = [e for e in events if e["outcome"] == "denied"]
    assert any(e["actor"] == "aud" and e["detail"] == "/api/v1/exceptions" for e in denied)
    assert any(e["actor"] == "admin-token" and e["detail"] == "/api/v1/exceptions" for e in denied)
    refusal = next(e for e in denied if e["action"] == "exception_grant")
    assert refusal["actor"] == "appr" and json.loads(refusal["detail"])["code"] == "self_approval"
