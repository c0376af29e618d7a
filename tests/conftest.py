"""Test setup: makes tests/support.py and tests/e2e/harness.py importable everywhere."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "e2e")]


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
