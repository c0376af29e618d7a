"""A short run of the bounded load test: a mix of browsing, uploads and blocked requests from
several client processes; every answered request has exactly one row, the gateway logs no
error, and the clients saw no failure. (tests/benchmarks/load.py runs it for minutes.)"""

import json

import pytest

from support import run_benchmark

pytestmark = pytest.mark.slow


def test_load_mix_every_answered_request_logged_once(tmp_path):
    out = tmp_path / "load.json"
    result = run_benchmark(
        "load.py",
        "--seconds",
        "16",
        "--clients",
        "2",
        "--max-requests",
        "4000",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    assert report["answered"] > 100, result.stdout + result.stderr[-2000:]
    assert report["missing_rows"] == 0 and report["duplicate_rows"] == 0
    assert report["client_errors"] == 0, report["client_failures"]
    assert report["rows"] == report["answered"]
    assert report["errors_in_gateway_log"] == []
    assert result.returncode == 0
