"""`egress-guard policy import-ut1` on the real UT1 files (CC BY-SA 4.0, see shared/data/ut1)."""

import subprocess
import sys

import pytest

from egress_guard.core.decision import RequestFacts, decide
from egress_guard.core.policy import load_policy
from support import UT1

pytestmark = pytest.mark.skipif(not UT1.is_dir(), reason="shared/data/ut1 not beside the repo")


def run_import(category, source, out):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "egress_guard.cli",
            "policy",
            "import-ut1",
            category,
            str(source),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_domains_file_becomes_a_loadable_policy(tmp_path):
    out = tmp_path / "ut1-filehosting.yaml"
    result = run_import("cloud_drive", UT1 / "filehosting.domains", out)
    assert result.returncode == 0, result.stderr
    entries = (UT1 / "filehosting.domains").read_text().split()
    text = out.read_text()
    assert "CC BY-SA 4.0" in text and "Toulouse" in text  # the licence travels with the list

    policy = load_policy(tmp_path)
    skipped = result.stderr.count(": skipped ")
    assert policy.stats["cloud_drive"].rules == len(entries) - skipped
    assert skipped <= 5, result.stderr
    for entry in ("dropbox.com", "88.191.122.25", entries[0], entries[-1]):
        d = decide(RequestFacts((entry,), "/"), policy)
        assert d.verdict == "block" and d.category == "cloud_drive", entry
    assert decide(RequestFacts(("www.dropbox.com",), "/"), policy).verdict == "block"
    assert decide(RequestFacts(("example.org",), "/"), policy).verdict == "allow"


def test_urls_file_becomes_path_rules(tmp_path):
    out = tmp_path / "ut1-webmail-urls.yaml"
    result = run_import("webmail", UT1 / "webmail.urls", out)
    assert result.returncode == 0, result.stderr
    policy = load_policy(tmp_path)
    assert policy.stats["webmail"].rules == len((UT1 / "webmail.urls").read_text().split())
    assert decide(RequestFacts(("home.pl",), "/webmail/x"), policy).verdict == "block"
    assert decide(RequestFacts(("home.pl",), "/shop"), policy).verdict == "allow"


def test_imported_lists_merge_with_the_shipped_categories(tmp_path):
    import shutil

    from support import POLICIES

    shutil.copytree(POLICIES, tmp_path / "p")
    result = run_import("webmail", UT1 / "webmail.domains", tmp_path / "p" / "ut1-webmail.yaml")
    assert result.returncode == 0, result.stderr
    merged = load_policy(tmp_path / "p")
    shipped = load_policy(POLICIES)
    assert merged.stats["webmail"].rules > shipped.stats["webmail"].rules + 300
