"""Paths the tests share: the repository, its shipped policy, the UT1 data beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
UT1 = REPO.parent / "shared" / "data" / "ut1"


def policy_copy(base: Path, files: dict[str, str] | None = None) -> Path:
    """The shipped policy copied under ``base``, with some files replaced or added."""
    import shutil

    directory = base / "policies"
    shutil.copytree(POLICIES, directory)
    for name, text in (files or {}).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def run_benchmark(script: str, *args: str):
    """Run one of tests/benchmarks/*.py as its own process (bounded by a timeout)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class FakeRuntime:
    """What the adapters see of the gateway (``adapters.Runtime``), in process: the shipped
    policy (or one given), a settable clock, the rows recorded, and an inline scan pool."""

    def __init__(self, spill_dir: Path, policy_dir: Path = POLICIES, now: float = 1_800_000_000.0):
        from egress_guard.core.exceptions import ActiveExceptions
        from egress_guard.core.policy import load_policy
        from egress_guard.core.upload import UploadWindows
        from egress_guard.runtime.heldbody import HoldSpec
        from egress_guard.runtime.resolver import Destinations
        from egress_guard.runtime.scanpool import ScanPool

        self.now = now
        self._policy = load_policy(policy_dir)
        self.hold = HoldSpec(spill_dir, self._policy.uploads.hold_in_memory)
        self.hold.prepare()
        self.windows = UploadWindows(self._policy.uploads.window_seconds, self.clock)
        self.scans = ScanPool()
        self.destinations = Destinations(self.clock)
        self.exceptions = ActiveExceptions()  # replace with one holding the test's exceptions
        self.portal = None  # block pages without a request form, unless a test sets one
        self.tunnels: dict = {}
        self.rows: list = []
        self.fails_closed = True
        self.audit_accepting = True

    def clock(self) -> float:
        return self.now

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    @property
    def policy(self):
        return self._policy

    def refuses_for_audit(self) -> bool:
        return self.fails_closed and not self.audit_accepting

    def record(self, row):
        self.rows.append(row)
        return None
