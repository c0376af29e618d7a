"""Cross-check of the curated lists against the hostnames their services serve.

For every curated rule, the UT1 entries that look like the same service (same registrable
domain as one of the rule's hosts, or the same brand under another TLD: hotmail.fr beside
hotmail.com) but that the rule does not cover, and the well-known alternates listed in
tests/curated_alternates.yaml. Each was reviewed there: added to the curated rule, or not
added with the reason why (the UT1 tier may still block it). The unit test
tests/unit/test_ut1_crosscheck.py holds the list to the policy and to the UT1 source.

    python tests/ut1_crosscheck.py            # every candidate, reviewed or not
    python tests/ut1_crosscheck.py --new      # only those not reviewed yet (exit 1 if any)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from support import POLICIES, UT1  # noqa: E402

EXPECTATIONS = HERE / "curated_alternates.yaml"
UT1_FILES = ("webmail.domains", "webmail.urls", "filehosting.domains", "filehosting.urls")

# Second-level labels under which a country's registrable domains sit (co.uk, com.cn...).
_SECOND_LEVEL = {"co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go"}
# Brand labels too generic to say two domains are one service (mail.com vs mail.ru).
_GENERIC = {"mail", "email", "webmail", "web", "free", "live", "file", "files", "cloud", "post"}


def registrable(host: str) -> str:
    """An approximation of the registrable domain, good enough to group candidates."""
    labels = host.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def brand(host: str) -> str:
    return registrable(host).split(".")[0]


@dataclass(frozen=True)
class Candidate:
    entry: str  # host, or host/path for a UT1 urls entry
    rules: tuple[str, ...]  # the curated rules it looks related to
    decided_by: str | None  # the curated rule that decides it in the shipped policy


def ut1_entries() -> list[str]:
    return [
        line.strip()
        for name in UT1_FILES
        for line in (UT1 / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def load_expectations() -> dict[str, dict]:
    """entry → {rule, source: ut1 | well-known, and covered: true or why: "..."}."""
    return yaml.safe_load(EXPECTATIONS.read_text(encoding="utf-8"))["alternates"]


def decided_by(policy, entry: str) -> str | None:
    """The curated rule that decides the entry in the shipped policy (None: none does)."""
    from egress_guard.core.decision import RequestFacts, decide

    host, slash, path = entry.partition("/")
    d = decide(RequestFacts((host,), "/" + path if slash else "/"), policy)
    return d.rule.id if d.rule is not None and d.rule.tier == "curated" else None


def candidates(policy) -> list[Candidate]:
    """The UT1 entries related to a curated block rule that no curated rule decides: the
    alternates the curated lists may miss."""
    domains: dict[str, set[str]] = {}
    brands: dict[str, set[str]] = {}
    for r in policy.rules:
        if r.tier != "curated" or r.action != "block":
            continue
        for h in r.hosts + r.exact_hosts:
            domains.setdefault(registrable(h), set()).add(r.id)
            if brand(h) not in _GENERIC and len(brand(h)) >= 3:
                brands.setdefault(brand(h), set()).add(r.id)
    out = []
    for entry in ut1_entries():
        host = entry.partition("/")[0]
        rules = domains.get(registrable(host), set()) | brands.get(brand(host), set())
        if rules and decided_by(policy, entry) is None:
            out.append(Candidate(entry, tuple(sorted(rules)), None))
    return out


def main() -> int:
    from egress_guard.core.policy import load_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", action="store_true", help="only candidates not reviewed yet")
    args = parser.parse_args()
    policy = load_policy(POLICIES)
    reviewed = load_expectations()
    new = 0
    rows = {c.entry: (", ".join(c.rules), "NOT REVIEWED") for c in candidates(policy)}
    for entry, review in reviewed.items():
        got = decided_by(policy, entry)
        if review.get("covered"):
            verdict = "covered" if got == review["rule"] else f"LISTED AS COVERED, DECIDED BY {got}"
        else:
            verdict = "not added: " + review["why"]
        rows[entry] = (review["rule"], f"[{review['source']}] {verdict}")
    for entry, (rule, verdict) in sorted(rows.items(), key=lambda kv: (kv[1][0], kv[0])):
        new += verdict == "NOT REVIEWED"
        if not args.new or verdict == "NOT REVIEWED":
            print(f"{rule:<30} {entry:<38} {verdict}")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
