"""An exception's whole life through the real gateway, as the people involved live it: an
employee (proxy login from an htpasswd file) is blocked, requests an exception from the block
page (the form posted through the proxy to the gateway's own portal host, with curl trusting
the exported CA), the approvers get an e-mail (a local SMTP server), one approves in the
console in Debian's Chromium, the employee hears of it by e-mail and passes (the upstream
records the bytes; the row carries the exception id), and when the gateway's clock passes the
expiry the employee is blocked again. Also through the gateway: an upload exception raises the
cap to exactly the granted size, a marker level needs two different approvers, a replayed form
is refused, and a restart with the store unreachable still honours — and still expires — what
was approved."""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import re
import socket
import time
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiosmtpd.controller import Controller
from test_console_browser import CHROMEDRIVER, chromium_for, shoot, wait_for
from test_notify_e2e import Inbox

from egress_guard.console.accounts import AccountBook, accounts_path
from egress_guard.runtime.portal import FORM_ACTION
from harness import GatewayProcess, cli, curl, free_port
from support import policy_copy

pytestmark = pytest.mark.slow

if CHROMEDRIVER is None:  # test_console_browser skips the module then: so does this one
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402

# The upstream under its other name is a webmail site: blocked for everyone. Uploads are
# capped at 1 MiB a request so that an upload exception is cheap to test.
E2E_RULES = """\
categories:
  webmail:
    rules:
      - id: webmail.e2e-localhost
        service: "Test: localhost"
        exact_hosts: [localhost]
"""
UPLOADS = """\
uploads:
  per_request: 1MiB
  per_user: 200MiB
  window: 24h
  hold_in_memory: 1MiB
"""
NOTIFY = """\
notifications:
  smtp: {{host: 127.0.0.1, port: {port}, security: none, from: egress-guard@corp.example}}
  approvers: {{email: [approvers@corp.example], webhook: false}}
  requester: {{email_domain: corp.example}}
  retry: {{attempts: 3, first_delay: 1s}}
"""
USERS = ("alice", "bob", "carol", "dave")
PASSWORD = "approver browser password"
WAIT = 20.0  # the most a test waits for a mail or a row (they take well under a second)


def closed_port() -> int:
    """A loopback port nothing listens on: a ClickHouse server that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateways:
    """The gateway of this module, its accounts and the faults file that moves its clock."""

    def __init__(self, base: Path, upstream: Any, inbox: Inbox, inbox_port: int):
        from passlib.apache import HtpasswdFile

        self.base, self.upstream, self.inbox, self.inbox_port = base, upstream, inbox, inbox_port
        self.policies = policy_copy(
            base,
            {
                "e2e.yaml": E2E_RULES,
                "uploads.yaml": UPLOADS,
                "notify.yaml": NOTIFY.format(port=inbox_port),
            },
        )
        self.htpasswd = base / "htpasswd"
        users = HtpasswdFile(str(self.htpasswd), new=True)
        for user in USERS:
            users.set_password(user, "pw")
        users.save()
        self.faults = base / "faults"
        self.faults.write_text("")
        self.gw = self.start()
        book = AccountBook(accounts_path(self.gw.data_dir))
        self.tokens: dict[str, str] = {}
        for name in ("appr", "appr2"):
            book.add(name, ["approver"], PASSWORD)
            self.tokens[name] = book.issue_token(name)

    def start(self, *extra: str) -> GatewayProcess:
        return GatewayProcess(
            self.base / "data",
            self.policies,
            self.upstream.ca_path,
            extra_args=("--set", f"proxyauth=@{self.htpasswd}", *extra),
            fault_file=self.faults,
        ).start()

    def move_clock(self, seconds: float) -> None:
        self.faults.write_text(f"clock+{seconds}")

    def cli(self, who: str, *args: str, check: bool = True) -> Any:
        return cli(
            "exceptions",
            args[0],
            "--admin",
            self.gw.admin,
            "--data-dir",
            str(self.gw.data_dir),
            "--token",
            self.tokens[who],
            *args[1:],
            check=check,
        )

    def as_user(self, user: str, url: str, **kw: Any) -> Any:
        extra = ("--proxy-user", f"{user}:pw", *kw.pop("extra", ()))
        return curl(url, self.gw.proxy, self.gw.ca_pem(), extra=extra, **kw)

    def mail_to(self, address: str, exception_id: str) -> email.message.EmailMessage:
        """The first mail to ``address`` about the exception, waited for (bounded)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for _sender, rcpts, content in list(self.inbox.received):
                message = email.message_from_bytes(content, policy=email.policy.default)
                if address in rcpts and exception_id in str(message["subject"]):
                    return message  # type: ignore[return-value]
            time.sleep(0.1)
        raise AssertionError(f"no mail to {address} about {exception_id}: {self.inbox.received}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, upstream):
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    g = Gateways(tmp_path_factory.mktemp("gw-exception-lifecycle"), upstream, inbox, port)
    yield g
    g.gw.stop()
    controller.stop()
    assert "Traceback" not in g.gw.text(), g.gw.text()


def form_of(page: bytes) -> dict[str, str]:
    """The hidden fields of the block page's request form."""
    return {
        name.decode(): unescape(value.decode())
        for name, value in re.findall(rb'<input type="hidden" name="(\w+)" value="([^"]*)">', page)
    }


def request_from_block_page(g: Gateways, user: str, url: str, reason: str, **more: str) -> str:
    """Be blocked at ``url``, post the page's form to the portal; the new exception's id."""
    blocked = g.as_user(user, url)
    assert blocked.status == 403, blocked.body[:300]
    fields = form_of(blocked.body)
    assert fields["requester"] == user and fields["sig"], fields
    body = urlencode({**fields, "reason": reason, "duration": "1d", **more}).encode()
    posted = g.as_user(
        user,
        FORM_ACTION,
        method="POST",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert posted.status == 200, posted.body[:500]
    found = re.search(rb"ex-[0-9a-z]{12}", posted.body)
    assert found, posted.body[:500]
    replayed = g.as_user(
        user,
        FORM_ACTION,
        method="POST",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert replayed.status == 409  # the same form twice: one request
    return found.group().decode()


def login(browser, base: str, user: str) -> None:
    browser.get(f"{base}/login")
    browser.find_element(By.ID, "username").send_keys(user)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "submit").click()
    assert browser.find_element(By.ID, "who").text == f"{user} (approver)"


def test_request_notify_approve_in_the_browser_pass_and_expire(setup, upstream, tmp_path):
    g = setup
    plain = f"http://localhost:{upstream.http_port}"
    why = "客户只用这个邮箱 / the customer only answers by this webmail"
    exception_id = request_from_block_page(g, "alice", f"{plain}/inbox", why)
    assert upstream.find("/inbox") is None  # the blocked request never reached it

    to_approvers = g.mail_to("approvers@corp.example", exception_id)
    text = to_approvers.get_body(("plain",)).get_content()
    assert "alice" in text and "localhost" in text and "webmail" in text and why in text

    browser = chromium_for(g.gw, tmp_path / "profile")
    try:
        base = f"https://127.0.0.1:{g.gw.admin_port}"
        login(browser, base, "appr")
        browser.get(f"{base}/exceptions")
        row = browser.find_element(By.ID, f"pending-{exception_id}").text
        assert "alice" in row and "/inbox" in row and "webmail.e2e-localhost" in row
        shoot(browser, tmp_path, "exceptions-queue", 700)
        browser.find_element(By.ID, f"review-{exception_id}").click()
        assert "/inbox" in browser.find_element(By.ID, "blocked-rows").text
        duration = browser.find_element(By.ID, "a-duration")
        duration.clear()
        duration.send_keys("1h")  # narrower than the day asked for
        shoot(browser, tmp_path, "exceptions-detail", 1100)
        browser.find_element(By.ID, "a-submit").click()
        wait_for(browser, lambda: "active" in browser.find_element(By.ID, "state").text)
        history = browser.find_element(By.ID, "history").text
        assert "requested" in history and "approved" in history and "appr" in history
    finally:
        browser.quit()

    to_alice = g.mail_to("alice@corp.example", exception_id)
    assert "approved" in str(to_alice["subject"]).lower() or "批准" in str(to_alice["subject"])

    passed = g.as_user("alice", f"{plain}/inbox-after-approval")
    assert passed.status == 200, passed.body[:300]
    assert upstream.find("/inbox-after-approval") is not None
    assert g.as_user("bob", f"{plain}/bob-meanwhile").status == 403  # only alice
    assert upstream.find("/bob-meanwhile") is None
    rows = g.gw.wait_rows(
        lambda rs: any(r["path"] == "/inbox-after-approval" for r in rs), "--user", "alice"
    )
    row = next(r for r in rows if r["path"] == "/inbox-after-approval")
    assert (row["decision"], row["exception_id"]) == ("allow", exception_id)

    g.move_clock(3600 + 5)  # past the hour the approver gave
    try:
        again = g.as_user("alice", f"{plain}/inbox-after-expiry")
        assert again.status == 403 and upstream.find("/inbox-after-expiry") is None
        shown = json.loads(g.cli("appr2", "show", exception_id, "--format", "json").stdout)
        assert shown["state"] == "expired"
        assert [e["kind"] for e in shown["events"]][:2] == ["requested", "approved"]
    finally:
        g.move_clock(0)


def test_an_upload_exception_raises_the_cap_to_exactly_the_granted_size(setup, upstream):
    g = setup
    url = f"http://127.0.0.1:{upstream.http_port}"
    granted = 3 * 1024 * 1024
    exception_id = g.cli(
        "appr", "grant", "--user", "carol", "--host", "127.0.0.1", "--control", "upload",
        "--max-bytes", "3MiB", "--for", "2h", "--reason", "the quarterly CAD drop",
    ).stdout.strip()  # fmt: skip
    exactly = g.as_user("carol", f"{url}/upload-exactly", method="POST", data=b"a" * granted)
    assert exactly.status == 200, exactly.body[:300]
    assert upstream.find("/upload-exactly").body_len == granted
    over = g.as_user("carol", f"{url}/upload-one-more", method="POST", data=b"a" * (granted + 1))
    assert over.status == 413 and upstream.find("/upload-one-more") is None
    other = g.as_user("dave", f"{url}/upload-dave", method="POST", data=b"a" * (2 * 1024 * 1024))
    assert other.status == 413 and upstream.find("/upload-dave") is None  # the 1 MiB cap
    rows = g.gw.wait_rows(
        lambda rs: any(r["path"] == "/upload-exactly" for r in rs), "--user", "carol"
    )
    assert next(r for r in rows if r["path"] == "/upload-exactly")["exception_id"] == exception_id


def test_a_marker_level_needs_two_different_approvers(setup, upstream):
    g = setup
    url = f"http://127.0.0.1:{upstream.http_port}"
    document = "核心商密★ 项目报价 / the quote for the customer".encode()
    exception_id = g.cli(
        "appr", "grant", "--user", "dave", "--host", "127.0.0.1",
        "--control", "marker:trade_secret", "--for", "2h", "--reason", "the customer's quote",
    ).stdout.strip()  # fmt: skip
    first = g.as_user("dave", f"{url}/quote-one-approval", method="POST", data=document)
    assert first.status == 403 and upstream.find("/quote-one-approval") is None
    again = g.cli("appr", "approve", exception_id, check=False)  # the granter once more
    assert again.returncode == 1
    g.cli("appr2", "approve", exception_id)
    second = g.as_user("dave", f"{url}/quote-two-approvals", method="POST", data=document)
    assert second.status == 200, second.body[:300]
    arrived = upstream.find("/quote-two-approvals")
    assert arrived.body_sha256 == hashlib.sha256(document).hexdigest()
    rows = g.gw.wait_rows(
        lambda rs: any(r["path"] == "/quote-two-approvals" for r in rs), "--user", "dave"
    )
    row = next(r for r in rows if r["path"] == "/quote-two-approvals")
    assert (row["decision"], row["exception_id"]) == ("alert", exception_id)
    assert "核心商密" not in json.dumps(row, ensure_ascii=False)  # the matched text never


def test_a_restart_with_the_store_down_honours_and_expires_what_was_approved(setup, upstream):
    g = setup
    plain = f"http://localhost:{upstream.http_port}"
    exception_id = g.cli(
        "appr", "grant", "--user", "bob", "--host", "localhost", "--for", "2h",
        "--reason", "a partner's webmail for the migration",
    ).stdout.strip()  # fmt: skip
    assert g.as_user("bob", f"{plain}/bob-before-restart").status == 200
    g.gw.stop()
    down = f"http://default:@127.0.0.1:{closed_port()}/default?connect_timeout=1"
    g.gw = g.start("--clickhouse", down)
    try:
        assert "UNREACHABLE" in g.gw.text()
        kept = g.as_user("bob", f"{plain}/bob-store-down")
        assert kept.status == 200 and upstream.find("/bob-store-down") is not None
        assert g.as_user("dave", f"{plain}/dave-store-down").status == 403  # none for him
        assert upstream.find("/dave-store-down") is None
        g.move_clock(2 * 3600 + 5)
        gone = g.as_user("bob", f"{plain}/bob-store-down-expired")
        assert gone.status == 403 and upstream.find("/bob-store-down-expired") is None
    finally:
        g.move_clock(0)
        g.gw.stop()
        g.gw = g.start()
    assert exception_id in g.cli("appr", "list", "--state", "all").stdout
