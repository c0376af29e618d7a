"""Notifications against real servers on 127.0.0.1: an SMTP server (aiosmtpd) plain, with
STARTTLS and a login, and with TLS from the start; an HTTP server as each webhook kind's
receiver. The assertions are on what the servers received (the e-mail decoded, the webhook's
JSON, query and headers), and a server that is down at first gets the message once it is up.
Retries run on a fake clock whose sleep is where a test brings the server up, so nothing waits
for a backoff; every socket has a timeout. In process, no gateway: seconds in all."""

from __future__ import annotations

import collections
import datetime
import email
import email.policy
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from egress_guard.notify import (
    ExceptionNotice,
    NotificationsSpec,
    Notifier,
    dingtalk_sign,
    generic_signature,
)

T0 = 1_800_000_000_000
WALL = T0 / 1000  # the notifier's wall clock: dates the mail, signs the webhooks
WAIT = 10.0  # the most a test waits for the worker; it takes milliseconds
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class FakeClock:
    def __init__(self, on_sleep=None) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))
        self.now += seconds


class Tally(collections.Counter):
    def __call__(self, channel: str, outcome: str) -> None:
        self[(channel, outcome)] += 1


def notice(kind="pending", **over) -> ExceptionNotice:
    fields = {
        "exception_id": "ex-0123456789ab",
        "requester": "li.na",
        "subject": "user:li.na",
        "control": "block",
        "target": "mail.qq.com",
        "category": "webmail",
        "rule_id": "webmail.qq",
        "request_id": "7f3c9a",
        "reason": "把签好的合同发给客户 / send the signed contract",
        "start_ms": T0,
        "expiry_ms": T0 + 7 * 86_400_000,
        "ts_ms": T0,
    }
    fields.update(over)
    return ExceptionNotice(kind, **fields)


def notifier(section: dict, base_dir=None, clock=None, tally=None) -> Notifier:
    clock = clock or FakeClock()
    return Notifier(
        NotificationsSpec.model_validate(section),
        count=tally if tally is not None else Tally(),
        base_dir=base_dir,
        clock=clock,
        sleep=clock.sleep,
        wall=lambda: WALL,
    )


# --- SMTP ----------------------------------------------------------------------------------


class Inbox:
    """An aiosmtpd handler that keeps what it received; with ``password``, the authenticator
    for that one account."""

    def __init__(self, password: bytes | None = None) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.logins: list[str] = []
        self.password = password

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's hook
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.password == self.password
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)

    def message(self, i: int = 0) -> email.message.EmailMessage:
        return email.message_from_bytes(self.received[i][2], policy=email.policy.default)


def smtp_server(inbox: Inbox, port: int, **params) -> Controller:
    controller = Controller(
        inbox, hostname=LOOPBACK, port=port, ready_timeout=WAIT, timeout=WAIT, **params
    )
    controller.start()
    return controller


@pytest.fixture
def tls(tmp_path):
    """A private CA and a certificate for 127.0.0.1 it signed: (ca.pem path, server context)."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(name, key, issuer, issuer_key, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress-guard test CA")])
    ca = cert("egress-guard test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert(LOOPBACK, key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    return tmp_path / "ca.pem", context


def smtp_section(port: int, **smtp) -> dict:
    return {
        "console_url": "https://gw.corp.example:8443",
        "timezone": "Asia/Shanghai",
        "smtp": {
            "host": LOOPBACK,
            "port": port,
            "security": "none",
            "from": "Egress Guard <egress-guard@corp.example>",
            "timeout": "5s",
            **smtp,
        },
        "approvers": {"email": ["wang.fang@corp.example", "zhao.lei@corp.example"]},
        "requester": {"email_domain": "corp.example"},
    }


def test_a_pending_request_mails_the_approvers():
    inbox, port = Inbox(), free_port()
    server = smtp_server(inbox, port)
    tally = Tally()
    try:
        n = notifier(smtp_section(port), tally=tally)
        n.submit(notice(approvals_needed=2))
        assert n.wait_idle(WAIT) and n.close(WAIT)
    finally:
        server.stop()
    ((mail_from, rcpt, _raw),) = inbox.received
    assert mail_from == "egress-guard@corp.example"
    assert rcpt == ["wang.fang@corp.example", "zhao.lei@corp.example"]
    msg = inbox.message()
    assert msg["Subject"] == (
        "[Egress Guard] 例外申请待审批 / Exception request pending: ex-0123456789ab (mail.qq.com)"
    )
    assert msg["To"] == "wang.fang@corp.example, zhao.lei@corp.example"
    assert msg["Auto-Submitted"] == "auto-generated"
    body = msg.get_content()
    assert body.startswith("新的例外申请待审批\r\nA new exception request is waiting for approval")
    for line in [
        "申请人 / Requested by: li.na",
        "目标 / Target: mail.qq.com",
        "规则 / Rule: webmail.qq",
        "到期 / Expires: 2027-01-22 16:00 UTC+08:00",
        "审批进度 / Approvals: 0 / 2",
        "申请理由 / Reason: 把签好的合同发给客户 / send the signed contract",
        "https://gw.corp.example:8443/exceptions/ex-0123456789ab",
    ]:
        assert line in body.splitlines()
    assert tally == {("email", "sent"): 1}


def test_a_decision_mails_the_requester_over_starttls_with_a_login(tmp_path, tls):
    ca_file, context = tls
    (tmp_path / "smtp.pw").write_text("pw-0f1e2d\n")
    inbox, port = Inbox(password=b"pw-0f1e2d"), free_port()
    server = smtp_server(
        inbox,
        port,
        tls_context=context,
        require_starttls=True,
        authenticator=inbox,
        auth_required=True,
    )
    try:
        section = smtp_section(
            port,
            security="starttls",
            ca_file=str(ca_file),
            username="egress-guard",
            password_file="smtp.pw",
        )
        n = notifier(section, base_dir=tmp_path)
        n.submit(notice("approved", actor="wang.fang"))
        assert n.wait_idle(WAIT) and n.close(WAIT)
    finally:
        server.stop()
    assert inbox.logins == ["egress-guard"]
    ((_from, rcpt, _raw),) = inbox.received
    assert rcpt == ["li.na@corp.example"]
    body = inbox.message().get_content()
    assert "您的例外申请已批准" in body and "批准人 / Approved by: wang.fang" in body


def test_implicit_tls(tls):
    ca_file, context = tls
    inbox, port = Inbox(), free_port()
    server = smtp_server(inbox, port, ssl_context=context)
    try:
        n = notifier(smtp_section(port, security="tls", ca_file=str(ca_file)))
        n.submit(notice("revoked", actor="wang.fang"))
        assert n.wait_idle(WAIT) and n.close(WAIT)
    finally:
        server.stop()
    assert [r for _f, r, _b in inbox.received] == [["li.na@corp.example"]]


def test_an_untrusted_certificate_is_never_sent_to(tls):
    """Without the private CA the certificate does not verify: the message is not sent (nor
    sent in clear instead), and the attempts are counted."""
    _ca_file, context = tls
    inbox, port = Inbox(), free_port()
    server = smtp_server(inbox, port, tls_context=context)
    tally = Tally()
    try:
        n = notifier(
            {**smtp_section(port, security="starttls"), "retry": {"attempts": 2}}, tally=tally
        )
        n.submit(notice("denied"))
        assert n.wait_idle(WAIT) and n.close(WAIT)
    finally:
        server.stop()
    assert inbox.received == []
    assert tally == {("email", "retried"): 1, ("email", "failed"): 1}


def test_a_relay_down_at_first_gets_the_mail_once_it_is_up():
    inbox, port = Inbox(), free_port()  # nothing listens there yet: connection refused
    servers: list[Controller] = []
    clock = FakeClock(on_sleep=lambda i: i == 2 and servers.append(smtp_server(inbox, port)))
    tally = Tally()
    try:
        n = notifier(smtp_section(port), clock=clock, tally=tally)
        n.submit(notice("expired"))
        assert n.wait_idle(WAIT) and n.close(WAIT)
    finally:
        for server in servers:
            server.stop()
    assert clock.sleeps == [40.0, 80.0]  # refused twice; up during the second backoff
    assert len(inbox.received) == 1
    assert "您的例外已到期" in inbox.message().get_content()
    assert tally == {("email", "retried"): 2, ("email", "sent"): 1}


def test_a_recipient_the_relay_refuses_is_not_retried():
    class Refusing(Inbox):
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            return "550 5.1.1 no such user"

    inbox, port = Refusing(), free_port()
    server = smtp_server(inbox, port)
    tally = Tally()
    try:
        n = notifier(smtp_section(port), tally=tally)
        n.submit(notice("denied"))
        assert n.wait_idle(WAIT) and n.close(WAIT)
    finally:
        server.stop()
    assert inbox.received == [] and tally == {("email", "failed"): 1}


# --- webhooks ------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1: keeps each request (path, query, headers, body) and
    answers with the next of ``answers`` ((status, body, headers)), then 200 and ``ok``."""

    def __init__(self, answers=(), ok=b'{"errcode":0,"errmsg":"ok"}', port: int = 0) -> None:
        self.requests: list[dict] = []
        self.answers = list(answers)
        self.ok = ok
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = WAIT  # a socket timeout for each connection

            def do_POST(self):  # http.server calls it by this name
                size = int(self.headers.get("Content-Length", "0"))
                split = urllib.parse.urlsplit(self.path)
                outer.requests.append(
                    {
                        "path": split.path,
                        "query": urllib.parse.parse_qs(split.query),
                        "raw_query": split.query,
                        "headers": dict(self.headers),
                        "body": self.rfile.read(size),
                    }
                )
                status, body, headers = (
                    outer.answers.pop(0) if outer.answers else (200, outer.ok, {})
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT)

    def json(self, i: int = 0) -> dict:
        return json.loads(self.requests[i]["body"])


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(**kw) -> Receiver:
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def hook_section(webhook: dict, **over) -> dict:
    return {
        "console_url": "https://gw.corp.example:8443",
        "webhook": {"timeout": "5s", **webhook},
        "requester": {"webhook": True},
        **over,
    }


def send_one(section, the_notice=None, base_dir=None, clock=None) -> Tally:
    tally = Tally()
    n = notifier(section, base_dir=base_dir, clock=clock, tally=tally)
    n.submit(the_notice or notice())
    assert n.wait_idle(WAIT) and n.close(WAIT)
    return tally


def test_generic_webhook_gets_signed_json(tmp_path, receiver):
    r = receiver()
    (tmp_path / "hook.key").write_text("k-9a8b7c\n")
    tally = send_one(
        hook_section({"url": r.url("/hooks/egress"), "secret_file": "hook.key"}),
        base_dir=tmp_path,
    )
    (req,) = r.requests
    assert req["path"] == "/hooks/egress"
    assert req["headers"]["Content-Type"] == "application/json; charset=utf-8"
    body = r.json()
    assert body["event"] == "exception.pending"
    assert body["exception"]["id"] == "ex-0123456789ab"
    assert body["exception"]["target"] == "mail.qq.com"
    assert body["link"] == "https://gw.corp.example:8443/exceptions/ex-0123456789ab"
    assert "新的例外申请待审批" in body["text"]
    # The receiver checks the signature as its docs would tell it to.
    stamp = req["headers"]["X-Egress-Guard-Timestamp"]
    assert stamp == str(int(WALL))
    expected = hmac.new(b"k-9a8b7c", stamp.encode() + b"." + req["body"], hashlib.sha256)
    assert req["headers"]["X-Egress-Guard-Signature"] == "sha256=" + expected.hexdigest()
    assert (
        generic_signature("k-9a8b7c", int(stamp), req["body"])
        == (req["headers"]["X-Egress-Guard-Signature"])
    )
    assert tally == {("webhook", "sent"): 1}


def test_dingtalk_gets_text_and_a_signed_query(tmp_path, receiver):
    r = receiver()
    (tmp_path / "hook.url").write_text(r.url("/robot/send?access_token=tok-42") + "\n")
    (tmp_path / "hook.key").write_text("SECdingtalk\n")
    section = hook_section({"kind": "dingtalk", "url_file": "hook.url", "secret_file": "hook.key"})
    tally = send_one(section, notice("approved", actor="wang.fang"), base_dir=tmp_path)
    (req,) = r.requests
    assert req["path"] == "/robot/send"
    stamp = int(T0)
    assert req["query"] == {
        "access_token": ["tok-42"],
        "timestamp": [str(stamp)],
        "sign": [urllib.parse.unquote_plus(dingtalk_sign("SECdingtalk", stamp))],
    }
    body = r.json()
    assert body["msgtype"] == "text" and list(body["text"]) == ["content"]
    assert body["text"]["content"].startswith("[Egress Guard] 例外申请已批准 / Exception approved")
    assert tally == {("webhook", "sent"): 1}


def test_wecom_gets_text_and_its_errcode_is_read(tmp_path, receiver):
    """WeCom answers 200 with errcode 45009 when rate-limited: that attempt is retried."""
    r = receiver(answers=[(200, b'{"errcode":45009,"errmsg":"api freq out of limit"}', {})])
    (tmp_path / "hook.url").write_text(r.url("/cgi-bin/webhook/send?key=k-123"))
    tally = send_one(hook_section({"kind": "wecom", "url_file": "hook.url"}), base_dir=tmp_path)
    assert len(r.requests) == 2
    assert r.requests[0]["query"] == {"key": ["k-123"]}
    assert r.json(1)["msgtype"] == "text"
    assert "新的例外申请待审批" in r.json(1)["text"]["content"]
    assert tally == {("webhook", "retried"): 1, ("webhook", "sent"): 1}


def test_slack_gets_text(tmp_path, receiver):
    r = receiver(ok=b"ok")
    (tmp_path / "hook.url").write_text(r.url("/services/T0/B0/xyz"))
    tally = send_one(
        hook_section({"kind": "slack", "url_file": "hook.url"}),
        notice("denied", reason="<!channel> use the share"),
        base_dir=tmp_path,
    )
    body = r.json()
    assert list(body) == ["text"]
    assert "您的例外申请被拒绝" in body["text"]
    assert "&lt;!channel&gt; use the share" in body["text"]
    assert tally == {("webhook", "sent"): 1}


def test_a_receiver_down_at_first_gets_the_message_once_it_is_up(tmp_path):
    port = free_port()
    up: list[Receiver] = []
    clock = FakeClock(on_sleep=lambda i: up.append(Receiver(port=port)))
    try:
        tally = send_one(
            hook_section({"url": f"http://{LOOPBACK}:{port}/hooks/egress"}), clock=clock
        )
        (r,) = up
        assert r.json()["event"] == "exception.pending"
        assert clock.sleeps == [40.0]
        assert tally == {("webhook", "retried"): 1, ("webhook", "sent"): 1}
    finally:
        for r in up:
            r.stop()


def test_server_errors_are_retried_client_errors_are_not(receiver):
    r = receiver(answers=[(503, b"busy", {}), (429, b"slow down", {}), (404, b"gone", {})])
    tally = send_one(hook_section({"url": r.url("/h")}))
    assert len(r.requests) == 3
    assert tally == {("webhook", "retried"): 2, ("webhook", "failed"): 1}


def test_redirects_are_not_followed(receiver):
    r = receiver(answers=[(302, b"", {"Location": "/elsewhere"})])
    tally = send_one(hook_section({"url": r.url("/h")}))
    assert [q["path"] for q in r.requests] == ["/h"]
    assert tally == {("webhook", "failed"): 1}


def test_environment_proxies_are_ignored(receiver, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://{LOOPBACK}:9")  # discard: nothing answers there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    r = receiver()
    assert send_one(hook_section({"url": r.url("/h")})) == {("webhook", "sent"): 1}
    assert len(r.requests) == 1


def test_a_receiver_that_never_answers_times_out():
    """It accepts and reads, never answers: each attempt ends at the webhook's timeout."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        section = hook_section(
            {"url": f"http://{LOOPBACK}:{port}/h", "timeout": "200ms"}, retry={"attempts": 2}
        )
        tally = send_one(section)
    assert tally == {("webhook", "retried"): 1, ("webhook", "failed"): 1}


def test_logs_name_neither_the_token_nor_the_secret_nor_the_message(tmp_path, receiver, caplog):
    r = receiver(answers=[(500, b"oops", {})] * 2)
    (tmp_path / "hook.url").write_text(r.url("/robot/send?access_token=tok-SECRET-1"))
    (tmp_path / "hook.key").write_text("SEC-SECRET-2\n")
    section = hook_section(
        {"kind": "dingtalk", "url_file": "hook.url", "secret_file": "hook.key"},
        retry={"attempts": 2},
    )
    with caplog.at_level(logging.DEBUG, logger="egress_guard"):
        tally = send_one(section, base_dir=tmp_path)
        port = free_port()  # and a refused connection
        (tmp_path / "hook.url").write_text(f"http://{LOOPBACK}:{port}/s?access_token=tok-SECRET-3")
        send_one(section, base_dir=tmp_path)
    assert tally == {("webhook", "retried"): 1, ("webhook", "failed"): 1}
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "notification failed" in text and "HTTP 500" in text
    for secret in ("tok-SECRET", "SEC-SECRET", "access_token", "sign=", "签好的合同"):
        assert secret not in text
