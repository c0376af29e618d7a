"""Paths the tests share: the repository, its shipped policy, the UT1 data beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
UT1 = REPO.parent / "shared" / "data" / "ut1"
