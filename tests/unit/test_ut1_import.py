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
    """An import into a category the curated files define adds rules to it, in the UT1 tier."""
    import shutil

    from support import POLICIES

    shutil.copytree(POLICIES, tmp_path / "p")
    for name in ("ut1-webmail.yaml", "ut1-filehosting.yaml"):
        (tmp_path / "p" / name).unlink()
    curated = load_policy(tmp_path / "p")
    result = run_import("webmail", UT1 / "webmail.domains", tmp_path / "p" / "ut1-webmail.yaml")
    assert result.returncode == 0, result.stderr
    merged = load_policy(tmp_path / "p")
    assert merged.stats["webmail"].rules > curated.stats["webmail"].rules + 300
    assert merged.stats["webmail"].ut1_rules == merged.stats["webmail"].rules - (
        curated.stats["webmail"].rules
    )


SHIPPED = ("ut1-webmail.yaml", "ut1-filehosting.yaml")


def header_command(path):
    """The import command a generated file says it was made with (its 'Command:' line)."""
    import shlex

    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# Command: "):
            return shlex.split(line.removeprefix("# Command: "))
    raise AssertionError(f"{path}: no '# Command:' line in the header")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_ut1_lists_are_a_fresh_import_of_the_ut1_source(tmp_path, name):
    """Reproducible and not edited by hand: the command in the header, run on the UT1 files,
    gives the shipped file byte for byte (a new UT1 release means running it again)."""
    from support import POLICIES

    command = header_command(POLICIES / name)
    assert command[:3] == ["egress-guard", "policy", "import-ut1"] and command[-2:] == [
        "-o",
        "FILE",
    ]
    out = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "egress_guard.cli", *command[1:-1], str(out)],
        cwd=UT1,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == (POLICIES / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_ut1_list_says_where_it_came_from(name):
    import hashlib

    from support import POLICIES

    text = (POLICIES / name).read_text(encoding="utf-8")
    header = text[: text.index("\ntier: ut1\n")]
    for words in ("Université Toulouse", "Fabrice Prigent", "CC BY-SA 4.0", "GENERATED"):
        assert words in header, words
    assert "# UT1 data: github.com/olbat/ut1-blacklists 804da92a9177 (2026-08-17)" in header
    for source in header_command(POLICIES / name)[4:-4]:  # between the category and the options
        digest = hashlib.sha256((UT1 / source).read_bytes()).hexdigest()
        assert f"#   {source}: " in header and digest in header, source


def test_the_output_does_not_depend_on_where_the_files_are(tmp_path):
    """Paths are not written, only file names and digests: the same data gives the same file."""
    import shutil

    elsewhere = tmp_path / "copy" / "of" / "ut1"
    shutil.copytree(UT1, elsewhere)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert run_import("webmail", UT1 / "webmail.domains", a).returncode == 0
    assert run_import("webmail", elsewhere / "webmail.domains", b).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    assert str(UT1) not in a.read_text(encoding="utf-8")
