"""The curated lists against the other hostnames of their services (tests/ut1_crosscheck.py,
reviewed in tests/curated_alternates.yaml)."""

from __future__ import annotations

import pytest

import ut1_crosscheck  # tests/ is on the path, as for support
from egress_guard.core.decision import RequestFacts, decide
from egress_guard.core.policy import Policy, load_policy
from support import POLICIES, UT1

pytestmark = pytest.mark.skipif(not UT1.is_dir(), reason="shared/data/ut1 not beside the repo")

REVIEWED = ut1_crosscheck.load_expectations()


@pytest.fixture(scope="module")
def shipped() -> Policy:
    return load_policy(POLICIES)


@pytest.mark.parametrize("entry", [e for e, r in REVIEWED.items() if r.get("covered")])
def test_every_alternate_marked_covered_is_decided_by_its_curated_rule(shipped, entry):
    assert ut1_crosscheck.decided_by(shipped, entry) == REVIEWED[entry]["rule"]


@pytest.mark.parametrize("entry", [e for e, r in REVIEWED.items() if not r.get("covered")])
def test_every_alternate_not_added_says_why_and_is_really_not_covered(shipped, entry):
    review = REVIEWED[entry]
    assert len(review.get("why", "").split()) >= 3, entry
    # Covered after all: then the list is wrong, mark it covered.
    assert ut1_crosscheck.decided_by(shipped, entry) != review["rule"], entry
    if "the UT1 tier blocks it" in review["why"]:
        host, slash, path = entry.partition("/")
        d = decide(RequestFacts((host,), "/" + path if slash else "/"), shipped)
        assert d.verdict == "block" and d.rule_id.startswith("ut1."), (entry, d.rule_id)


def test_every_reviewed_rule_exists(shipped):
    ids = {r.id for r in shipped.rules if r.tier == "curated"}
    assert not {r["rule"] for r in REVIEWED.values()} - ids


def test_ut1_alternates_are_still_in_the_ut1_source():
    entries = set(ut1_crosscheck.ut1_entries())
    stale = [e for e, r in REVIEWED.items() if r["source"] == "ut1" and e not in entries]
    assert not stale, f"no longer in UT1, mark them well-known or drop them: {stale}"


def test_every_related_ut1_entry_no_curated_rule_decides_is_reviewed(shipped):
    """A new UT1 release that brings another hostname of a curated service fails here until
    someone adds it to the curated rule or writes down why not (python tests/ut1_crosscheck.py
    --new lists them)."""
    new = [c.entry for c in ut1_crosscheck.candidates(shipped) if c.entry not in REVIEWED]
    assert not new, new
