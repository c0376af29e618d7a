"""What deploy/ gives auditors who use their own tools: every query of the Grafana dashboard
runs on the embedded engine with the ClickHouse data source's macros substituted (so the
dashboard cannot ship broken SQL) and has the shape its panel needs; the read-only role's SQL
parses and grants reading only, on every table the gateway keeps."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from egress_guard.requestlog import incidents
from egress_guard.requestlog.auditlog import RequestRow
from egress_guard.requestlog.store import Store, default_dsn

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana-egress-audit.json"
ROLE_SQL = DEPLOY / "clickhouse-auditor.sql"
T0 = datetime(2026, 11, 18, 9, 0, tzinfo=UTC)
FROM, TO = T0 - timedelta(days=1), T0 + timedelta(days=1)


def grafana(sql: str) -> str:
    """The SQL the ClickHouse data source sends: its macros and the dashboard's variables
    replaced as the plugin does (times as Unix seconds, the interval as seconds)."""
    start, end = int(FROM.timestamp()), int(TO.timestamp())
    sql = re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        lambda m: f"{m[1]} >= toDateTime({start}) AND {m[1]} <= toDateTime({end})",
        sql,
    )
    sql = re.sub(
        r"\$__timeInterval\(([^)]+)\)",
        lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL 3600 second)",
        sql,
    )
    sql = sql.replace("$__fromTime", f"toDateTime({start})").replace(
        "$__toTime", f"toDateTime({end})"
    )
    sql = sql.replace("${user:sqlstring}", "'alice'")
    assert "$" not in sql, sql
    return sql


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(default_dsn(tmp_path_factory.mktemp("deploy")))
    s.migrate()
    rows = [
        RequestRow(ts=T0, request_id="a", user="alice", host="mail.qq.com", decision="block",
                   reason_kind="blocklist", category="webmail"),
        RequestRow(ts=T0 + timedelta(minutes=1), request_id="b", user="alice",
                   host="pan.baidu.com", decision="block", reason_kind="marker",
                   marker_ids=["cn.classified.star"], marker_levels=["national_secret"],
                   upload_bytes=5000),
        RequestRow(ts=T0 + timedelta(minutes=2), request_id="c", user="bob", host="x.example",
                   upload_bytes=700, forwarded_bytes=700, exception_id="exc-1"),
    ]  # fmt: skip
    s.insert_requests([r.values() for r in rows])
    s.insert_console_event([T0, "n", "aud", ["auditor"], "token", "1.2.3.4", "query_requests",
                            "ok", "{}"])  # fmt: skip
    change = incidents.Change(status="investigating", assignee="aud")
    s.insert_incident_events(
        incidents.event_rows(
            "b", change, now=T0, node="n", actor="aud", roles=["auditor"], client_ip="1.2.3.4"
        ),
        "t1",
    )
    yield s
    s.close()


def targets():
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield pytest.param(panel, target, id=panel["title"])


def test_the_dashboard_is_for_the_clickhouse_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "grafana-clickhouse-datasource"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["type"] == "grafana-clickhouse-datasource"
        for target in panel["targets"]:
            assert target["editorType"] == "sql" and target["rawSql"].strip()
            assert "$__timeFilter(" in target["rawSql"] or "system.parts" in target["rawSql"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    needs = ("decision", "blocked users", "blocked hosts", "categories", "upload", "marker",
             "exception", "destinations", "incidents", "user's egress")  # fmt: skip
    for needed in needs:
        assert needed in titles, needed


@pytest.mark.parametrize(("panel", "target"), list(targets()))
def test_every_dashboard_query_runs_and_has_its_panels_shape(store, panel, target):
    sql = grafana(target["rawSql"])
    rows = store.audit_query(sql)  # read-only and bounded, as the auditor role is
    assert rows, f"{panel['title']}: no rows from the sample data"
    described = store.query(f"DESCRIBE ({sql})")
    names = [d[0] for d in described]
    types = [d[1] for d in described]
    if target["queryType"] == "timeseries":
        # time + group + value: the plugin turns the long frame into one series per group.
        assert target["format"] == 0
        assert names[0] == "time" and "DateTime" in types[0], (names, types)
        assert "String" in types[1] and re.match(r"U?Int|Float", types[-1]), types
        assert len(names) == 3
    else:
        assert target["format"] == 1


def statements() -> list[str]:
    text = "\n".join(line.split("--")[0] for line in ROLE_SQL.read_text().splitlines())
    return [s.strip() for s in text.split(";") if s.strip()]


def test_the_auditor_role_reads_every_table_and_writes_none(store):
    sql = statements()
    for statement in sql:  # each parses (the embedded engine has no access control to run it)
        assert store.query(f"EXPLAIN AST {statement}"), statement
    grants = [s for s in sql if s.upper().startswith("GRANT")]
    for g in grants:
        assert re.match(r"GRANT (SELECT\b|egress_auditor TO)", g), g
    granted = {m[1] for g in grants for m in [re.search(r"ON egress\.(\w+)", g)] if m}
    assert set(Store.RETAINED_TABLES) <= granted
    profile = next(s for s in sql if "SETTINGS PROFILE" in s and s.startswith("CREATE"))
    assert "readonly = 1" in profile and "max_result_rows" in profile
    assert "max_execution_time" in profile and "log_queries = 1" in profile
    assert not re.search(r"\b(INSERT|ALTER|DROP|TRUNCATE|ALL)\b", " ".join(grants))
