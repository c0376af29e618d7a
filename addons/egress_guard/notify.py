"""Notify: the exception workflow's notifications — the policy's ``notifications:`` section (a
strict pydantic spec; secrets only ever named by file), the bilingual (zh/en) messages built from
plain fields, the senders (SMTP; a JSON webhook in the generic, WeCom, DingTalk or Slack shape)
and the ``Notifier``: a bounded queue and one daemon worker that sends with bounded, backed-off
retries and never raises into, or waits on behalf of, the workflow that submits.

A leaf below every layer: it imports the standard library and pydantic only, so the policy loader
in ``core`` may use its spec. Outcomes are counted through the ``count`` hook the runtime passes
(``metrics.count_notification``), which keeps the import graph one-way.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, tzinfo
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, make_msgid, parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

log = logging.getLogger("egress_guard.notify")

Channel = Literal["email", "webhook"]
Outcome = Literal["sent", "retried", "failed", "dropped"]
NoticeKind = Literal[
    "pending", "approved", "granted", "denied", "revoked", "expired", "request_expired"
]
CONSOLE_EXCEPTION_PATH = "/exceptions/{id}"  # the console's page for one exception
MAX_SECRET_FILE = 64 * 1024
MAX_REASON = 500  # characters of a reason in a message: enough to decide, short for a chat
MAX_FIELD = 200
WECOM_TEXT_BYTES = 2048  # WeCom refuses longer text content
DINGTALK_TEXT_BYTES = 18000  # DingTalk's limit is about 20000 bytes
RESPONSE_BYTES = 64 * 1024  # what is read of a webhook's answer (WeCom/DingTalk say errcode)


# --- the policy section --------------------------------------------------------------------


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*$")
_HOST = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?$")


def _seconds(value: Any) -> float:
    """``10s``, ``5m``, ``500ms`` or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a duration (examples: 10s, 5m, 500ms)")
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration (examples: 10s, 5m, 500ms)")
        value = float(m.group(1)) * _DURATION_SECONDS[m.group(2)]
    if value <= 0:
        raise ValueError("a duration is longer than zero")
    return float(value)


def _address(value: Any) -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value) or len(value) > 254:
        raise ValueError(f"{value!r} is not an e-mail address (name@corp.example)")
    return value


def _sender(value: Any) -> str:
    """``egress-guard@corp.example`` or ``Egress Guard <egress-guard@corp.example>``."""
    if not isinstance(value, str) or "\n" in value or "\r" in value:
        raise ValueError(f"{value!r} is not a sender address")
    _name, addr = parseaddr(value)
    _address(addr)
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("name the SMTP server's host")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOST.match(value) or len(value) > 253:
        raise ValueError(f"{value!r} is not a host name (smtp.corp.example, no scheme, no port)")
    return value


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not _DOMAIN.match(value):
        raise ValueError(f"{value!r} is not a mail domain (corp.example)")
    return value


def _zone(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a time zone (UTC, Asia/Shanghai)")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a time zone (UTC, Asia/Shanghai)") from None
    return value


def check_http_url(url: str, what: str) -> str:
    """An http(s) URL with a host and no credentials; the error never repeats the URL, which
    may hold a token (WeCom's key, DingTalk's access_token, Slack's path)."""
    try:
        parts = urllib.parse.urlsplit(url)
        _port = parts.port  # raises on a malformed port
    except ValueError:
        raise ValueError(f"{what}: not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{what}: only http and https URLs are allowed")
    if not parts.hostname:
        raise ValueError(f"{what}: the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what}: no user or password in the URL (a secret inline in the policy)")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError(f"{what}: the URL holds spaces or control characters")
    return url


def _link_base(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("give an http(s) URL")
    return check_http_url(value, "link").rstrip("/")


Seconds = Annotated[float, BeforeValidator(_seconds)]
Address = Annotated[str, BeforeValidator(_address)]
SenderAddress = Annotated[str, BeforeValidator(_sender)]
HostName = Annotated[str, BeforeValidator(_host)]
MailDomain = Annotated[str, BeforeValidator(_domain)]
ZoneName = Annotated[str, BeforeValidator(_zone)]
LinkBase = Annotated[str, BeforeValidator(_link_base)]
FilePath = Annotated[str, Field(min_length=1, max_length=4096)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SmtpSpec(_Strict):
    """The mail relay. The password is read from ``password_file``, never written here."""

    host: HostName
    port: int = Field(default=587, ge=1, le=65535)
    # starttls: upgrade a plain connection (port 587); tls: TLS from the start (port 465);
    # none: plain (a relay on the same host or a trusted segment, and then no login).
    security: Literal["starttls", "tls", "none"] = "starttls"
    ca_file: FilePath | None = None  # PEM bundle for a private CA; unset: the system's
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password_file: FilePath | None = None
    sender: SenderAddress = Field(alias="from")
    helo_name: HostName | None = None  # unset: this host's name (no DNS lookup)
    timeout: Seconds = 10.0

    @model_validator(mode="after")
    def _login(self) -> SmtpSpec:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        if self.username is not None and self.security == "none":
            raise ValueError(
                "a login needs security starttls or tls: the password would cross "
                "the network in clear"
            )
        return self


class WebhookSpec(_Strict):
    """A chat bot or any JSON receiver. WeCom, DingTalk and Slack webhook URLs carry their
    token, so for them the URL is read from ``url_file``; a generic receiver's URL may be
    written here and its requests signed with ``secret_file``."""

    kind: Literal["generic", "wecom", "dingtalk", "slack"] = "generic"
    url: str | None = None
    url_file: FilePath | None = None
    # dingtalk: the robot's signing secret (SEC...); generic: the HMAC-SHA256 key of the
    # X-Egress-Guard-Signature header. WeCom and Slack have no such secret.
    secret_file: FilePath | None = None
    ca_file: FilePath | None = None
    proxy: str | None = None  # an http(s) proxy URL; unset: direct (environment proxies ignored)
    timeout: Seconds = 10.0

    @model_validator(mode="after")
    def _where(self) -> WebhookSpec:
        if (self.url is None) == (self.url_file is None):
            raise ValueError("give url or url_file (one of them)")
        if self.url is not None:
            if self.kind != "generic":
                raise ValueError(
                    f"a {self.kind} webhook URL holds its token: put it in a file named by url_file"
                )
            check_http_url(self.url, "webhook.url")
        if self.secret_file is not None and self.kind in ("wecom", "slack"):
            raise ValueError(f"a {self.kind} webhook has no signing secret")
        if self.proxy is not None:
            check_http_url(self.proxy, "webhook.proxy")
        return self


class ApproversSpec(_Strict):
    """Who hears of a new pending request."""

    email: tuple[Address, ...] = ()
    webhook: bool = True  # post it to the webhook, when one is configured


class RequesterSpec(_Strict):
    """How the employee hears of the decision: by e-mail at ``user@email_domain`` (a user name
    that is already an address is used as it is), and optionally in the webhook's chat."""

    email_domain: MailDomain | None = None
    webhook: bool = False  # decisions in the approvers' chat too


class RetrySpec(_Strict):
    """Attempts per message, the first retry after ``first_delay``, each next one after twice
    the last (at most ``max_delay``): 5 attempts from 40s are 40s, 80s, 160s, 320s apart, the
    last about 10 minutes after the first."""

    attempts: int = Field(default=5, ge=1, le=20)
    first_delay: Seconds = 40.0
    max_delay: Seconds = 600.0


class NotificationsSpec(_Strict):
    """The ``notifications:`` section of the policy."""

    enabled: bool = True
    console_url: LinkBase | None = None  # approvers' link: {console_url}/exceptions/{id}
    status_url: LinkBase | None = None  # requesters' link: their status page
    timezone: ZoneName = "UTC"  # how times read in messages
    smtp: SmtpSpec | None = None
    webhook: WebhookSpec | None = None
    approvers: ApproversSpec = ApproversSpec()
    requester: RequesterSpec = RequesterSpec()
    retry: RetrySpec = RetrySpec()
    queue_size: int = Field(default=1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _mail(self) -> NotificationsSpec:
        if self.smtp is None and (self.approvers.email or self.requester.email_domain):
            raise ValueError("e-mail recipients need an smtp section")
        return self


# --- secrets -------------------------------------------------------------------------------


class NotifyConfigError(ValueError):
    """A secret file that cannot be used; the message names the file, never its content."""


@dataclass(frozen=True)
class Credentials:
    smtp_password: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None

    def __repr__(self) -> str:  # never print a secret by accident
        return "Credentials(...)"


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else base_dir / p


def read_secret(path: str, what: str, base_dir: Path | None = None) -> str:
    """The first line of a secret file, without surrounding white space."""
    where = _resolve(path, base_dir)
    try:
        with where.open("rb") as f:
            raw = f.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise NotifyConfigError(f"{what} {where}: cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_SECRET_FILE:
        raise NotifyConfigError(f"{what} {where}: larger than {MAX_SECRET_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotifyConfigError(f"{what} {where}: not UTF-8 text") from None
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise NotifyConfigError(f"{what} {where}: empty")
    return lines[0].strip()


def load_credentials(spec: NotificationsSpec, base_dir: Path | None = None) -> Credentials:
    """Read the secret files the spec names (relative paths: from ``base_dir``, the policy
    directory). Raises ``NotifyConfigError``; call it when the policy loads, not per message."""
    password = url = secret = None
    if spec.smtp is not None and spec.smtp.password_file is not None:
        password = read_secret(spec.smtp.password_file, "smtp.password_file", base_dir)
    if spec.webhook is not None:
        url = spec.webhook.url
        if spec.webhook.url_file is not None:
            url = read_secret(spec.webhook.url_file, "webhook.url_file", base_dir)
            where = _resolve(spec.webhook.url_file, base_dir)
            try:
                check_http_url(url, f"webhook.url_file {where}")
            except ValueError as exc:
                raise NotifyConfigError(str(exc)) from None
        if spec.webhook.secret_file is not None:
            secret = read_secret(spec.webhook.secret_file, "webhook.secret_file", base_dir)
    return Credentials(password, url, secret)


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExceptionNotice:
    """What happened to one exception, in plain fields only (ids, names, hosts, rules, levels,
    times): a message is built from these and nothing else, so it cannot carry a body, a
    matched marker text or a request's path. Times are milliseconds since the epoch (UTC)."""

    kind: NoticeKind
    exception_id: str
    requester: str = ""  # the employee who asked; for a grant, the user it is for
    subject: str = ""  # str(Subject): user:li.na, group:sales, client:10.1.0.0/16
    control: str = ""  # str(Control): block, upload, marker:confidential, unscannable
    target: str = ""  # str(Target): mail.example.com, =drive.example.com/share, category webmail
    category: str = ""
    rule_id: str = ""
    request_id: str = ""  # the blocked request it came from
    grant: str = ""  # what is let through: "up to 500 MiB per request", "block → alert"
    reason: str = ""  # the requester's (pending) or the decider's (denied, revoked)
    actor: str = ""  # who decided (approved, granted, denied, revoked)
    start_ms: int = 0
    expiry_ms: int = 0  # pending: as asked; approved, granted: as decided
    approvals_needed: int = 0
    approvals_given: int = 0
    requester_email: str = ""  # the requester's address when the identity source knows it
    ts_ms: int = 0  # when it happened


@dataclass(frozen=True)
class _KindText:
    zh: str
    en: str
    short_zh: str
    short_en: str
    audience: Literal["approvers", "requester"]


KINDS: Mapping[str, _KindText] = {
    "pending": _KindText(
        "新的例外申请待审批",
        "A new exception request is waiting for approval",
        "例外申请待审批",
        "Exception request pending",
        "approvers",
    ),
    "approved": _KindText(
        "您的例外申请已批准",
        "Your exception request was approved",
        "例外申请已批准",
        "Exception approved",
        "requester",
    ),
    "granted": _KindText(
        "已为您开通例外",
        "An exception was granted to you",
        "已开通例外",
        "Exception granted",
        "requester",
    ),
    "denied": _KindText(
        "您的例外申请被拒绝",
        "Your exception request was denied",
        "例外申请被拒绝",
        "Exception denied",
        "requester",
    ),
    "revoked": _KindText(
        "您的例外已被撤销",
        "Your exception was revoked",
        "例外已撤销",
        "Exception revoked",
        "requester",
    ),
    "expired": _KindText(
        "您的例外已到期",
        "Your exception has expired",
        "例外已到期",
        "Exception expired",
        "requester",
    ),
    "request_expired": _KindText(
        "您的例外申请无人审批，已过期",
        "Your exception request expired without a decision",
        "例外申请已过期",
        "Exception request expired",
        "requester",
    ),
}

_STR_FIELDS = tuple(f.name for f in fields(ExceptionNotice) if f.type == "str")
_INT_FIELDS = tuple(f.name for f in fields(ExceptionNotice) if f.type == "int")


def check_notice(notice: object) -> ExceptionNotice:
    """The notice, if it holds only the plain values it declares (a flow, a body or a Terms
    object handed in by mistake is refused rather than turned into text)."""
    if not isinstance(notice, ExceptionNotice):
        raise TypeError(f"not an ExceptionNotice: {type(notice).__name__}")
    if notice.kind not in KINDS:
        raise ValueError(f"unknown notice kind {notice.kind!r}")
    for name in _STR_FIELDS:
        if not isinstance(getattr(notice, name), str):
            raise TypeError(f"ExceptionNotice.{name} is not a str")
    for name in _INT_FIELDS:
        value = getattr(notice, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"ExceptionNotice.{name} is not an int")
    if not plain(notice.exception_id, 64):
        raise ValueError("ExceptionNotice.exception_id is empty")
    return notice


def plain(text: str, limit: int = MAX_FIELD) -> str:
    """One line of printable text at most ``limit`` characters: line breaks, control and
    bidirectional-override characters become spaces, so a typed reason cannot forge lines or
    headers of the message it is quoted in."""
    out = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _span(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    if ms >= 3_600_000:
        return f"{ms / 3_600_000:.1f}h"
    return f"{max(1, -(-ms // 1000))}s"


@lru_cache(maxsize=16)
def _tz(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


def format_time(ms: int, zone: str = "UTC") -> str:
    """``2026-01-09 10:00 UTC+08:00``: minutes, with the offset spelled out (CST is ambiguous)."""
    when = datetime.fromtimestamp(ms / 1000, UTC).astimezone(_tz(zone))
    offset = when.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset else 0
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{when:%Y-%m-%d %H:%M} UTC{sign}{hours:02d}:{mins:02d}"


def _iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True)
class Message:
    """One notice as people read it: a bilingual title and text, the link, and the fields (as
    cleaned) for the generic webhook's JSON."""

    kind: str
    title: str
    text: str
    link: str
    fields: Mapping[str, Any]


def link_for(notice: ExceptionNotice, spec: NotificationsSpec) -> str:
    if KINDS[notice.kind].audience == "approvers":
        if spec.console_url is None:
            return ""
        path = CONSOLE_EXCEPTION_PATH.format(id=urllib.parse.quote(notice.exception_id, safe=""))
        return spec.console_url + path
    return spec.status_url or ""


def build_message(notice: ExceptionNotice, spec: NotificationsSpec) -> Message:
    """The message for a notice: Chinese first, then English, field labels in both."""
    check_notice(notice)
    words = KINDS[notice.kind]
    zone = spec.timezone
    ex_id = plain(notice.exception_id, 64)
    target = plain(notice.target)
    reason = plain(notice.reason, MAX_REASON)
    expiry = format_time(notice.expiry_ms, zone) if notice.expiry_ms else ""
    duration = ""
    if notice.start_ms and notice.expiry_ms > notice.start_ms:
        duration = _span(notice.expiry_ms - notice.start_ms)
    starts = ""  # said only of one scheduled to start later than it was decided
    if notice.start_ms and notice.ts_ms and notice.start_ms > notice.ts_ms:
        starts = format_time(notice.start_ms, zone)
    approvals = ""
    if notice.approvals_needed > 1:
        approvals = f"{notice.approvals_given} / {notice.approvals_needed}"
    reason_label = "申请理由 / Reason" if notice.kind == "pending" else "说明 / Reason"
    actor_label = {
        "approved": "批准人 / Approved by",
        "granted": "授予人 / Granted by",
        "denied": "拒绝人 / Denied by",
        "revoked": "撤销人 / Revoked by",
    }.get(notice.kind, "")
    rows = [
        ("编号 / ID", ex_id),
        ("申请人 / Requested by", plain(notice.requester)),
        ("适用于 / For", plain(notice.subject)),
        ("控制 / Control", plain(notice.control)),
        ("目标 / Target", target),
        ("类别 / Category", plain(notice.category)),
        ("规则 / Rule", plain(notice.rule_id)),
        ("被拦截的请求 / Blocked request", plain(notice.request_id, 64)),
        ("放行 / Lets through", plain(notice.grant)),
        ("开始 / Starts", starts),
        ("期限 / Duration", duration),
        ("到期 / Expires" if notice.kind != "expired" else "已于 / Ended", expiry),
        ("审批进度 / Approvals", approvals),
        ("时间 / At", format_time(notice.ts_ms, zone) if notice.ts_ms else ""),
        (actor_label, plain(notice.actor) if actor_label else ""),
        (reason_label, reason),
    ]
    lines = [words.zh, words.en, ""]
    lines += [f"{label}: {value}" for label, value in rows if value]
    link = link_for(notice, spec)
    if link:
        if words.audience == "approvers":
            lines += ["", "请在控制台审批 / Review it in the console:", link]
        else:
            lines += ["", "查看您的申请 / Your requests:", link]
    lines += [
        "",
        "此消息由 Egress Guard 自动发送，不含被拦截请求的任何内容。",
        "Sent automatically by Egress Guard; it carries no content of the blocked request.",
    ]
    about = f": {ex_id}" + (f" ({target})" if target else "")
    title = f"[Egress Guard] {words.short_zh} / {words.short_en}{about}"
    data: dict[str, Any] = {
        "id": ex_id,
        "requester": plain(notice.requester),
        "subject": plain(notice.subject),
        "control": plain(notice.control),
        "target": target,
        "category": plain(notice.category),
        "rule_id": plain(notice.rule_id),
        "request_id": plain(notice.request_id, 64),
        "grant": plain(notice.grant),
        "reason": reason,
        "actor": plain(notice.actor),
        "start": _iso(notice.start_ms) if notice.start_ms else None,
        "expiry": _iso(notice.expiry_ms) if notice.expiry_ms else None,
        "approvals_needed": notice.approvals_needed,
        "approvals_given": notice.approvals_given,
        "at": _iso(notice.ts_ms) if notice.ts_ms else None,
    }
    return Message(notice.kind, plain(title, 300), "\n".join(lines), link, data)


def _cut_utf8(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "…"


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>); its docs ask for these three.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_payload(kind: str, message: Message) -> dict[str, Any]:
    """The JSON body for a webhook of ``kind``."""
    text = f"{message.title}\n\n{message.text}"
    if kind == "wecom":
        return {"msgtype": "text", "text": {"content": _cut_utf8(text, WECOM_TEXT_BYTES)}}
    if kind == "dingtalk":
        return {"msgtype": "text", "text": {"content": _cut_utf8(text, DINGTALK_TEXT_BYTES)}}
    if kind == "slack":
        return {"text": _slack_escape(text)}
    return {
        "event": f"exception.{message.kind}",
        "exception": dict(message.fields),
        "title": message.title,
        "text": text,
        "link": message.link or None,
    }


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's robot signature: base64(HMAC-SHA256(key=secret, "timestamp\\nsecret")),
    URL-encoded; the robot refuses a timestamp more than an hour off."""
    to_sign = f"{timestamp_ms}\n{secret}".encode()
    digest = hmac.new(secret.encode("utf-8"), to_sign, hashlib.sha256).digest()
    return urllib.parse.quote_plus(base64.b64encode(digest).decode("ascii"))


def dingtalk_signed_url(url: str, secret: str, timestamp_ms: int) -> str:
    joiner = "&" if urllib.parse.urlsplit(url).query else "?"
    return f"{url}{joiner}timestamp={timestamp_ms}&sign={dingtalk_sign(secret, timestamp_ms)}"


def generic_signature(secret: str, timestamp_s: int, body: bytes) -> str:
    """``sha256=`` and the hex HMAC-SHA256 of ``"{timestamp}." + body``: a receiver checks the
    X-Egress-Guard-Signature header against it and the timestamp against its clock."""
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp_s}.".encode() + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def requester_address(notice: ExceptionNotice, spec: RequesterSpec) -> str:
    """Where the requester's e-mail goes, or "" when there is nowhere."""
    for candidate in (notice.requester_email, notice.requester):
        if "@" in candidate and _ADDRESS.match(candidate):
            return candidate
    user = notice.requester.rsplit("\\", 1)[-1]  # CORP\li.na → li.na
    if spec.email_domain and _LOCAL_PART.match(user) and not user.startswith("."):
        return f"{user}@{spec.email_domain}"
    return ""


def build_email(
    message: Message, smtp: SmtpSpec, to: tuple[str, ...], wall_s: float, exception_id: str
) -> EmailMessage:
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["Subject"] = message.title
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(to)
    msg["Date"] = format_datetime(datetime.fromtimestamp(wall_s, UTC))
    # make_msgid would look this host up in DNS without a domain; the sender's domain serves.
    msg["Message-ID"] = make_msgid("egress-guard", domain=parseaddr(smtp.sender)[1].split("@")[1])
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no out-of-office replies to this
    msg["X-Egress-Guard-Exception"] = plain(exception_id, 64)
    msg.set_content(message.text, charset="utf-8")
    return msg


# --- senders -------------------------------------------------------------------------------


class SendError(Exception):
    """A failed attempt, described without the URL, the secret or the message."""

    permanent = False


class TransientError(SendError):
    """Worth trying again later (refused connection, timeout, 4xx SMTP, 5xx HTTP, rate limit)."""


class PermanentError(SendError):
    """Trying again will not help (5xx SMTP such as an unknown recipient, 4xx HTTP)."""

    permanent = True


class Sender(Protocol):
    channel: Channel

    def send(self, payload: Any) -> None:
        """Deliver once, or raise (a ``SendError`` says whether to try again)."""


def _tls_context(ca_file: str | None, base_dir: Path | None) -> ssl.SSLContext:
    cafile = str(_resolve(ca_file, base_dir)) if ca_file else None
    return ssl.create_default_context(cafile=cafile)


def _short(text: object) -> str:
    return plain(str(text), 200)


class SmtpSender:
    """One connection per message: the worker sends a few messages a day, and a relay that
    drops idle connections then never bites."""

    channel: Channel = "email"

    def __init__(self, spec: SmtpSpec, password: str | None, base_dir: Path | None = None):
        self._spec = spec
        self._password = password
        self._context = _tls_context(spec.ca_file, base_dir) if spec.security != "none" else None
        self._helo = spec.helo_name or socket.gethostname()  # getfqdn() may wait on DNS

    def send(self, payload: EmailMessage) -> None:
        spec = self._spec
        try:
            if spec.security == "tls":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    spec.host,
                    spec.port,
                    local_hostname=self._helo,
                    timeout=spec.timeout,
                    context=self._context,
                )
            else:
                smtp = smtplib.SMTP(
                    spec.host, spec.port, local_hostname=self._helo, timeout=spec.timeout
                )
            with smtp:
                smtp.ehlo()
                if spec.security == "starttls":
                    # Never falls back to plain: a relay that offers no STARTTLS is an error.
                    smtp.starttls(context=self._context)
                    smtp.ehlo()
                if spec.username is not None and self._password is not None:
                    smtp.login(spec.username, self._password)
                refused = smtp.send_message(payload)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            error = f"every recipient refused ({', '.join(map(str, codes))})"
            raise (PermanentError if all(c >= 500 for c in codes) else TransientError)(
                error
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise PermanentError(f"the server does not support it: {_short(exc)}") from None
        except smtplib.SMTPResponseException as exc:
            error = f"SMTP {exc.smtp_code}: {_short(_decode(exc.smtp_error))}"
            raise (PermanentError if exc.smtp_code >= 500 else TransientError)(error) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientError(f"{type(exc).__name__}: {_short(exc)}") from None
        if refused:
            log.warning("notification e-mail not accepted for %s", ", ".join(sorted(refused)))


def _decode(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured; following would turn the POST into a GET or
    carry it to a host nobody configured."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> None:
        return None


_RETRY_HTTP = frozenset({408, 425, 429})


class WebhookSender:
    """POSTs the JSON a webhook of its kind takes; signs DingTalk and generic requests afresh
    for each attempt (DingTalk refuses a timestamp an hour old)."""

    channel: Channel = "webhook"

    def __init__(
        self,
        spec: WebhookSpec,
        url: str,
        secret: str | None,
        base_dir: Path | None = None,
        wall: Callable[[], float] = time.time,
    ):
        self._spec = spec
        self._url = check_http_url(url, "webhook url")
        self._secret = secret
        self._wall = wall
        proxies = {"http": spec.proxy, "https": spec.proxy} if spec.proxy else {}
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(proxies),
            urllib.request.HTTPSHandler(context=_tls_context(spec.ca_file, base_dir)),
            _NoRedirect(),
        )
        self.host = urllib.parse.urlsplit(url).hostname or ""  # what logs may name

    def send(self, payload: bytes) -> None:
        url = self._url
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "egress-guard"}
        now = self._wall()
        if self._secret and self._spec.kind == "dingtalk":
            url = dingtalk_signed_url(url, self._secret, int(now * 1000))
        elif self._secret and self._spec.kind == "generic":
            headers["X-Egress-Guard-Timestamp"] = str(int(now))
            headers["X-Egress-Guard-Signature"] = generic_signature(self._secret, int(now), payload)
        request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self._spec.timeout) as response:
                answer = response.read(RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            exc.close()
            error = f"HTTP {exc.code} from {self.host}"
            if exc.code >= 500 or exc.code in _RETRY_HTTP:
                raise TransientError(error) from None
            raise PermanentError(error) from None
        except urllib.error.URLError as exc:
            raise TransientError(f"{self.host}: {_short(exc.reason)}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # str() of some of these repeats the URL, which may hold the token: name the type.
            raise TransientError(f"{self.host}: {type(exc).__name__}") from None
        if self._spec.kind in ("wecom", "dingtalk"):
            # Both answer 200 and say in the body whether they took it (errcode 0).
            try:
                code = json.loads(answer).get("errcode")
            except (ValueError, AttributeError):
                code = "unreadable answer"
            if code != 0:
                raise TransientError(f"{self.host} answered errcode {_short(code)}")


# --- the notifier --------------------------------------------------------------------------


@dataclass
class _Job:
    channel: Channel
    kind: str
    exception_id: str
    payload: Any
    attempt: int = 0  # attempts made so far


def _nothing(*_args: Any) -> None:
    return None


class Notifier:
    """Takes notices from the exception workflow and delivers them in the background.

    ``submit`` returns at once and never raises: a full queue, a closed notifier or a notice
    that cannot be built is counted ``dropped`` and logged. One daemon thread sends, oldest
    due first; a failed attempt is retried after a growing delay (``retried``) until the
    attempts run out or the server says it never will (``failed``). ``close`` flushes: what is
    waiting is tried once more at once, then the worker ends.

    ``count(channel, outcome)`` and ``depth(n)`` are the metrics hooks
    (``metrics.count_notification``, ``metrics.NOTIFICATION_QUEUE_DEPTH.set``). ``clock`` and
    ``sleep`` time the retries (monotonic seconds; a test passes a fake pair that sleeps by
    moving the clock), ``wall`` dates messages and signs webhooks. ``senders`` replaces the
    ones the spec would build (tests).
    """

    def __init__(
        self,
        spec: NotificationsSpec | None,
        *,
        count: Callable[[str, str], None],
        depth: Callable[[int], None] = _nothing,
        base_dir: Path | None = None,
        credentials: Credentials | None = None,
        senders: Mapping[str, Sender] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
    ):
        self._spec = spec if spec is not None and spec.enabled else None
        self._count = count
        self._depth = depth
        self._clock = clock
        self._wall = wall
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._sleep = sleep if sleep is not None else self._wake.wait
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._busy = False
        self._closing = False
        self._senders: dict[str, Sender] = {}
        if self._spec is not None:
            if senders is None:
                senders = self._build_senders(self._spec, credentials, base_dir)
            self._senders = {ch: s for ch, s in senders.items() if ch in ("email", "webhook")}
        self._thread: threading.Thread | None = None
        if self._senders:
            self._thread = threading.Thread(
                target=self._work, name="egress-guard-notify", daemon=True
            )
            self._thread.start()

    def _build_senders(
        self, spec: NotificationsSpec, credentials: Credentials | None, base_dir: Path | None
    ) -> dict[str, Sender]:
        creds = credentials if credentials is not None else load_credentials(spec, base_dir)
        senders: dict[str, Sender] = {}
        if spec.smtp is not None:
            senders["email"] = SmtpSender(spec.smtp, creds.smtp_password, base_dir)
        if spec.webhook is not None and creds.webhook_url:
            senders["webhook"] = WebhookSender(
                spec.webhook, creds.webhook_url, creds.webhook_secret, base_dir, self._wall
            )
        return senders

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(sorted(self._senders))

    # --- the caller's side

    def submit(self, notice: ExceptionNotice) -> None:
        """Queue the messages for a notice; returns at once, never raises."""
        if not self._senders or self._spec is None:
            return
        try:
            jobs = self._plan(notice, self._spec)
        except Exception as exc:  # a bug in the caller or here must not stop the workflow
            log.error("notification not built (%s): %s", type(exc).__name__, _short(exc))
            for channel in self._senders:
                self._tally(channel, "dropped")
            return
        with self._cond:
            for job in jobs:
                if self._closing or len(self._heap) >= self._spec.queue_size:
                    log.warning(
                        "notification dropped (%s): %s %s via %s",
                        "shutting down" if self._closing else "queue full",
                        job.kind,
                        job.exception_id,
                        job.channel,
                    )
                    self._tally(job.channel, "dropped")
                    continue
                heapq.heappush(self._heap, (self._clock(), next(self._seq), job))
            self._gauge(len(self._heap))
            self._wake.set()
            self._cond.notify_all()

    def _plan(self, notice: ExceptionNotice, spec: NotificationsSpec) -> list[_Job]:
        message = build_message(notice, spec)
        ex_id = plain(notice.exception_id, 64)
        to: tuple[str, ...] = ()
        webhook = False
        if KINDS[notice.kind].audience == "approvers":
            to = spec.approvers.email
            webhook = spec.approvers.webhook
        else:
            address = requester_address(notice, spec.requester)
            to = (address,) if address else ()
            webhook = spec.requester.webhook
        jobs = []
        if "email" in self._senders and to and spec.smtp is not None:
            email = build_email(message, spec.smtp, to, self._wall(), ex_id)
            jobs.append(_Job("email", notice.kind, ex_id, email))
        if "webhook" in self._senders and webhook:
            kind = spec.webhook.kind if spec.webhook is not None else "generic"
            body = json.dumps(webhook_payload(kind, message), ensure_ascii=False).encode()
            jobs.append(_Job("webhook", notice.kind, ex_id, body))
        if not jobs:
            log.info("no recipient for the %s notice of %s", notice.kind, ex_id)
        return jobs

    def close(self, timeout: float = 10.0) -> bool:
        """Flush and stop: each message still waiting gets one more attempt now. True when the
        worker finished within ``timeout`` seconds; later submits are dropped."""
        with self._cond:
            self._closing = True
            self._wake.set()
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being sent (tests, and a shutdown that wants to
        know); True if that happened within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._heap and not self._busy, timeout)

    # --- the worker's side

    def _tally(self, channel: str, outcome: str) -> None:
        try:
            self._count(channel, outcome)
        except Exception:  # a broken metrics hook must not stop the deliveries
            log.exception("notification metric not counted")

    def _gauge(self, depth: int) -> None:
        try:
            self._depth(depth)
        except Exception:  # as for _tally
            log.exception("notification queue depth not set")

    def _delay(self, attempts: int) -> float:
        retry = self._spec.retry if self._spec is not None else RetrySpec()
        return float(min(retry.first_delay * 2 ** (attempts - 1), retry.max_delay))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closing:
                    self._cond.wait()
                if not self._heap:
                    return  # closing, and nothing left
                self._wake.clear()  # before reading the clock: a submit after this wakes us
                due, _seq, job = self._heap[0]
                wait = 0.0 if self._closing else due - self._clock()
                if wait <= 0:
                    heapq.heappop(self._heap)
                    self._busy = True
                    self._gauge(len(self._heap))
            if wait > 0:
                self._sleep(wait)
                continue
            try:
                self._attempt(job)
            except Exception:  # the worker outlives any bug in one delivery
                log.exception("notification worker error")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _attempt(self, job: _Job) -> None:
        sender = self._senders[job.channel]
        job.attempt += 1
        attempts = self._spec.retry.attempts if self._spec is not None else 1
        try:
            sender.send(job.payload)
        except Exception as exc:
            error = str(exc) if isinstance(exc, SendError) else type(exc).__name__
            permanent = isinstance(exc, SendError) and exc.permanent
            with self._cond:
                closing = self._closing
            if permanent or closing or job.attempt >= attempts:
                log.error(
                    "notification failed: %s %s via %s after %d attempt(s): %s",
                    job.kind,
                    job.exception_id,
                    job.channel,
                    job.attempt,
                    error,
                )
                self._tally(job.channel, "failed")
                return
            delay = self._delay(job.attempt)
            log.warning(
                "notification %s %s via %s: attempt %d failed (%s); again in %.0fs",
                job.kind,
                job.exception_id,
                job.channel,
                job.attempt,
                error,
                delay,
            )
            self._tally(job.channel, "retried")
            with self._cond:
                heapq.heappush(self._heap, (self._clock() + delay, next(self._seq), job))
                self._gauge(len(self._heap))
            return
        log.info(
            "notification sent: %s %s via %s (attempt %d)",
            job.kind,
            job.exception_id,
            job.channel,
            job.attempt,
        )
        self._tally(job.channel, "sent")
