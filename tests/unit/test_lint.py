"""The code stays ruff-clean: the same check a developer runs, as part of the suite."""

import shutil
import subprocess
import sys

from support import REPO


def test_ruff_clean():
    ruff = shutil.which("ruff") or f"{sys.executable} -m ruff"
    result = subprocess.run(
        [*ruff.split(), "check", "addons", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
