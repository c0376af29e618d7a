"""Tiers: the curated lists (and the allow list) over the imported UT1 lists, and the UT1
exclusions. In the index, in the policy loader, and in what a row and the block page say."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from mitmproxy.test import tflow, tutils

from egress_guard.core.blocklist import HostIndex, Reason, Rule
from egress_guard.core.decision import RequestFacts, decide, needs_interception
from egress_guard.core.policy import Policy, PolicyError, load_policy
from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.flows import STATE
from support import POLICIES, UT1, FakeRuntime

R = Reason("en", "zh")


def rule(
    rid: str,
    hosts: tuple[str, ...] = (),
    exact: tuple[str, ...] = (),
    paths: tuple[str, ...] = (),
    action: str = "block",
    category: str = "cloud_drive",
) -> Rule:
    tier = "ut1" if rid.startswith("ut1.") else "curated"
    return Rule(rid, category, action, R, hosts=hosts, exact_hosts=exact, paths=paths, tier=tier)  # type: ignore[arg-type]


def lookup_id(index: HostIndex, host: str, path: str | None = "/") -> str | None:
    match = index.lookup(host, path)
    return match.rule.id if match else None


# --- the index --------------------------------------------------------------------------------


def test_a_curated_rule_beats_a_longer_ut1_entry_under_it():
    # UT1 first: within one tier the longer pattern would win whatever the order.
    index = HostIndex.build(
        [
            rule("ut1.cloud_drive.files.example.com", ("files.example.com",)),
            rule("c.ex", ("example.com",)),
        ]
    )
    assert lookup_id(index, "a.files.example.com") == "c.ex"
    assert lookup_id(index, "files.example.com", None) == "c.ex"


def test_an_allow_beats_a_longer_ut1_block():
    index = HostIndex.build(
        [
            rule("ut1.webmail.mail.corp.example", ("mail.corp.example",), category="webmail"),
            rule("company.corp", ("corp.example",), action="allow", category="company"),
        ]
    )
    match = index.lookup("mail.corp.example", "/inbox")
    assert match is not None and (match.rule.id, match.rule.action) == ("company.corp", "allow")


def test_the_curated_rule_is_named_when_both_tiers_list_the_same_host():
    index = HostIndex.build(
        [
            rule("ut1.cloud_drive.dropbox.com", ("dropbox.com",)),
            rule("cloud_drive.dropbox", ("dropbox.com",)),
        ]
    )
    assert lookup_id(index, "www.dropbox.com") == "cloud_drive.dropbox"


def test_ut1_decides_what_no_curated_rule_covers():
    index = HostIndex.build(
        [
            rule("webmail.icloud", exact=("www.icloud.com",), paths=("/mail",), category="webmail"),
            rule("ut1.cloud_drive.icloud.com", ("icloud.com",)),
            rule("ut1.cloud_drive.home.example-upload", ("home.example",), paths=("/upload",)),
        ]
    )
    assert lookup_id(index, "www.icloud.com", "/mail/inbox") == "webmail.icloud"
    assert lookup_id(index, "www.icloud.com", "/photos") == "ut1.cloud_drive.icloud.com"
    assert lookup_id(index, "home.example", "/Upload/x") == "ut1.cloud_drive.home.example-upload"
    assert lookup_id(index, "home.example", "/shop") is None


def test_a_ut1_path_entry_under_an_allowed_domain_does_not_force_interception():
    index = HostIndex.build(
        [
            rule("company.corp", ("corp.example",), action="allow", category="company"),
            rule("ut1.webmail.corp.example-webmail", ("corp.example",), paths=("/webmail",)),
            rule("ut1.webmail.other.example-webmail", ("other.example",), paths=("/webmail",)),
            rule("ut1.cloud_drive.shared.example", ("shared.example",)),
            rule("cloud_drive.shared-upload", exact=("shared.example",), paths=("/upload",)),
        ]
    )
    assert lookup_id(index, "corp.example", "/webmail/") == "company.corp"
    assert not index.has_path_rules("corp.example")  # the allow decides every path
    assert index.has_path_rules("other.example")  # no curated rule: the UT1 path decides
    assert index.has_path_rules("shared.example")  # a curated path rule over a UT1 host


# --- the policy loader ------------------------------------------------------------------------

CURATED = """\
categories:
  cloud_drive:
    action: block
    reason: {en: "No drives.", zh: "禁止网盘。"}
    rules:
      - id: cloud_drive.example
        hosts: [example-drive.com]
"""

UT1_FILE = """\
tier: ut1
categories:
  cloud_drive:
    rules:
    - id: ut1.cloud_drive.example-drive.com
      hosts: [example-drive.com]
    - id: ut1.cloud_drive.upload.corp.example
      hosts: [upload.corp.example]
    - id: ut1.cloud_drive.cdn.example
      hosts: [cdn.example]
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def problems(directory: Path) -> list[str]:
    with pytest.raises(PolicyError) as err:
        load_policy(directory)
    return err.value.problems


def test_a_ut1_file_loads_as_the_lower_tier(tmp_path):
    policy = load_policy(write(tmp_path, {"a.yaml": CURATED, "ut1-x.yaml": UT1_FILE}))
    assert policy.stats["cloud_drive"].rules == 4 and policy.stats["cloud_drive"].ut1_rules == 3
    d = decide(RequestFacts(("www.example-drive.com",), "/"), policy)
    assert (d.rule_id, d.rule.tier) == ("cloud_drive.example", "curated")  # type: ignore[union-attr]
    d = decide(RequestFacts(("cdn.example",), "/"), policy)
    assert (d.verdict, d.rule_id, d.category) == (
        "block",
        "ut1.cloud_drive.cdn.example",
        "cloud_drive",
    )
    assert "3 rules from UT1" in policy.summary()


def test_a_company_allow_overrides_a_ut1_block(tmp_path):
    allow = """\
categories:
  company:
    action: allow
    reason: {en: "Company service.", zh: "公司自有服务。"}
    rules:
      - id: company.corp
        hosts: [corp.example]
"""
    policy = load_policy(
        write(tmp_path, {"a.yaml": CURATED, "allow.yaml": allow, "u.yaml": UT1_FILE})
    )
    d = decide(RequestFacts(("upload.corp.example",), "/files"), policy)
    assert (d.verdict, d.rule_id) == ("allow", "company.corp")


TWICE = "ut1_exclusions:\n  - {host: a.example, reason: r}\n  - {host: a.example, reason: r}\n"
MISTAKES = [
    # a curated file cannot pass its rules off as UT1 ones, nor the other way round
    (
        {"a.yaml": CURATED.replace("cloud_drive.example", "ut1.cloud_drive.example")},
        "a.yaml:6: categories.cloud_drive.rules[0].id",
        "must not start with 'ut1.'",
    ),
    (
        {"u.yaml": UT1_FILE.replace("ut1.cloud_drive.cdn.example", "cloud_drive.cdn")},
        "u.yaml:9: categories.cloud_drive.rules[2].id",
        "must start with 'ut1.'",
    ),
    # a generated file is replaced on the next import: settings kept in it would be lost
    (
        {"u.yaml": UT1_FILE + "settings:\n  retention_months: 12\n"},
        "u.yaml:12: settings",
        "not allowed in a file of tier ut1",
    ),
    ({"u.yaml": UT1_FILE.replace("tier: ut1", "tier: bulk")}, "u.yaml:1: tier", "'ut1'"),
    (
        {"x.yaml": "ut1_exclusions:\n  - {host: cdn.example}\n"},
        "x.yaml:2: ut1_exclusions[0].reason",
        "Field required",
    ),
    ({"x.yaml": TWICE}, "x.yaml:2: ut1_exclusions", "hosts listed twice: a.example"),
    (
        {"x.yaml": "ut1_exclusions: []\n", "y.yaml": "ut1_exclusions: []\n"},
        "y.yaml:1: ut1_exclusions",
        "already given in",
    ),
]


@pytest.mark.parametrize(("files", "where", "words"), MISTAKES)
def test_tier_mistakes_name_file_line_and_field(tmp_path, files, where, words):
    base = {"a.yaml": CURATED, "u.yaml": UT1_FILE}
    d = write(tmp_path, {**base, **files})
    found = problems(d)
    assert any(p.startswith(f"{d / where}") and words in p for p in found), found


def test_an_exclusion_takes_the_ut1_entry_out_and_nothing_else(tmp_path):
    exclusions = """\
ut1_exclusions:
  - host: cdn.example
    reason: a CDN
  - host: example-drive.com
    reason: only the UT1 entry goes; the curated rule stays
"""
    d = write(tmp_path, {"a.yaml": CURATED, "u.yaml": UT1_FILE, "ut1-exclusions.yaml": exclusions})
    policy = load_policy(d)
    assert decide(RequestFacts(("img.cdn.example",), "/"), policy).verdict == "allow"
    assert (
        decide(RequestFacts(("example-drive.com",), "/"), policy).rule_id == "cloud_drive.example"
    )
    assert decide(RequestFacts(("upload.corp.example",), "/"), policy).verdict == "block"
    assert policy.ut1_excluded == (
        "ut1.cloud_drive.example-drive.com",
        "ut1.cloud_drive.cdn.example",
    )
    assert policy.stats["cloud_drive"].ut1_rules == 1


# --- the shipped policy -----------------------------------------------------------------------

needs_ut1 = pytest.mark.skipif(not UT1.is_dir(), reason="shared/data/ut1 not beside the repo")


@pytest.fixture(scope="module")
def shipped() -> Policy:
    return load_policy(POLICIES)


def ut1_entries() -> set[str]:
    """Every entry of the UT1 source files, as written there (host or host/path)."""
    return {
        line.strip()
        for name in ("webmail.domains", "webmail.urls", "filehosting.domains", "filehosting.urls")
        for line in (UT1 / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    }


def exclusions() -> list[dict]:
    return yaml.safe_load((POLICIES / "ut1-exclusions.yaml").read_text(encoding="utf-8"))[
        "ut1_exclusions"
    ]


def test_the_shipped_policy_has_both_tiers(shipped):
    for category in ("webmail", "cloud_drive"):
        stats = shipped.stats[category]
        assert stats.ut1_rules > 300 and stats.rules - stats.ut1_rules > 50, (category, stats)
    assert {r.tier for r in shipped.rules if r.id.startswith("ut1.")} == {"ut1"}
    assert {r.tier for r in shipped.rules if not r.id.startswith("ut1.")} == {"curated"}


@pytest.mark.parametrize(
    ("host", "path", "rule_id", "category"),
    [
        ("www.dropbox.com", "/", "cloud_drive.dropbox", "cloud_drive"),  # in both: curated named
        ("mail.163.com", "/", "webmail.netease-163", "webmail"),
        ("www.imagevenue.com", "/", "ut1.cloud_drive.imagevenue.com", "cloud_drive"),  # UT1 only
        ("www.caramail.com", "/", "ut1.webmail.caramail.com", "webmail"),
        ("home.pl", "/webmail/login", "ut1.webmail.home.pl-webmail", "webmail"),
    ],
)
def test_shipped_rows_name_the_tier_and_rule(shipped, host, path, rule_id, category):
    d = decide(RequestFacts((host,), path), shipped)
    assert (d.verdict, d.rule_id, d.category) == ("block", rule_id, category)


def test_a_curated_allow_in_allow_yaml_overrides_a_ut1_block(tmp_path):
    """The company adds its own domain to allow.yaml: a longer UT1 entry under it (here the
    real upload.digiex.net) no longer blocks, while its curated blocks stay."""
    d = tmp_path / "p"
    shutil.copytree(POLICIES, d)
    allow = yaml.safe_load((d / "allow.yaml").read_text(encoding="utf-8"))
    allow["categories"]["company"]["rules"] = [
        {"id": "company.own", "hosts": ["digiex.net"]},
    ]
    (d / "allow.yaml").write_text(yaml.safe_dump(allow), encoding="utf-8")
    shipped = load_policy(POLICIES)
    assert decide(RequestFacts(("upload.digiex.net",), "/"), shipped).verdict == "block"
    policy = load_policy(d)
    got = decide(RequestFacts(("upload.digiex.net",), "/"), policy)
    assert (got.verdict, got.rule_id) == ("allow", "company.own")
    assert not needs_interception(("upload.digiex.net",), policy)


def test_the_block_page_and_row_name_the_ut1_rule(tmp_path):
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    flow = tflow.tflow(req=tutils.treq(host="www.imagevenue.com", port=443, scheme=b"https"))
    flow.request.headers["host"] = "www.imagevenue.com"
    guard.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    page = flow.response.get_text()
    assert "ut1.cloud_drive.imagevenue.com" in page and "cloud_drive" in page
    assert flow.response.headers["X-Egress-Guard-Rule"] == "ut1.cloud_drive.imagevenue.com"
    assert flow.metadata[STATE].decision.rule.tier == "ut1"
    guard.response(flow)
    (row,) = rt.rows
    assert (row.rule_id, row.category) == ("ut1.cloud_drive.imagevenue.com", "cloud_drive")


# --- the exclusions ---------------------------------------------------------------------------


@needs_ut1
def test_every_exclusion_names_an_entry_of_the_ut1_source():
    """A stale exclusion (UT1 dropped the entry) is noticed here and taken out."""
    entries = ut1_entries()
    stale = [e["host"] for e in exclusions() if e["host"] not in entries]
    assert not stale, f"not in the UT1 source any more: {stale}"


def test_every_exclusion_has_a_reason():
    assert all(len(e.get("reason", "").split()) >= 3 for e in exclusions())


@pytest.mark.parametrize("entry", [e["host"] for e in exclusions()])
def test_an_excluded_host_is_not_blocked_by_ut1(shipped, entry):
    """Neither the entry nor a name under it is blocked by a UT1 rule: only a curated rule may
    still block it (outlook.com itself, say)."""
    for host in (entry, f"egress-guard-probe.{entry}"):
        d = decide(RequestFacts((host,), "/"), shipped)
        assert d.verdict == "allow" or d.rule.tier == "curated", (host, d.rule_id)  # type: ignore[union-attr]


def test_without_the_exclusions_those_hosts_would_be_blocked_by_ut1(tmp_path):
    """So the exclusions are what keeps them open (each test above fails without them)."""
    d = tmp_path / "p"
    shutil.copytree(POLICIES, d)
    (d / "ut1-exclusions.yaml").unlink()
    policy = load_policy(d)
    for e in exclusions():
        got = decide(RequestFacts((f"egress-guard-probe.{e['host']}",), "/"), policy)
        assert got.verdict == "block" and got.rule_id.startswith("ut1."), (e["host"], got.rule_id)


@pytest.mark.parametrize(
    ("entry", "host"), [(e["host"], h) for e in exclusions() for h in e.get("still_blocked", [])]
)
def test_the_mail_or_drive_part_of_an_excluded_domain_stays_blocked(shipped, entry, host):
    d = decide(RequestFacts((host,), "/"), shipped)
    assert d.verdict == "block" and d.rule.tier == "curated", (entry, host, d.rule_id)  # type: ignore[union-attr]
