"""Admin API authentication rules that do not need a running gateway."""

from egress_guard.console import FailedLogins


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
