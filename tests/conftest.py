"""Shared test helpers: paths to the shipped policy and the UT1 data beside the repository."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
UT1 = REPO.parent / "shared" / "data" / "ut1"


@pytest.fixture
def write_policy(tmp_path):
    """Write {name: yaml_text} into a fresh policy directory and return it."""

    def write(files: dict[str, str]) -> Path:
        d = tmp_path / "policies"
        d.mkdir(exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text, encoding="utf-8")
        return d

    return write
