"""Notifications in process: the policy section's spec and secret files, the bilingual messages
built from plain fields only, each webhook's JSON shape, the DingTalk and generic signatures
against vectors computed with openssl from the specs, and the Notifier's queue, retries and
backoff under a fake clock (nothing here sleeps), drops and failures that never reach the
caller."""

from __future__ import annotations

import collections
import email
import email.policy
import json
import threading

import pytest
from pydantic import ValidationError

from egress_guard import metrics
from egress_guard.notify import (
    KINDS,
    Credentials,
    ExceptionNotice,
    NotificationsSpec,
    Notifier,
    NotifyConfigError,
    PermanentError,
    RequesterSpec,
    TransientError,
    build_email,
    build_message,
    check_notice,
    dingtalk_sign,
    dingtalk_signed_url,
    format_time,
    generic_signature,
    load_credentials,
    plain,
    requester_address,
    webhook_payload,
)

T0 = 1_800_000_000_000  # ms
DAY = 86_400_000
WAIT = 5.0  # seconds a test waits at most for the worker (it never needs that long)

SMTP = {"host": "smtp.corp.example", "from": "Egress Guard <egress-guard@corp.example>"}


def spec(**over) -> NotificationsSpec:
    base = {
        "console_url": "https://gw.corp.example:8443/",
        "status_url": "http://egress-guard.invalid/exceptions",
        "timezone": "Asia/Shanghai",
        "smtp": SMTP,
        "approvers": {"email": ["wang.fang@corp.example", "zhao.lei@corp.example"]},
        "requester": {"email_domain": "corp.example"},
    }
    base.update(over)
    return NotificationsSpec.model_validate(base)


def webhook_only(**over) -> NotificationsSpec:
    return spec(
        webhook={"url": "https://hooks.corp.example/eg"}, smtp=None, approvers={}, requester={}
    ).model_copy(update=over)


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
        "reason": "Send the signed contract to a customer",
        "start_ms": T0,
        "expiry_ms": T0 + 7 * DAY,
        "ts_ms": T0,
    }
    fields.update(over)
    return ExceptionNotice(kind, **fields)


# --- the spec ------------------------------------------------------------------------------


def test_spec_defaults():
    s = NotificationsSpec.model_validate({})
    assert s.enabled and s.smtp is None and s.webhook is None
    assert s.timezone == "UTC" and s.queue_size == 1000
    assert (s.retry.attempts, s.retry.first_delay, s.retry.max_delay) == (5, 40.0, 600.0)
    assert s.approvers.webhook is True and s.requester.webhook is False
    smtp = NotificationsSpec.model_validate({"smtp": SMTP}).smtp
    assert (smtp.port, smtp.security, smtp.timeout) == (587, "starttls", 10.0)
    assert smtp.sender == SMTP["from"]


def test_spec_durations():
    s = NotificationsSpec.model_validate(
        {"retry": {"first_delay": "500ms", "max_delay": "5m"}, "smtp": {**SMTP, "timeout": 3}}
    )
    assert (s.retry.first_delay, s.retry.max_delay, s.smtp.timeout) == (0.5, 300.0, 3.0)


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"smtp": {**SMTP, "password": "hunter2"}}, "Extra inputs"),
        ({"smtp": {**SMTP, "username": "eg"}}, "username and password_file go together"),
        (
            {"smtp": {**SMTP, "security": "none", "username": "eg", "password_file": "p"}},
            "in clear",
        ),
        ({"smtp": {**SMTP, "host": "smtp://x"}}, "not a host name"),
        ({"smtp": {**SMTP, "from": "nobody"}}, "not an e-mail address"),
        ({"approvers": {"email": ["wang.fang@corp.example"]}}, "need an smtp section"),
        ({"webhook": {"kind": "wecom", "url": "https://qyapi.example/send?key=abc"}}, "url_file"),
        ({"webhook": {"url": "ftp://hooks.corp.example/x"}}, "only http and https"),
        ({"webhook": {"url": "https://u:pw@hooks.corp.example/x"}}, "no user or password"),
        ({"webhook": {"url": "https://hooks.corp.example/x", "url_file": "u"}}, "one of them"),
        ({"webhook": {"kind": "slack", "url_file": "u", "secret_file": "s"}}, "no signing"),
        ({"webhook": {"url_file": "u", "proxy": "socks5://127.0.0.1:1080"}}, "only http"),
        ({"timezone": "Mars/Olympus"}, "not a time zone"),
        ({"console_url": "javascript:alert(1)"}, "only http and https"),
        ({"retry": {"attempts": 0}}, "greater than or equal to 1"),
        ({"retry": {"first_delay": "-1s"}}, "not a duration"),
    ],
)
def test_spec_refuses(section, says):
    with pytest.raises(ValidationError) as info:
        NotificationsSpec.model_validate(section)
    assert says in str(info.value)


@pytest.mark.parametrize(
    "webhook",
    [
        {"url": "gopher://h/TOKEN-xyz"},
        {"kind": "wecom", "url": "https://qyapi.example/send?key=TOKEN-xyz"},
        {"url_file": "u", "proxy": "ftp://TOKEN-xyz@proxy"},
    ],
)
def test_spec_errors_never_repeat_a_webhook_url(webhook):
    """The policy loader reports each error's msg (with file:line): none repeats the URL."""
    with pytest.raises(ValidationError) as info:
        NotificationsSpec.model_validate({"webhook": webhook})
    messages = " ".join(e["msg"] for e in info.value.errors())
    assert messages and "TOKEN" not in messages


def test_credentials_read_from_files_relative_to_the_policy(tmp_path):
    (tmp_path / "smtp.pw").write_text("s3cret-pw\n", encoding="utf-8")
    (tmp_path / "hook.url").write_text("https://oapi.example/robot/send?access_token=TKN\n")
    (tmp_path / "hook.key").write_text("  SECabc  \n")
    s = spec(
        smtp={**SMTP, "username": "eg", "password_file": "smtp.pw"},
        webhook={"kind": "dingtalk", "url_file": "hook.url", "secret_file": "hook.key"},
    )
    creds = load_credentials(s, tmp_path)
    assert creds == Credentials(
        "s3cret-pw", "https://oapi.example/robot/send?access_token=TKN", "SECabc"
    )
    assert "s3cret" not in repr(creds) and "TKN" not in repr(creds)


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot be read"), ("", "empty"), ("ftp://h/TOKEN-xyz", "only http and https")],
)
def test_credentials_errors_name_the_file_not_the_secret(tmp_path, content, says):
    if content is not None:
        (tmp_path / "hook.url").write_text(content)
    s = spec(webhook={"kind": "wecom", "url_file": "hook.url"})
    with pytest.raises(NotifyConfigError) as info:
        load_credentials(s, tmp_path)
    assert says in str(info.value) and "hook.url" in str(info.value)
    assert "TOKEN" not in str(info.value)


# --- messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_is_bilingual(kind):
    m = build_message(notice(kind, actor="wang.fang"), spec())
    words = KINDS[kind]
    assert m.text.splitlines()[:2] == [words.zh, words.en]
    assert words.short_zh in m.title and words.short_en in m.title
    assert "ex-0123456789ab" in m.title and "mail.qq.com" in m.title
    assert "编号 / ID: ex-0123456789ab" in m.text
    assert "目标 / Target: mail.qq.com" in m.text


def test_pending_tells_approvers_what_and_links_the_console():
    m = build_message(notice(approvals_needed=2, approvals_given=1), spec())
    lines = m.text.splitlines()
    for line in [
        "申请人 / Requested by: li.na",
        "适用于 / For: user:li.na",
        "控制 / Control: block",
        "类别 / Category: webmail",
        "规则 / Rule: webmail.qq",
        "被拦截的请求 / Blocked request: 7f3c9a",
        "期限 / Duration: 7d",
        "到期 / Expires: 2027-01-22 16:00 UTC+08:00",  # T0 + 7d in Asia/Shanghai
        "审批进度 / Approvals: 1 / 2",
        "申请理由 / Reason: Send the signed contract to a customer",
        "https://gw.corp.example:8443/exceptions/ex-0123456789ab",
    ]:
        assert line in lines
    assert m.link == "https://gw.corp.example:8443/exceptions/ex-0123456789ab"


def test_decisions_link_the_requesters_status_page_and_name_the_decider():
    m = build_message(notice("denied", actor="wang.fang", reason="Use the file share"), spec())
    assert "拒绝人 / Denied by: wang.fang" in m.text
    assert "说明 / Reason: Use the file share" in m.text
    assert m.link == "http://egress-guard.invalid/exceptions"
    assert "Review it in the console" not in m.text


TOKEN_FIELDS = [
    *("requester", "subject", "control", "target", "category", "rule_id", "request_id"),
    *("grant", "reason", "actor"),
]


def test_a_message_holds_only_the_notice_fields_and_fixed_text():
    """Give every field a unique token: what is left of the text once the tokens (and the
    times) are taken out is the fixed template, the same whatever the values — there is
    nowhere for anything else (a body, a marker's text) to come from."""

    def stripped(n: ExceptionNotice) -> str:
        text = build_message(n, spec()).text
        for name in ["exception_id", *TOKEN_FIELDS]:
            text = text.replace(getattr(n, name), f"<{name}>")
        for ms in (n.expiry_ms, n.ts_ms):
            text = text.replace(format_time(ms, "Asia/Shanghai"), "<time>")
        return text

    def tokens(prefix: str) -> dict:
        return {k: f"{prefix}{i}{k.upper()}" for i, k in enumerate(TOKEN_FIELDS)}

    a = stripped(notice("approved", exception_id="ex-aaa", **tokens("AA")))
    b = stripped(notice("approved", exception_id="ex-bbb", **tokens("ZZ")))
    assert a == b
    assert "AA" not in a and "ZZ" not in b


def test_typed_text_cannot_forge_lines_or_headers():
    evil = "ok\r\nBcc: all@corp.example\n\u202eevil\x00 " + "x" * 2000
    m = build_message(notice(reason=evil, target="mail.qq.com\nSubject: hi"), spec())
    assert "\r" not in m.title and "\n" not in m.title
    reason = [line for line in m.text.splitlines() if line.startswith("申请理由")]
    assert len(reason) == 1 and "\u202e" not in reason[0] and "\x00" not in reason[0]
    assert "ok Bcc: all@corp.example evil" in reason[0]
    assert len(reason[0]) < 600 and reason[0].endswith("…")
    assert not any(line.startswith(("Bcc:", "Subject:")) for line in m.text.splitlines())


def test_plain():
    assert plain("a\n\tb\u2028c\u200bd") == "a b c d"
    assert plain("abcdef", 4) == "abc…"


@pytest.mark.parametrize(
    "bad",
    [
        ExceptionNotice("pending", "ex-1", reason=b"a body"),  # type: ignore[arg-type]
        ExceptionNotice("pending", "ex-1", target=object()),  # type: ignore[arg-type]
        ExceptionNotice("pending", "ex-1", expiry_ms="tomorrow"),  # type: ignore[arg-type]
        ExceptionNotice("pending", "ex-1", expiry_ms=True),  # type: ignore[arg-type]
        ExceptionNotice("opened", "ex-1"),  # type: ignore[arg-type]
        ExceptionNotice("pending", " \n"),
        "pending ex-1",
    ],
)
def test_only_plain_notices_are_built(bad):
    with pytest.raises((TypeError, ValueError)):
        check_notice(bad)
    with pytest.raises((TypeError, ValueError)):
        build_message(bad, spec())


def test_times_read_in_the_policys_zone():
    assert format_time(T0, "UTC") == "2027-01-15 08:00 UTC+00:00"
    assert format_time(T0, "Asia/Shanghai") == "2027-01-15 16:00 UTC+08:00"
    assert format_time(T0, "America/St_Johns") == "2027-01-15 04:30 UTC-03:30"


@pytest.mark.parametrize(
    ("requester", "explicit", "domain", "address"),
    [
        ("li.na", "", "corp.example", "li.na@corp.example"),
        ("CORP\\li.na", "", "corp.example", "li.na@corp.example"),
        ("li.na@sub.corp.example", "", None, "li.na@sub.corp.example"),
        ("li.na", "na.li@corp.example", "corp.example", "na.li@corp.example"),
        ("li.na", "", None, ""),
        ("li na", "", "corp.example", ""),
        ("", "", "corp.example", ""),
        ("li.na\n@x", "", "corp.example", ""),
    ],
)
def test_requester_address(requester, explicit, domain, address):
    n = notice("approved", requester=requester, requester_email=explicit)
    assert requester_address(n, RequesterSpec(email_domain=domain)) == address


def test_email_headers_and_body_decode():
    s = spec()
    m = build_message(notice(), s)
    msg = build_email(m, s.smtp, ("wang.fang@corp.example",), T0 / 1000, "ex-0123456789ab")
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == m.title
    assert parsed["From"] == "Egress Guard <egress-guard@corp.example>"
    assert parsed["To"] == "wang.fang@corp.example"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["X-Egress-Guard-Exception"] == "ex-0123456789ab"
    assert parsed["Message-ID"].endswith("@corp.example>")
    assert parsed["Date"] == "Fri, 15 Jan 2027 08:00:00 +0000"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content().replace("\r\n", "\n").strip() == m.text  # CRLF on the wire
    assert all(ord(ch) < 128 for ch in msg.as_string())  # 7-bit safe on the wire


# --- webhook shapes and signatures ----------------------------------------------------------


def test_wecom_and_dingtalk_take_text_messages():
    m = build_message(notice(), spec())
    for kind in ("wecom", "dingtalk"):
        body = webhook_payload(kind, m)
        assert body == {"msgtype": "text", "text": {"content": f"{m.title}\n\n{m.text}"}}


def test_wecom_text_is_cut_to_its_2048_bytes():
    m = build_message(notice(reason="长" * 500), spec())
    content = webhook_payload("wecom", m)["text"]["content"]
    assert len(content.encode()) <= 2048 and content.endswith("…")
    assert content.startswith(m.title)


def test_slack_text_escapes_its_control_sequences():
    m = build_message(notice(reason="see <!channel> & <http://x|y>"), spec())
    body = webhook_payload("slack", m)
    assert list(body) == ["text"]
    assert "see &lt;!channel&gt; &amp; &lt;http://x|y&gt;" in body["text"]
    assert "<!channel>" not in body["text"]


def test_generic_has_the_event_and_the_exception_fields():
    m = build_message(notice("approved", actor="wang.fang"), spec())
    body = webhook_payload("generic", m)
    assert body["event"] == "exception.approved"
    assert body["title"] == m.title and body["link"] == "http://egress-guard.invalid/exceptions"
    assert body["text"] == f"{m.title}\n\n{m.text}"
    ex = body["exception"]
    assert ex["id"] == "ex-0123456789ab" and ex["actor"] == "wang.fang"
    assert ex["target"] == "mail.qq.com" and ex["control"] == "block"
    assert ex["start"] == "2027-01-15T08:00:00Z" and ex["expiry"] == "2027-01-22T08:00:00Z"
    json.dumps(body)  # serializable as it stands


def test_dingtalk_signature_vector():
    """Computed from DingTalk's robot signing steps with openssl:
    printf '1700000000000\\nSECtest0123456789' |
      openssl dgst -sha256 -hmac SECtest0123456789 -binary | base64
    → yBKp5IlG6qCzcQWmgyRK/ziJBdVNJmHfFE2ST/CzT/g=, then URL-encoded."""
    expected = "yBKp5IlG6qCzcQWmgyRK%2FziJBdVNJmHfFE2ST%2FCzT%2Fg%3D"
    assert dingtalk_sign("SECtest0123456789", 1_700_000_000_000) == expected
    url = "https://oapi.example/robot/send?access_token=T"
    assert dingtalk_signed_url(url, "SECtest0123456789", 1_700_000_000_000) == (
        f"{url}&timestamp=1700000000000&sign={expected}"
    )
    assert dingtalk_signed_url("https://h/p", "SECtest0123456789", 1_700_000_000_000).startswith(
        "https://h/p?timestamp=1700000000000&sign="
    )


def test_generic_signature_vector():
    """printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac k3y -hex"""
    assert generic_signature("k3y", 1_700_000_000, b'{"a":1}') == (
        "sha256=fd5a70e965043f7df6309c2c3b5ff5a8ffa99b1f5175e9a311459e73c4634d4a"
    )


# --- the notifier --------------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds that move only when the worker sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()

    def __call__(self, channel: str, outcome: str) -> None:
        self.counts[(channel, outcome)] += 1


class FakeSender:
    """Fails with the errors given, one per attempt, then succeeds; records what it got and
    when (on the fake clock)."""

    def __init__(self, channel, clock, errors=()):
        self.channel = channel
        self.clock = clock
        self.errors = list(errors)
        self.attempts: list[float] = []
        self.sent: list = []

    def send(self, payload):
        self.attempts.append(self.clock())
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append(payload)


def make(s=None, errors=(), webhook_errors=(), **kw):
    clock, tally = FakeClock(), Tally()
    mail = FakeSender("email", clock, errors)
    hook = FakeSender("webhook", clock, webhook_errors)
    n = Notifier(
        s or spec(),
        count=tally,
        senders={"email": mail, "webhook": hook},
        clock=clock,
        sleep=clock.sleep,
        wall=lambda: T0 / 1000,
        **kw,
    )
    return n, clock, tally, mail, hook


def test_pending_goes_to_the_approvers_by_mail_and_webhook():
    n, _clock, tally, mail, hook = make()
    n.submit(notice())
    assert n.wait_idle(WAIT)
    (msg,) = mail.sent
    assert msg["To"] == "wang.fang@corp.example, zhao.lei@corp.example"
    (body,) = hook.sent
    assert json.loads(body)["event"] == "exception.pending"
    assert tally.counts == {("email", "sent"): 1, ("webhook", "sent"): 1}
    assert n.close(WAIT)


def test_decisions_go_to_the_requester_and_the_chat_only_when_asked():
    n, _clock, tally, mail, hook = make()
    n.submit(notice("approved", actor="wang.fang"))
    assert n.wait_idle(WAIT)
    assert [m["To"] for m in mail.sent] == ["li.na@corp.example"] and hook.sent == []
    n.close(WAIT)
    n, _clock, tally, mail, hook = make(webhook_only(requester=RequesterSpec(webhook=True)))
    n.submit(notice("revoked"))
    assert n.wait_idle(WAIT)
    assert mail.sent == [] and len(hook.sent) == 1
    assert tally.counts == {("webhook", "sent"): 1}
    n.close(WAIT)


def test_no_recipient_queues_nothing():
    n, _clock, tally, mail, hook = make(spec(requester={}))  # no domain: no address
    n.submit(notice("denied"))
    assert n.wait_idle(WAIT)
    assert mail.attempts == [] and hook.attempts == [] and not tally.counts
    n.close(WAIT)


def test_retries_back_off_exponentially_then_deliver():
    n, clock, tally, mail, _hook = make(errors=[TransientError("refused"), OSError("timeout")])
    n.submit(notice("approved"))
    assert n.wait_idle(WAIT)
    assert mail.attempts == [0.0, 40.0, 120.0]
    assert clock.sleeps == [40.0, 80.0]
    assert len(mail.sent) == 1
    assert tally.counts == {("email", "retried"): 2, ("email", "sent"): 1}
    n.close(WAIT)


def test_attempts_are_bounded():
    errors = [TransientError("down")] * 10
    n, clock, tally, mail, _hook = make(errors=errors)
    n.submit(notice("approved"))
    assert n.wait_idle(WAIT)
    assert mail.attempts == [0.0, 40.0, 120.0, 280.0, 600.0]  # 5 attempts over 10 minutes
    assert clock.sleeps == [40.0, 80.0, 160.0, 320.0]
    assert tally.counts == {("email", "retried"): 4, ("email", "failed"): 1}
    n.close(WAIT)


def test_delay_is_capped():
    s = spec(retry={"attempts": 4, "first_delay": "1m", "max_delay": "90s"})
    n, clock, _tally, _mail, _hook = make(s, errors=[TransientError("down")] * 4)
    n.submit(notice("approved"))
    assert n.wait_idle(WAIT)
    assert clock.sleeps == [60.0, 90.0, 90.0]
    n.close(WAIT)


def test_a_permanent_refusal_is_not_retried():
    n, clock, tally, mail, _hook = make(errors=[PermanentError("550 no such user")])
    n.submit(notice("approved"))
    assert n.wait_idle(WAIT)
    assert mail.attempts == [0.0] and clock.sleeps == []
    assert tally.counts == {("email", "failed"): 1}
    n.close(WAIT)


def test_channels_retry_independently():
    n, _clock, tally, mail, hook = make(webhook_errors=[TransientError("429")])
    n.submit(notice())
    assert n.wait_idle(WAIT)
    assert mail.attempts == [0.0] and hook.attempts == [0.0, 40.0]
    assert tally.counts == {("email", "sent"): 1, ("webhook", "retried"): 1, ("webhook", "sent"): 1}
    n.close(WAIT)


class BlockingSender:
    """Holds the worker inside its first send until released."""

    channel = "email"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sent: list = []

    def send(self, payload):
        self.entered.set()
        assert self.release.wait(WAIT)
        self.sent.append(payload)


def test_a_full_queue_drops_and_counts_and_never_blocks_the_caller():
    clock, tally, sender = FakeClock(), Tally(), BlockingSender()
    depths: list[int] = []
    n = Notifier(
        spec(queue_size=2, webhook=None),
        count=tally,
        depth=depths.append,
        senders={"email": sender},
        clock=clock,
        sleep=clock.sleep,
    )
    n.submit(notice("approved", exception_id="ex-1"))
    assert sender.entered.wait(WAIT)  # the worker holds ex-1; the queue is empty again
    for i in (2, 3, 4):
        n.submit(notice("approved", exception_id=f"ex-{i}"))  # returns though the worker waits
    assert tally.counts == {("email", "dropped"): 1}
    assert max(depths) == 2
    sender.release.set()
    assert n.wait_idle(WAIT)
    assert [m["X-Egress-Guard-Exception"] for m in sender.sent] == ["ex-1", "ex-2", "ex-3"]
    assert tally.counts == {("email", "dropped"): 1, ("email", "sent"): 3}
    assert depths[-1] == 0
    n.close(WAIT)


class Exploding:
    channel = "email"

    def __init__(self) -> None:
        self.calls = 0

    def send(self, payload):
        self.calls += 1
        raise RuntimeError("a bug in a sender")


def test_a_failing_sender_never_raises_into_submit():
    clock, tally, sender = FakeClock(), Tally(), Exploding()
    n = Notifier(spec(), count=tally, senders={"email": sender}, clock=clock, sleep=clock.sleep)
    n.submit(notice("approved"))  # would raise here if the worker's errors leaked
    assert n.wait_idle(WAIT)
    assert sender.calls == 5
    assert tally.counts == {("email", "retried"): 4, ("email", "failed"): 1}
    n.submit(notice("approved"))  # the worker is still alive
    assert n.wait_idle(WAIT) and sender.calls == 10
    n.close(WAIT)


@pytest.mark.parametrize(
    "bad",
    [
        ExceptionNotice("pending", "ex-1", reason=b"\x89PNG"),  # type: ignore[arg-type]
        ExceptionNotice("nonsense", "ex-1"),  # type: ignore[arg-type]
        ExceptionNotice("approved", "ex-1", expiry_ms=True),  # type: ignore[arg-type]
        None,
    ],
)
def test_a_notice_that_cannot_be_built_is_dropped_not_raised(bad):
    n, _clock, tally, mail, hook = make()
    n.submit(bad)
    assert n.wait_idle(WAIT)
    assert mail.attempts == [] and hook.attempts == []
    assert tally.counts == {("email", "dropped"): 1, ("webhook", "dropped"): 1}
    n.close(WAIT)


def test_broken_metrics_hooks_do_not_stop_delivery():
    clock = FakeClock()
    mail = FakeSender("email", clock)

    def count(channel, outcome):
        raise ValueError("registry gone")

    def depth(n):
        raise ValueError("registry gone")

    n = Notifier(
        spec(), count=count, depth=depth, senders={"email": mail}, clock=clock, sleep=clock.sleep
    )
    n.submit(notice("approved"))
    n.submit(notice("denied"))
    assert n.wait_idle(WAIT) and len(mail.sent) == 2
    n.close(WAIT)


class Gate:
    """A sleep that holds the worker in its first backoff until the test lets it go."""

    def __init__(self) -> None:
        self.asleep = threading.Event()
        self.go = threading.Event()

    def __call__(self, seconds):
        self.asleep.set()
        assert self.go.wait(WAIT)


def close_during_backoff(errors):
    gate, tally, clock = Gate(), Tally(), FakeClock()
    mail = FakeSender("email", clock, errors)
    n = Notifier(spec(), count=tally, senders={"email": mail}, clock=clock, sleep=gate)
    n.submit(notice("approved"))
    assert gate.asleep.wait(WAIT)  # attempt 1 failed; the retry is 40s away
    closed: list[bool] = []
    closer = threading.Thread(target=lambda: closed.append(n.close(WAIT)))
    closer.start()
    gate.go.set()
    closer.join(WAIT)
    assert closed == [True]
    return n, tally, mail


def test_close_flushes_what_waits_for_a_retry():
    _n, tally, mail = close_during_backoff([TransientError("down")])
    assert mail.attempts == [0.0, 0.0] and len(mail.sent) == 1  # tried again at once
    assert tally.counts == {("email", "retried"): 1, ("email", "sent"): 1}


def test_close_gives_up_on_what_still_fails_and_drops_later_submits():
    n, tally, mail = close_during_backoff([TransientError("down")] * 3)
    assert mail.attempts == [0.0, 0.0]  # one last attempt, no more retries
    assert tally.counts == {("email", "retried"): 1, ("email", "failed"): 1}
    n.submit(notice("denied"))
    assert tally.counts[("email", "dropped")] == 1 and len(mail.attempts) == 2


def test_a_disabled_or_absent_section_sends_nothing():
    for s in (None, spec(enabled=False)):
        tally = Tally()
        mail = FakeSender("email", FakeClock())
        n = Notifier(s, count=tally, senders={"email": mail})
        n.submit(notice())
        assert n.close(WAIT) and mail.attempts == [] and not tally.counts
        assert n.channels == ()


def test_the_metrics_hook_counts_into_the_prometheus_counter():
    def value(outcome):
        return (
            metrics.REGISTRY.get_sample_value(
                "egress_guard_notifications_total", {"channel": "webhook", "outcome": outcome}
            )
            or 0.0
        )

    before = {o: value(o) for o in ("sent", "retried", "failed", "dropped")}
    clock = FakeClock()
    hook = FakeSender("webhook", clock, [TransientError("x")])
    n = Notifier(
        webhook_only(),
        count=metrics.count_notification,
        depth=metrics.NOTIFICATION_QUEUE_DEPTH.set,
        senders={"webhook": hook},
        clock=clock,
        sleep=clock.sleep,
    )
    n.submit(notice())
    assert n.wait_idle(WAIT)
    n.close(WAIT)
    n.submit(notice())
    after = {o: value(o) for o in before}
    assert {o: after[o] - before[o] for o in before} == {
        "sent": 1,
        "retried": 1,
        "failed": 0,
        "dropped": 1,
    }
    assert metrics.REGISTRY.get_sample_value("egress_guard_notification_queue_depth") == 0
