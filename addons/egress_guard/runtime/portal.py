"""Portal: where employees ask for an exception — a reserved host the gateway answers itself
(like mitmproxy's ``mitm.it``), reached through the proxy, so the requester is the identity
the proxy already knows for the connection (its login, or the client network's identity),
never a name typed into a form.

Every block page that an exception can lift carries a request form. Its hidden fields (the
blocked request id, the identity, what would be lifted for which destination, when it was
issued) are signed with a key only the gateway holds, so a form cannot be made for somebody
else, for another destination, or used twice (one request per blocked request id). The
status page on the same host lists the employee's own requests and their decisions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.template import Loader

from egress_guard.core.exceptions import (
    Actor,
    Control,
    Event,
    ExceptionState,
    Refusal,
    Subject,
    Target,
    Terms,
    UploadGrant,
    new_event_id,
    new_exception_id,
    request,
)
from egress_guard.core.units import format_size, parse_duration, parse_size

PORTAL_HOST = "egress-guard.internal"  # .internal: reserved for private use, never on the Internet
FORM_ACTION = f"https://{PORTAL_HOST}/request"
FORM_MAX_AGE_S = 24 * 3600  # a block page's form is good for a day
DURATIONS = ("1h", "8h", "1d", "7d", "30d")
_SIGNED = ("request_id", "requester", "control", "host", "rule_id", "category", "issued")
_TEMPLATES = Loader(str(Path(__file__).with_name("templates")), autoescape="xhtml_escape")


def load_key(path: Path) -> bytes:
    """The form-signing key, made on first use (32 random bytes, mode 0600)."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key


@dataclass(frozen=True)
class RequestForm:
    """What a block page's request form asks for; signed into hidden fields."""

    request_id: str
    requester: str  # the proxy identity: a user name, or "ip:10.1.2.3"
    control: str  # block | upload | marker:LEVEL | unscannable
    host: str
    rule_id: str
    category: str
    issued: int  # seconds

    def fields(self, key: bytes) -> dict[str, str]:
        values = {name: str(getattr(self, name)) for name in _SIGNED}
        return {**values, "sig": _sign(key, values)}


def _sign(key: bytes, values: dict[str, str]) -> str:
    message = "\n".join(f"{name}={values.get(name, '')}" for name in _SIGNED).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def requester_of(user: str, client_ip: str) -> str:
    return user or f"ip:{client_ip}"


class Portal:
    """Signs block-page forms and answers the portal host."""

    def __init__(
        self,
        key: bytes,
        clock: Callable[[], float],
        book: Callable[[], Any],  # the ExceptionBook (append, states)
        rules: Callable[[], Any],  # the policy's ApprovalRules
        notify: Callable[[Event], None] = lambda event: None,
    ):
        self.key = key
        self.clock = clock
        self.book = book
        self.rules = rules
        self.notify = notify

    def form(self, form: RequestForm) -> dict[str, str]:
        return form.fields(self.key)

    def submit(
        self, fields: dict[str, str], user: str, groups: tuple[str, ...], client_ip: str
    ) -> tuple[int, str, str]:
        """A posted request form from this identity: (status, title, message) for the page."""
        signed = {name: fields.get(name, "") for name in _SIGNED}
        if not hmac.compare_digest(_sign(self.key, signed), fields.get("sig", "")):
            return 403, "Form refused", "This form was not issued by the gateway or was changed."
        requester = requester_of(user, client_ip)
        if signed["requester"] != requester:
            return 403, "Form refused", "This form was issued to somebody else."
        try:
            issued = int(signed["issued"])
        except ValueError:
            return 400, "Form refused", "The form is damaged."
        if self.clock() - issued > FORM_MAX_AGE_S:
            return 403, "Form expired", "This form is older than a day: reload the blocked page."
        book = self.book()
        if any(s.request_id == signed["request_id"] for s in book.states().values()):
            return 409, "Already requested", "An exception was already requested for this."
        reason = " ".join(fields.get("reason", "").split())[:1000]
        if not reason:
            return 400, "Reason needed", "Say why your work needs this."
        try:
            duration = parse_duration(fields.get("duration", "1d"))
        except ValueError:
            return 400, "Form refused", "The duration is not one the form offers."
        control = Control.parse(signed["control"])
        grant = None
        if control.kind == "upload":
            try:
                grant = UploadGrant(per_request=parse_size(fields.get("size", "")))
            except ValueError:
                return 400, "Size needed", "Say how large the upload is (e.g. 50MiB)."
        now_ms = int(self.clock() * 1000)
        subject = Subject.user(user) if user else Subject.client(f"{client_ip}/32")
        terms = Terms(
            subject,
            control,
            Target.for_host(signed["host"]),
            now_ms,
            now_ms + int(duration.total_seconds() * 1000),
            grant,
            "alert" if control.kind in ("marker", "unscannable") else "",
        )
        result = request(
            self.rules(),
            exception_id=new_exception_id(),
            event_id=new_event_id(),
            actor=Actor(requester, frozenset(), client_ip, groups),
            now_ms=now_ms,
            terms=terms,
            reason=reason,
            category=signed["category"],
            request_id=signed["request_id"],
        )
        if isinstance(result, Refusal):
            return 403, "Request refused", result.reason
        book.append(result)
        self.notify(result)
        return (
            200,
            "Request sent",
            (
                f"Your request {result.exception_id} is waiting for an approver. The status page "
                f"https://{PORTAL_HOST}/ shows its decision."
            ),
        )

    def own_requests(self, user: str, client_ip: str) -> list[ExceptionState]:
        requester = requester_of(user, client_ip)
        states = self.book().states().values()
        return sorted(
            (s for s in states if s.requester == requester),
            key=lambda s: s.requested_ms,
            reverse=True,
        )


def render(template: str, **values: Any) -> bytes:
    return _TEMPLATES.load(template).generate(format_size=format_size, **values)
