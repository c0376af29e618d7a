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
