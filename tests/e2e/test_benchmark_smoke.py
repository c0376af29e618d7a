"""The benchmark suite starts, measures both proxies and writes its report (smoke mode)."""

import json

import pytest

from support import run_benchmark

pytestmark = pytest.mark.slow


def test_benchmark_suite_runs_and_reports(tmp_path):
    out = tmp_path / "bench"
    result = run_benchmark(
        "run.py",
        "--smoke",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "smoke" and data["machine"]["cores"] >= 1
    for case in ("http_get_keepalive", "https_get_keepalive", "form_post_100k", "blocked_request"):
        pair = data["proxies"][case]["rounds"][0]
        assert pair["gateway"]["requests_per_s"] > 0 and pair["mitmdump"]["requests_per_s"] > 0
    assert data["proxies"]["blocked_connect"]["requests_per_s"] > 0
    assert set(data["lookup"]) == {"10", "1000"}
    assert data["scanning"]["matching"]["ratio"] > 0
    assert data["log_pipeline"]["written"] == data["log_pipeline"]["rows"]
    report = (out / "report.md").read_text()
    for heading in (
        "## Through the proxy",
        "## Blocklist lookup",
        "## Marker scanning",
        "## Log pipeline",
    ):
        assert heading in report


def test_the_audit_benchmark_runs_and_reports(tmp_path):
    """bench_audit at a small size: it fills the store, times every auditor query and writes
    its report (the 1 M / 10 M figures are in the README)."""
    out = tmp_path / "audit"
    result = run_benchmark("bench_audit.py", "--rows", "50000", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    seconds = data["sizes"]["50000"]["seconds"]
    for name in ("user_week_first_page", "timeline_user_week", "report_month_busiest_destinations",
                 "incident_queue", "retention"):  # fmt: skip
        assert seconds[name] > 0, name
    assert "| timeline_user_week |" in (out / "report.md").read_text()
