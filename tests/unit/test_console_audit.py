"""The auditor's side against the real embedded store: the request filters and keyset pages,
migrations 7 and 8 on existing data, one request and its connection, the timeline, the
reports and their charts, DLP incident triage, the event log and the retention proof, through
``make_app`` in-process (pages and JSON API) and through the CLI over that API. Every read is
recorded, every query read-only and bounded."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_console_app import (
    BOOTSTRAP,
    STATUS,
    Clock,
    InProcessConsole,
    accounts_file,  # noqa: F401 (a fixture)
    login,
    page,
)

from egress_guard.cli import main as cli_main
from egress_guard.console.accounts import AccountBook
from egress_guard.console.certs import tls_context
from egress_guard.console.context import ConsoleContext
from egress_guard.requestlog.auditlog import RequestRow
from egress_guard.requestlog.investigation import Investigation
from egress_guard.requestlog.store import (
    COLUMN_NAMES,
    MIGRATIONS,
    READ_COLUMN_NAMES,
    RequestFilter,
    Store,
    StoreError,
    default_dsn,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
T0 = datetime(2026, 11, 18, 1, 0, tzinfo=UTC)


# --- a real store, an in-process console over it ------------------------------------------------


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Iterator[Store]:
    s = Store(default_dsn(tmp_path_factory.mktemp("store")))
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def store(shared_store: Store) -> Store:
    for table in ("requests", "console_events", "incident_events"):
        shared_store.command(f"TRUNCATE TABLE {table}")
    return shared_store


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Any, Any, Path]:
    import ssl

    confdir = tmp_path_factory.mktemp("mitmproxy")
    server = tls_context(confdir, tmp_path_factory.mktemp("certs"), "127.0.0.1")
    ca = confdir / "mitmproxy-ca-cert.pem"
    return server, ssl.create_default_context(cafile=str(ca)), ca


@pytest.fixture
def console(store, tls_files, accounts_file, tmp_path) -> Iterator[InProcessConsole]:  # noqa: F811
    import shutil

    path, tokens = accounts_file
    shutil.copy(path, tmp_path / "accounts.json")
    ctx = ConsoleContext(
        bootstrap_token=BOOTSTRAP,
        accounts=AccountBook(tmp_path / "accounts.json"),
        store=store,
        status=lambda: dict(STATUS),
        node="unit-node",
        clock=Clock(),
        now=lambda: NOW,
        audit=Investigation(store, tz="Asia/Shanghai"),
    )
    c = InProcessConsole(ctx, store, tokens, tls_files[:2])  # type: ignore[arg-type]
    c.ca = tls_files[2]  # type: ignore[attr-defined]
    yield c
    c.close()


def row(i: int, **kw: Any) -> RequestRow:
    base: dict[str, Any] = dict(
        ts=T0 + timedelta(minutes=i),
        request_id=f"r{i:03d}",
        client_ip="10.1.2.3",
        user="alice",
        host="www.example.com",
        port=443,
        scheme="https",
        method="GET",
        path="/",
        status=200,
    )
    return RequestRow(**(base | kw))


def put(store: Store, *rows: RequestRow) -> None:
    store.insert_requests([r.values() for r in rows])


def events(store: Store, action: str | None = None) -> list[dict[str, Any]]:
    names = ("actor", "action", "outcome", "detail", "via")
    got = store.query(
        "SELECT actor, action, outcome, detail, via FROM console_events ORDER BY ts, action"
    )
    rows = [dict(zip(names, r, strict=True)) for r in got]
    return [r for r in rows if action is None or r["action"] == action]


# --- the schema -----------------------------------------------------------------------------------


def test_the_auditor_migrations_apply_to_existing_rows(tmp_path):
    """Migrations 7 and 8 run on a log that already has rows (as an upgraded gateway's):
    tunnel rows get their connection id from their request id, the skip indexes are built
    for the old parts, and the incident events table is there."""
    s = Store(default_dsn(tmp_path))
    try:
        s.command(
            "CREATE TABLE schema_migrations (version UInt32, name String, applied_at "
            "DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY version"
        )
        for version, name, statements in MIGRATIONS[:6]:
            for sql in statements:
                s.command(sql)
            s.command(
                "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
                {"v": version, "n": name},
            )
        # as a gateway from before migration 7 wrote them: without the connection id
        old = COLUMN_NAMES[: COLUMN_NAMES.index("connection_id")]
        s._connected().insert(
            "requests",
            [
                r.values()[: len(old)]
                for r in (
                    row(0, request_id="conn-7/tunnel", kind="tunnel"),
                    row(1, request_id="h-1"),
                )
            ],
            column_names=old,
        )
        assert s.migrate() == [7, 8]
        got = dict(s.query("SELECT request_id, connection_id FROM requests"))
        assert got == {"conn-7/tunnel": "conn-7", "h-1": ""}
        indexes = {r[0] for r in s.query("SELECT name FROM system.data_skipping_indices")}
        assert {"request_id_bloom", "connection_id_bloom"} <= indexes
        assert s.query("SELECT count() FROM incident_events") == [(0,)]
        assert [v for v, *_ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        s.close()


def test_auditor_queries_are_read_only_and_bounded(store):
    put(store, *[row(i) for i in range(5)])
    with pytest.raises(StoreError, match="is a SELECT"):
        store.audit_query("INSERT INTO requests (request_id) VALUES ('x')")
    with pytest.raises(Exception, match=r"(?i)readonly"):  # a SELECT may not change a table
        store.audit_query("SELECT * FROM requests SETTINGS max_threads = 1, readonly = 0")
    with pytest.raises(Exception, match=r"(?i)limit for result exceeded"):
        store.audit_query("SELECT request_id FROM requests", max_rows=3)
    assert len(store.audit_query("SELECT request_id FROM requests", max_rows=5)) == 5
    # The limits were the query's own: the gateway's session still writes and reads freely.
    put(store, row(9))
    assert store.query("SELECT count() FROM requests") == [(6,)]
    assert store.query("SELECT getSetting('readonly'), getSetting('max_result_rows')") == [(0, 0)]


# --- the request filters and keyset pages ---------------------------------------------------------


def test_every_request_filter_is_a_bound_value(store):
    put(
        store,
        row(0, groups=["finance", "staff"], category="webmail", decision="block",
            reason_kind="blocklist", rule_id="webmail.qq", host="mail.qq.com"),
        row(1, client_ip="10.9.0.7", user="bob", reason_kind="destination", decision="block",
            rule_id="gateway.internal", host="10.0.0.1"),
        row(2, client_ip="2001:db8::5", user="", marker_ids=["cn.classified.star"],
            marker_levels=["national_secret"], reason_kind="marker", decision="block",
            upload_bytes=5_000_000),
        row(3, exception_id="exc-42", upload_bytes=2048, kind="websocket", request_id="r003/ws"),
        row(4, client_ip="::ffff:10.1.200.9", kind="connect", method="CONNECT"),
    )  # fmt: skip

    def ids(**kw: Any) -> list[str]:
        return sorted(r["request_id"] for r in store.query_requests(RequestFilter(**kw)))

    assert ids(group="finance") == ["r000"] and ids(group="fin") == []
    assert ids(client="10.1.0.0/16") == ["r000", "r003/ws", "r004"]  # ::ffff:10.1… is 10.1…
    assert ids(client="10.9.0.7") == ["r001"]
    assert ids(client="2001:db8::/32") == ["r002"]
    assert ids(host="qq.com") == ["r000"] and ids(category="webmail") == ["r000"]
    assert ids(reason_kind="destination") == ["r001"]
    assert ids(reason_kind="none") == ["r003/ws", "r004"]
    assert ids(rule_id="gateway.internal") == ["r001"]
    assert ids(marker_level="national_secret") == ["r002"]
    assert ids(exception_id="*") == ids(exception_id="exc-42") == ["r003/ws"]
    assert ids(request_id="r002") == ["r002"] and ids(kind="connect") == ["r004"]
    assert ids(min_upload=2048) == ["r002", "r003/ws"] and ids(min_upload=2049) == ["r002"]
    assert ids(user="alice' OR '1'='1") == [] and ids(rule_id="') OR 1=1 --") == []
    with pytest.raises(ValueError, match="not an address or network"):
        store.query_requests(RequestFilter(client="10.1.2.0/33"))


def test_keyset_pages_cover_every_row_once_even_with_equal_times(store):
    # 25 rows, five to each millisecond: a cursor of the time alone would lose or repeat.
    put(
        store,
        *[row(0, ts=T0 + timedelta(seconds=i // 5), request_id=f"k{i:02d}") for i in range(25)],
    )
    seen: list[str] = []
    after = None
    for _ in range(10):
        page_rows = store.query_requests(RequestFilter(limit=7, after=after))
        seen += [r["request_id"] for r in page_rows]
        if len(page_rows) < 7:
            break
        after = (page_rows[-1]["ts"], page_rows[-1]["request_id"])
    assert len(seen) == 25 and len(set(seen)) == 25
    everything = [r["request_id"] for r in store.query_requests(RequestFilter(limit=100))]
    assert seen == everything  # the same order as one big page


def test_a_page_reads_the_newest_window_that_holds_it(store):
    """Without a user the newest hour, day, week, month are tried before the whole range: the
    page is the same as one sorted over everything, and a sparse filter still finds its rows."""
    now = datetime.now(UTC)
    ages = [timedelta(minutes=10), timedelta(hours=5), timedelta(days=3), timedelta(days=20),
            timedelta(days=60), timedelta(days=150)]  # fmt: skip
    put(store, *[row(i, ts=now - age, request_id=f"w{i}") for i, age in enumerate(ages)])
    put(store, row(9, ts=now - timedelta(days=90), request_id="rare", rule_id="only.once"))

    def ids(**kw: Any) -> list[str]:
        return [r["request_id"] for r in store.query_requests(RequestFilter(**kw))]

    everything = ["w0", "w1", "w2", "w3", "w4", "rare", "w5"]
    for limit in range(1, 9):
        assert ids(limit=limit) == everything[:limit], limit
    assert ids(rule_id="only.once", limit=1) == ["rare"]
    assert ids(limit=2, after=(now - timedelta(days=3), "w2")) == ["w3", "w4"]
    (w1,) = store.query_requests(RequestFilter(request_id="w1"))  # its ts: naive, in UTC
    since = now - timedelta(days=100)
    assert ids(limit=2, since=since, after=(w1["ts"], "w1")) == ["w2", "w3"]
    assert ids(limit=3, since=now - timedelta(days=30)) == ["w0", "w1", "w2"]
    assert ids(limit=9, until=now - timedelta(days=1)) == ["w2", "w3", "w4", "rare", "w5"]


def test_the_request_log_pages_through_with_next_links_never_an_offset(console, store):
    put(store, *[row(i, decision="block" if i % 3 == 0 else "allow") for i in range(12)])
    aud = console.tokens["auditor"]
    shown = console.call("/requests?limit=5&user=alice", aud).body.decode()
    assert "offset" not in shown.lower()
    nxt = re.search(r'<a id="next" href="([^"]+)"', shown).group(1).replace("&amp;", "&")
    args = urllib.parse.parse_qs(nxt.partition("?")[2])
    assert args["user"] == ["alice"] and args["limit"] == ["5"] and args["after"]
    assert 'class="d-block' in shown  # blocked rows stand out
    second = console.call(nxt, aud).body.decode()
    assert "r006" in second and "r007" not in second and 'id="first"' in second
    api = console.call("/api/v1/requests?limit=5", aud).json()
    assert api["count"] == 5 and api["next"]
    rest = console.call(f"/api/v1/requests?limit=5&after={api['next']}", aud).json()
    assert [r["request_id"] for r in rest["rows"]] == ["r006", "r005", "r004", "r003", "r002"]
    bad = console.call("/api/v1/requests?after=yesterday", aud)
    assert bad.status == 400 and "cursor" in bad.json()["error"]


# --- one request and its connection --------------------------------------------------------------


def https_visit(start: int, cid: str = "", **kw: Any) -> list[RequestRow]:
    """A blocked HTTPS visit as the gateway logs it: the CONNECT (200, block), the request
    inside the tunnel (403 block page) and a tunnel row."""
    common = dict(host="mail.qq.com", decision="block", reason_kind="blocklist",
                  rule_id="webmail.qq", category="webmail") | kw  # fmt: skip
    return [
        row(start, request_id=f"c{start}", kind="connect", method="CONNECT", scheme="http",
            **common),
        row(start + 1, request_id=f"h{start}", kind="http", status=403, tls_intercepted=True,
            **common),
        row(start + 2, request_id=f"{cid or 'conn' + str(start)}/tunnel", kind="tunnel",
            method="CONNECT", scheme="tls", status=0, error="client closed", **common),
    ]  # fmt: skip


def test_a_connect_and_the_requests_in_its_tunnel_show_as_one_connection(console, store):
    put(store, *https_visit(0), row(1, request_id="other", host="example.org", scheme="http"))
    aud = console.tokens["auditor"]
    shown = console.call("/requests?host=mail.qq.com", aud).body.decode()
    head = re.search(r'<tr class="conn-head">(.*?)</tr>', shown, re.S).group(1)
    assert "CONNECT mail.qq.com:443 from 10.1.2.3" in head and "2 rows on this page" in head
    assert "matched by client, host and time" in head  # today's rows carry no connection id
    group = shown.split('<tbody class="conn">')[1].split("</tbody>")[0]
    assert group.index(">c0<") < group.index(">h0<")  # the CONNECT first, then what it carried
    assert "proxy&#x27;s answer" in group or "proxy's answer" in group  # why the CONNECT row

    detail = console.call("/request?id=h0", aud).body.decode()
    table = detail.split('id="detail"')[1].split("</table>")[0]
    assert re.findall(r"<tr><th>([^<]+)</th>", table) == list(READ_COLUMN_NAMES)
    assert "forwarded_bytes" in table and "UTC 2026-11-18T01:01:00.000Z" in table
    assert 'id="approximate"' in detail
    conn = detail.split('id="connection"')[1]
    assert conn.index(">c0<") < conn.index(">h0<")
    assert "block page" in conn and "intercepted and judged on its own" in conn
    links = re.search(r'<p id="links">(.*?)</p>', detail, re.S).group(1)
    assert "/timeline?user=alice" in links and "rule=webmail.qq" in links

    # With connection ids (the runtime writes the client connection's id on every row):
    # grouped by it, the tunnel row too, whatever the addresses say.
    store.command("TRUNCATE TABLE requests")
    visit = https_visit(10, cid="cc-1")
    for r in visit[:2]:
        r.request_id += "-x"
    store.insert_requests([v.values() for v in visit], "")
    store.command("ALTER TABLE requests UPDATE connection_id = 'cc-1' WHERE kind != 'tunnel' "
                  "SETTINGS mutations_sync = 1")  # fmt: skip
    got = console.call("/api/v1/request?id=h10-x", aud).json()
    assert got["connection_id"] == "cc-1" and got["approximate"] is False
    assert [r["request_id"] for r in got["rows"]] == ["c10-x", "h10-x", "cc-1/tunnel"]
    assert all(r["why"] for r in got["rows"])
    assert console.call("/api/v1/request?id=nope", aud).status == 404
    reads = [json.loads(e["detail"]) for e in events(store, "query_request")]
    assert {"request_id": "h10-x"} in reads and {"request_id": "nope"} in reads


# --- the timeline ---------------------------------------------------------------------------------


def test_the_timeline_shows_one_persons_egress_day_by_day(console, store):
    put(
        store,
        row(0, host="news.example.com"),
        row(1, host="pan.baidu.com", method="POST", upload_bytes=3_000_000,
            forwarded_bytes=3_000_000, exception_id="exc-7", category="cloud_drive"),
        row(2, host="pan.baidu.com", method="POST", upload_bytes=9000, decision="block",
            reason_kind="marker", marker_ids=["cn.classified.star"],
            marker_levels=["national_secret"], status=403),
        row(60 * 24, host="mail.qq.com", decision="block", reason_kind="blocklist"),
        row(3, user="bob", host="secret.example"),
    )  # fmt: skip
    aud = console.tokens["auditor"]
    got = console.call("/api/v1/timeline?user=alice&since=2026-11-17&until=2026-11-20", aud).json()
    assert got["timezone"] == "Asia/Shanghai"
    assert [(d["day"], d["requests"], d["blocked"]) for d in got["days"]] == [
        ("2026-11-18", 3, 1),
        ("2026-11-19", 1, 1),
    ]
    assert got["days"][0]["upload_bytes"] == 3_009_000 and got["days"][0]["marker_hits"] == 1
    assert got["days"][0]["exceptions"] == ["exc-7"]
    assert [s["host"] for s in got["sites"]] == [
        "news.example.com", "pan.baidu.com", "mail.qq.com",
    ]  # fmt: skip
    # Notable rows only by default (blocks, uploads, markers, exceptions), in time order.
    assert [e["request_id"] for e in got["events"]] == ["r001", "r002", "r1440"]
    assert "secret.example" not in json.dumps(got)
    every = console.call("/api/v1/timeline?user=alice&since=2026-11-17&all=1", aud).json()
    assert [e["request_id"] for e in every["events"]][:2] == ["r000", "r001"]

    shown = console.call("/timeline?user=alice&since=2026-11-17&until=2026-11-20", aud)
    text = shown.body.decode()
    assert shown.status == 200 and 'id="days"' in text and "2026-11-18" in text
    assert "exc-7" in text and "national_secret" in text and "2.9 MiB" in text
    (ev,) = events(store, "query_timeline")[-1:]
    assert json.loads(ev["detail"])["subject"] == "alice"
    assert console.call("/api/v1/timeline", aud).status == 400  # whose?


def test_the_timeline_cli(console, store):
    put(store, row(0, upload_bytes=4096, method="POST"), row(1))
    result = CliRunner().invoke(
        cli_main,
        ["audit", "timeline", "alice", "--since", "2026-11-17", "--until", "2026-11-20",
         *cli_args(console)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2026-11-18" in result.output and "4 KiB" in result.output and "r000" in result.output


def cli_args(console: InProcessConsole) -> list[str]:
    return [
        "--admin", f"127.0.0.1:{console.port}", "--token", console.tokens["auditor"],
        "--ca-cert", str(console.ca),  # type: ignore[attr-defined]
    ]  # fmt: skip


# --- reports --------------------------------------------------------------------------------------


HOSTILE = '"><script>alert(1)</script>'


def report_rows() -> list[RequestRow]:
    rows = []
    for i in range(40):
        rows.append(
            row(i * 30, user=("alice", "bob", HOSTILE)[i % 3], host=f"h{i % 4}.example.com",
                decision="block" if i % 2 else "allow", reason_kind="blocklist" if i % 2 else "",
                category="webmail" if i % 2 else "", upload_bytes=1000 * i,
                marker_levels=["internal"] if i % 5 == 0 else [],
                marker_ids=["cn.internal"] if i % 5 == 0 else [],
                exception_id="exc-1" if i % 7 == 0 else "")
        )  # fmt: skip
    return rows


def test_reports_are_drawn_by_the_gateway_and_escaped(console, store):
    put(store, *report_rows())
    aud = console.tokens["auditor"]
    rep = console.call("/api/v1/report?since=2026-11-17&until=2026-11-20", aud).json()
    assert rep["totals"]["requests"] == 40 and rep["totals"]["blocked"] == 20
    assert rep["bucket"] == "day"
    assert sum(r["requests"] for r in rep["requests_over_time"]) == 40
    assert {r["key"] for r in rep["top_blocked_users"]} == {"alice", "bob", HOSTILE}
    assert rep["top_blocked_categories"] == [{"key": "webmail", "value": 20}]
    assert sum(r["hits"] for r in rep["marker_hits_over_time"]) == 8
    assert rep["exception_usage"][0]["exception_id"] == "exc-1"
    assert rep["exception_usage"][0]["requests"] == 6
    assert len(rep["busiest_destinations"]) == 4
    hourly = console.call("/api/v1/report?since=2026-11-18&until=2026-11-19", aud).json()
    assert hourly["bucket"] == "hour"

    shown = console.call("/reports?since=2026-11-17&until=2026-11-20", aud).body.decode()
    for section in ("r-requests", "r-top_blocked_users", "r-uploads", "r-markers",
                    "r-exceptions", "r-destinations"):  # fmt: skip
        chart = shown.split(f'id="{section}"')[1].split("</section>")[0]
        assert "<svg" in chart and "no data" not in chart, section
    assert "<script>" not in shown and "&lt;script&gt;" in shown
    assert "<script" not in shown.lower() and "http://" not in shown.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )  # nothing fetched from anywhere
    assert events(store, "query_report")


def test_the_report_cli_formats(console, store):
    put(store, *report_rows())
    base = ["audit", "report", "--since", "2026-11-17", "--until", "2026-11-20"]
    runner = CliRunner()
    table = runner.invoke(cli_main, [*base, *cli_args(console)])
    assert table.exit_code == 0, table.output
    assert "top_blocked_users" in table.output and "exc-1" in table.output
    as_json = runner.invoke(cli_main, [*base, "--format", "json", *cli_args(console)])
    assert json.loads(as_json.output)["totals"]["requests"] == 40
    as_csv = runner.invoke(cli_main, [*base, "--format", "csv", *cli_args(console)])
    lines = as_csv.output.splitlines()
    assert lines[0] == "report,time,key,value"
    assert any(line.startswith("busiest_destinations,,h") for line in lines)


# --- DLP incidents --------------------------------------------------------------------------------


def incident_rows() -> list[RequestRow]:
    return [
        row(0, request_id="alert-old", decision="alert", reason_kind="marker",
            marker_ids=["cn.internal"], marker_levels=["internal"], forwarded_bytes=100),
        row(5, request_id="block-new", decision="block", reason_kind="marker", user="bob",
            marker_ids=["cn.classified.star"], marker_levels=["national_secret"], status=403),
        row(1, request_id="block-old", decision="block", reason_kind="marker",
            marker_ids=["cn.trade.grade.star"], marker_levels=["trade_secret"], status=403),
        row(2, request_id="unscannable", decision="block", reason_kind="marker",
            rule_id="scan.unscannable", error="unscannable: encrypted archive", status=403),
        row(3, request_id="logged-only", reason_kind="marker", marker_ids=["x"],
            marker_levels=["low"]),
        row(4, request_id="plain-block", decision="block", reason_kind="blocklist"),
    ]  # fmt: skip


def test_the_incident_queue_is_by_severity_then_age(console, store):
    put(store, *incident_rows())
    aud = console.tokens["auditor"]
    got = console.call("/api/v1/incidents", aud).json()
    order = [(r["request_id"], r["severity"], r["status"]) for r in got["rows"]]
    assert order == [
        ("block-old", "high", "new"),
        ("block-new", "high", "new"),
        ("alert-old", "medium", "new"),
        ("unscannable", "low", "new"),
    ]
    shown = console.call("/incidents", aud).body.decode()
    assert 'id="queue"' in shown and shown.index("block-old") < shown.index("unscannable")
    assert "national_secret" in shown and "cn.classified.star" in shown
    assert console.call("/incident?id=plain-block", aud).status == 404  # not an incident


def test_triage_appends_and_the_history_is_kept(console, store):
    put(store, *incident_rows())
    s = login(console, "aud")
    form = page(console, "/incident?id=block-new", s)
    assert 'id="update"' in form and '<option value="aud">aud</option>' in form

    def post(**fields: str) -> Any:
        body = urllib.parse.urlencode({"_xsrf": s.xsrf_field, "id": "block-new", **fields})
        return console.call(
            "/incident",
            method="POST",
            body=body.encode(),
            headers={"Cookie": s.cookie, "Content-Type": "application/x-www-form-urlencoded"},
        )

    assert post(status="investigating", assignee="aud", comment="asked bob").status == 303
    refused = post(status="resolved")  # without a classification
    assert refused.status == 400 and b"resolved with a classification" in refused.body
    assert post(assignee="ann").status == 400  # an admin, not an auditor
    assert post(classification="sideways").status == 400
    # The API, as the CLI calls it.
    api = console.call(
        "/api/v1/incident",
        console.tokens["auditor"],
        method="POST",
        body=json.dumps(
            {"id": "block-new", "status": "resolved", "classification": "true_positive",
             "comment": "confirmed <b>leak</b> attempt"}
        ).encode(),
    )  # fmt: skip
    assert api.status == 200, api.body
    found = api.json()
    assert found["status"] == "resolved" and found["classification"] == "true_positive"
    assert found["assignee"] == "aud"
    assert [(e["kind"], e["value"], e["actor"]) for e in found["history"]] == [
        ("assign", "aud", "aud"),
        ("status", "investigating", "aud"),
        ("comment", "", "aud"),
        ("classify", "true_positive", "aud"),
        ("status", "resolved", "aud"),
        ("comment", "", "aud"),
    ]
    shown = page(console, "/incident?id=block-new", s)
    assert "asked bob" in shown and "&lt;b&gt;leak&lt;/b&gt;" in shown
    queue = console.call("/api/v1/incidents", console.tokens["auditor"]).json()["rows"]
    assert queue[-1]["request_id"] == "block-new"  # resolved: after every open one
    updates = events(store, "update_incident")
    # Refused after the incident was read (resolve without a classification, a classification
    # that does not exist): on record; an assignee who is no auditor is refused before.
    assert [e["outcome"] for e in updates] == ["ok", "ok", "refused", "ok", "refused", "ok"]
    assert store.query("SELECT count() FROM incident_events") == [(6,)]  # nothing rewritten
    assert console.call(
        "/api/v1/incident", console.tokens["auditor"], method="POST",
        body=json.dumps({"id": "plain-block", "comment": "x"}).encode(),
    ).status == 404  # fmt: skip


def test_the_incidents_cli(console, store):
    put(store, *incident_rows())
    runner = CliRunner()
    listed = runner.invoke(cli_main, ["audit", "incidents", "list", *cli_args(console)])
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if line.strip()]
    assert lines[1].startswith("high") and "block-old" in lines[1]
    updated = runner.invoke(
        cli_main,
        ["audit", "incidents", "update", "alert-old", "--status", "resolved",
         "--classification", "expected_activity", "--comment", "approved transfer",
         *cli_args(console)],
    )  # fmt: skip
    assert updated.exit_code == 0, updated.output
    shown = runner.invoke(cli_main, ["audit", "incidents", "show", "alert-old", *cli_args(console)])
    assert "resolved" in shown.output and "approved transfer" in shown.output
    assert "internal" in shown.output
    bad = runner.invoke(cli_main, ["audit", "incidents", "update", "alert-old", *cli_args(console)])
    assert bad.exit_code != 0 and "nothing to change" in bad.output


# --- the event log and retention ------------------------------------------------------------------


def test_the_event_log_is_searchable_and_shows_fields_not_json(console, store):
    aud = console.tokens["auditor"]
    for user in ("alice", "bob", "carol"):
        assert console.call(f"/api/v1/requests?user={user}", aud).status == 200
    shown = console.call("/events?contains=bob", aud).body.decode()
    table = shown.split('id="events"')[1]
    assert "<b>user</b>: bob" in table and "alice" not in table
    assert "{&quot;" not in table and '{"' not in table  # fields, not raw JSON
    paged = console.call("/events?action=query_requests&limit=2", aud).body.decode()
    nxt = re.search(r'<a id="next" href="([^"]+)"', paged).group(1).replace("&amp;", "&")
    rest = console.call(nxt, aud).body.decode().split('id="events"')[1]
    assert rest.count("<tr") == 2  # the third query and the read of the first page
    # The old JSON API still answers as before.
    old = console.call("/api/v1/console-events?actor=aud", console.tokens["admin"]).json()
    assert list(old) == ["rows", "count"] and old["count"] >= 3


def test_retention_shows_ttl_months_and_gaps(console, store):
    months = [datetime(2026, m, 10, tzinfo=UTC) for m in (6, 7, 9, 10, 11)]
    put(store, *[row(i, ts=t, request_id=f"m{i}") for i, t in enumerate(months)])
    got = console.call("/api/v1/retention", console.tokens["admin"]).json()
    (req,) = [t for t in got["tables"] if t["table"] == "requests"]
    assert req["ttl_months"] == 6 and "toIntervalMonth(6)" in req["ttl"]
    assert req["rows"] == 5 and req["oldest"].startswith("2026-06-10")
    assert [m["month"] for m in req["months"]] == ["202606", "202607", "202609", "202610", "202611"]
    assert all(m["bytes"] > 0 for m in req["months"])
    assert [m["month"] for m in req["last_six_months"]] == [
        "202606", "202607", "202608", "202609", "202610", "202611",
    ]  # fmt: skip
    assert req["gaps"] == ["202608"] and req["all_six_present"] is False
    shown = console.call("/retention", console.tokens["auditor"]).body.decode()
    assert "2026-08 ✗" in shown and "missing after the log started: 202608" in shown
    cli = CliRunner().invoke(cli_main, ["audit", "retention", *cli_args(console)])
    assert cli.exit_code == 0, cli.output
    assert "requests" in cli.output and "MISSING 2026-08" in cli.output


def test_a_store_that_cannot_record_runs_no_auditor_query(console, store):
    put(store, *incident_rows())
    aud = console.tokens["auditor"]
    real = store.insert_console_event

    def failing(row: Any) -> None:
        raise StoreError("down")

    store.insert_console_event = failing  # type: ignore[method-assign]
    try:
        paths = (
            "/api/v1/incidents", "/api/v1/report", "/api/v1/retention",
            "/api/v1/timeline?user=alice", "/api/v1/request?id=block-old",
            "/timeline?user=alice", "/reports", "/incidents", "/events", "/retention",
        )  # fmt: skip
        for path in paths:
            reply = console.call(path, aud)
            assert reply.status == 503, path
        post = console.call(
            "/api/v1/incident", aud, method="POST",
            body=json.dumps({"id": "block-old", "comment": "x"}).encode(),
        )  # fmt: skip
        assert post.status == 503
    finally:
        store.insert_console_event = real  # type: ignore[method-assign]
    assert store.query("SELECT count() FROM incident_events") == [(0,)]


def test_every_new_page_carries_no_script_and_posts_with_an_xsrf_token(console, store):
    put(store, *incident_rows(), *https_visit(20))
    s = login(console, "li.all")
    for path in ("/requests?since=30d", "/request?id=h20", "/timeline?user=alice&since=30d",
                 "/reports?since=30d", "/incidents", "/incident?id=block-old", "/events",
                 "/retention", "/request", "/timeline"):  # fmt: skip
        text = page(console, path, s)
        assert "<script" not in text.lower(), path
        assert not re.search(r"<[^>]+\son[a-z]+=", text, re.I), path
        for form in re.findall(r'<form\b[^>]*\bmethod="post".*?</form>', text, re.S | re.I):
            assert re.search(r'<input type="hidden" name="_xsrf" value="[^"]+"', form), path
