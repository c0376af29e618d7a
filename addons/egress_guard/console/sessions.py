"""Server-side console sessions: the cookie only names one."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .accounts import Account, AccountBook

SESSION_COOKIE = "egress_session"
# The session cookie and the XSRF cookie both: never sent over plain HTTP, never readable by
# a script, never sent with a request another site starts. No expiry: gone with the browser.
COOKIE_FLAGS: dict[str, Any] = {"path": "/", "secure": True, "httponly": True, "samesite": "Strict"}


@dataclass
class Session:
    id: str
    account: str
    stamp: str  # the account's password stamp at login
    created: float
    seen: float


class Sessions:
    """The open sessions, bounded in number; each idles out and has a hard lifetime."""

    IDLE = 30 * 60.0
    LIFETIME = 12 * 3600.0
    MAX = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, account: Account) -> Session:
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), account.name, account.stamp, now, now)
        self._sessions[session.id] = session
        while len(self._sessions) > self.MAX:
            self._sessions.popitem(last=False)
        return session

    def find(self, session_id: str, accounts: AccountBook) -> tuple[Session, Account] | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        account = accounts.get(session.account)
        if (
            account is None
            or account.stamp != session.stamp
            or now - session.seen >= self.IDLE
            or now - session.created >= self.LIFETIME
        ):
            del self._sessions[session_id]
            return None
        session.seen = now
        self._sessions.move_to_end(session_id)
        return session, account

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)
