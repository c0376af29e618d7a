"""Login throttling and server-side sessions, without a server."""

from egress_guard.console.throttle import FailedLogins


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def test_an_address_is_locked_after_repeated_failures_until_the_window_passes():
    clock = Clock()
    logins = FailedLogins(limit=3, window=60, clock=clock)
    for _ in range(2):
        logins.failed("10.0.0.5")
    assert not logins.locked("10.0.0.5")
    logins.failed("10.0.0.5")
    assert logins.locked("10.0.0.5")
    assert not logins.locked("10.0.0.6")  # others are not punished
    clock.t += 59
    assert logins.locked("10.0.0.5")
    clock.t += 1
    assert not logins.locked("10.0.0.5")  # the failures have aged out


def test_the_failure_table_stays_bounded():
    logins = FailedLogins(limit=3, window=60, clock=Clock())
    for i in range(10_050):
        logins.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(logins._failures) <= 10_000


def _account(book_dir, roles=("auditor",), password="a long password here"):
    from egress_guard.console.accounts import AccountBook

    book = AccountBook(book_dir / "accounts.json")
    book.add("alice", roles, password)
    return book


def test_a_session_idles_out_and_has_a_hard_lifetime(tmp_path):
    from egress_guard.console.sessions import Sessions

    clock = Clock()
    book = _account(tmp_path)
    sessions = Sessions(clock)
    s = sessions.open(book.get("alice"))
    clock.t += Sessions.IDLE - 1
    assert sessions.find(s.id, book) is not None  # activity renews the idle timer
    for _ in range(int(Sessions.LIFETIME // (Sessions.IDLE - 1)) + 1):
        clock.t += Sessions.IDLE - 1
        if sessions.find(s.id, book) is None:
            break
    assert clock.t - 1000.0 >= Sessions.LIFETIME - Sessions.IDLE
    assert sessions.find(s.id, book) is None  # ended by the lifetime, although active
    s2 = sessions.open(book.get("alice"))
    clock.t += Sessions.IDLE
    assert sessions.find(s2.id, book) is None and len(sessions) == 0


def test_a_session_ends_when_the_password_changes_or_the_account_goes(tmp_path):
    from egress_guard.console.sessions import Sessions

    book = _account(tmp_path)
    sessions = Sessions(Clock())
    s = sessions.open(book.get("alice"))
    assert sessions.find(s.id, book)[1].name == "alice"
    book.set_password("alice", "another long password")
    assert sessions.find(s.id, book) is None
    s = sessions.open(book.get("alice"))
    book.remove("alice")
    assert sessions.find(s.id, book) is None
    assert sessions.find("made-up", book) is None


def test_session_ids_are_fresh_and_the_table_is_bounded(tmp_path, monkeypatch):
    from egress_guard.console.sessions import Sessions

    book = _account(tmp_path)
    monkeypatch.setattr(Sessions, "MAX", 50)
    sessions = Sessions(Clock())
    ids = {sessions.open(book.get("alice")).id for _ in range(60)}
    assert len(ids) == 60 and len(sessions) == 50
