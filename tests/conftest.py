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


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A loopback HTTP + HTTPS upstream that records what reaches it (one per test module)."""
    from harness import Upstream

    up = Upstream(tmp_path_factory.mktemp("upstream")).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def ws_upstream():
    from harness import WsEcho

    ws = WsEcho().start()
    yield ws
    ws.stop()
