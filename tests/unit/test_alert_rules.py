"""The shipped Prometheus alert rules are valid and fire on the metrics the gateway exports."""

import os
import re
import shutil
import subprocess

import pytest

from egress_guard import metrics
from support import REPO

PROMTOOL = shutil.which("promtool")
if PROMTOOL is None and os.environ.get("CI"):
    raise RuntimeError("CI must install Debian's prometheus package for promtool (see .ci/run)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


@needs_promtool
def test_rules_check_and_unit_tests_pass():
    for args in (
        ["check", "rules", "deploy/alerts.yml"],
        ["test", "rules", "tests/promtool/alerts_test.yml"],
    ):
        result = subprocess.run(
            [PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_rules_use_is_exported():
    exported = {m.name for m in metrics.REGISTRY.collect()}
    used = set(re.findall(r"(egress_guard_\w+)", (REPO / "deploy" / "alerts.yml").read_text()))
    # Counters are exposed with a _total suffix; their family name drops it.
    missing = {u for u in used if u.removesuffix("_total") not in exported}
    assert not missing, missing
