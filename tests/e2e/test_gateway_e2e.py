"""End to end: the real gateway process, a loopback upstream, curl trusting the exported CA,
and the real embedded ClickHouse behind the admin API."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

import pytest

from harness import PAYLOAD, GatewayProcess, curl
from support import policy_copy

pytestmark = pytest.mark.slow

E2E_RULES = """\
categories:
  webmail:
    rules:
      # The upstream under its other name: a block here must never reach it.
      - id: webmail.e2e-localhost
        service: "Test: localhost"
        exact_hosts: [localhost]
      # A path rule on a shared host: only /mail is refused.
      - id: webmail.e2e-shared-path
        service: "Test: 127.0.0.1/mail"
        exact_hosts: [127.0.0.1]
        paths: [/mail]
"""


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return policy_copy(tmp_path_factory.mktemp("policy"), {"e2e.yaml": E2E_RULES})


@pytest.fixture(scope="module")
def gw(tmp_path_factory, policy_dir, upstream):
    g = GatewayProcess(tmp_path_factory.mktemp("gw"), policy_dir, upstream.ca_path).start()
    yield g
    g.stop()


def assert_block_page(reply, rule_id, category):
    assert reply.status == 403, (reply.status, reply.stderr, reply.body[:300])
    page = reply.body.decode()
    assert rule_id in page and category in page
    assert "根据公司规定" in page and "Access blocked by company policy" in page
    request_id = reply.headers["x-egress-guard-request-id"]
    assert request_id in page
    assert reply.headers["x-egress-guard-rule"] == rule_id
    return request_id


def test_startup_banner_names_listeners_policy_and_store(gw):
    text = gw.text()
    assert f"127.0.0.1:{gw.proxy_port}" in text
    assert f"https://127.0.0.1:{gw.admin_port}/ and API /api/v1/" in text
    assert f"http://127.0.0.1:{gw.metrics_port}/metrics" in text
    assert "webmail:" in text and "cloud_drive:" in text
    assert f"chdb://{gw.data_dir.resolve()}/clickhouse (embedded)" in text


def test_blocked_plain_http_never_reaches_upstream(gw, upstream):
    reply = curl(f"http://localhost:{upstream.http_port}/inbox-plain", gw.proxy)
    assert_block_page(reply, "webmail.e2e-localhost", "webmail")
    assert "/inbox-plain" not in upstream.paths()


def test_blocked_https_gets_block_page_inside_tls_and_never_reaches_upstream(gw, upstream):
    reply = curl(f"https://localhost:{upstream.https_port}/inbox-tls", gw.proxy, gw.ca_pem())
    assert_block_page(reply, "webmail.e2e-localhost", "webmail")
    assert "/inbox-tls" not in upstream.paths()


@pytest.mark.parametrize(
    ("url", "rule_id", "category"),
    [
        ("https://mail.qq.com/cgi-bin/frame_html", "webmail.qq-mail", "webmail"),
        ("http://mail.163.com/", "webmail.netease-163", "webmail"),
        ("https://pan.baidu.com/disk/home", "cloud_drive.baidu-netdisk", "cloud_drive"),
        ("https://drive.google.com/drive/my-drive", "cloud_drive.google-drive", "cloud_drive"),
        ("https://www.icloud.com/mail/", "webmail.icloud-mail", "webmail"),
    ],
)
def test_real_blocked_services_answered_without_any_upstream(gw, url, rule_id, category):
    # This machine has no route to these hosts: an attempt to connect (or resolve) would end
    # in a 502, so a 403 block page proves the gateway never tried.
    reply = curl(url, gw.proxy, gw.ca_pem())
    assert_block_page(reply, rule_id, category)


def test_allowed_hosts_pass_byte_for_byte(gw, upstream):
    for url in (
        f"http://127.0.0.1:{upstream.http_port}/payload",
        f"https://127.0.0.1:{upstream.https_port}/payload",
    ):
        reply = curl(url, gw.proxy, gw.ca_pem())
        assert reply.status == 200, reply.stderr
        assert reply.body == PAYLOAD
    body = bytes(range(256)) * 400
    reply = curl(
        f"https://127.0.0.1:{upstream.https_port}/upload",
        gw.proxy,
        gw.ca_pem(),
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert reply.status == 200
    assert f'"sha256": "{hashlib.sha256(body).hexdigest()}"' in reply.body.decode()


@pytest.mark.parametrize("path", ["/mail/inbox", "/MAIL/", "/%6dail/x", "//mail", "/a/../mail"])
def test_path_rule_decided_inside_https(gw, upstream, path):
    reply = curl(
        f"https://127.0.0.1:{upstream.https_port}{path}",
        gw.proxy,
        gw.ca_pem(),
        extra=("--path-as-is",),
    )
    assert_block_page(reply, "webmail.e2e-shared-path", "webmail")
    assert not any("mail" in p.lower() or "%6d" in p for p in upstream.paths())


def test_other_paths_on_the_shared_host_pass(gw, upstream):
    reply = curl(f"https://127.0.0.1:{upstream.https_port}/calendar", gw.proxy, gw.ca_pem())
    assert reply.status == 200
    assert "/calendar" in upstream.paths()


def test_host_header_naming_a_blocked_site_is_refused(gw, upstream):
    reply = curl(
        f"http://127.0.0.1:{upstream.http_port}/smuggled", gw.proxy, headers={"Host": "mail.qq.com"}
    )
    assert_block_page(reply, "webmail.qq-mail", "webmail")
    assert "/smuggled" not in upstream.paths()


def test_client_that_cannot_be_intercepted_sees_tunnel_closed_and_is_logged(gw, upstream):
    # A pinned app: it does not trust the gateway CA, so the handshake fails.
    reply = curl(f"https://localhost:{upstream.https_port}/pinned", gw.proxy, None)
    assert reply.status == 0 and reply.exit_code != 0
    assert "/pinned" not in upstream.paths()
    rows = gw.wait_rows(lambda rs: any(r["kind"] == "tunnel" for r in rs), "--host", "localhost")
    tunnel = [r for r in rows if r["kind"] == "tunnel"]
    assert tunnel, rows
    assert tunnel[0]["decision"] == "block"
    assert tunnel[0]["rule_id"] == "webmail.e2e-localhost"
    assert "TLS" in tunnel[0]["error"]


def test_every_request_is_a_row_with_decision_and_rule(gw, upstream):
    blocked = curl(f"http://localhost:{upstream.http_port}/logged-block", gw.proxy)
    block_id = assert_block_page(blocked, "webmail.e2e-localhost", "webmail")
    tls_blocked = curl("https://pan.baidu.com/logged", gw.proxy, gw.ca_pem())
    tls_block_id = assert_block_page(tls_blocked, "cloud_drive.baidu-netdisk", "cloud_drive")
    allowed = curl(
        f"https://127.0.0.1:{upstream.https_port}/logged-allow?q=1",
        gw.proxy,
        gw.ca_pem(),
        headers={"User-Agent": "e2e-agent"},
    )
    assert allowed.status == 200

    def ready(rows):
        ids = {r["request_id"] for r in rows}
        return {block_id, tls_block_id} <= ids and any(r["path"] == "/logged-allow" for r in rows)

    rows = gw.wait_rows(ready)
    by_id = {r["request_id"]: r for r in rows}
    row = by_id[block_id]
    assert (
        row["decision"],
        row["reason_kind"],
        row["rule_id"],
        row["category"],
        row["status"],
        row["kind"],
        row["scheme"],
        row["host"],
        row["method"],
        row["node"],
    ) == (
        "block",
        "blocklist",
        "webmail.e2e-localhost",
        "webmail",
        403,
        "http",
        "http",
        "localhost",
        "GET",
        "e2e-node",
    )
    row = by_id[tls_block_id]
    assert (row["decision"], row["rule_id"], row["scheme"], row["tls_intercepted"]) == (
        "block",
        "cloud_drive.baidu-netdisk",
        "https",
        True,
    )
    connects = [r for r in rows if r["kind"] == "connect" and r["host"] == "pan.baidu.com"]
    assert connects and connects[0]["decision"] == "block"
    (allow,) = [r for r in rows if r["path"] == "/logged-allow"]
    assert (allow["decision"], allow["status"], allow["query"], allow["user_agent"]) == (
        "allow",
        200,
        "q=1",
        "e2e-agent",
    )
    assert allow["response_bytes"] > 0 and allow["duration_ms"] >= 0
    assert allow["client_ip"] == "127.0.0.1"


def test_audit_query_filters_and_formats(gw, upstream):
    curl(f"http://localhost:{upstream.http_port}/for-query", gw.proxy)
    gw.wait_rows(lambda rs: any(r["path"] == "/for-query" for r in rs))
    blocks = gw.query("--decision", "block")
    assert blocks and all(r["decision"] == "block" for r in blocks)
    qq = gw.query("--host", "qq.com")
    assert qq and all(r["host"].endswith("qq.com") for r in qq)
    assert gw.query("--user", "nobody-at-all") == []
    assert gw.query("--since", "2000-01-01", "--until", "2000-01-02") == []
    assert len(gw.query("--limit", "2")) == 2
    csv_out = gw.audit("--format", "csv", "--host", "localhost").stdout
    assert csv_out.splitlines()[0].startswith("ts,node,request_id,")
    assert "/for-query" in csv_out
    table = gw.audit("--host", "localhost").stdout
    assert table.splitlines()[0].split()[:3] == ["ts", "user", "client_ip"]
    bad = gw.audit("--since", "yesterday-ish", check=False)
    assert bad.returncode != 0 and "not a time" in bad.stderr


API_PATHS = [
    "/api/v1/requests",
    "/api/v1/export",
    "/api/v1/status",
    "/api/v1/whoami",
    "/api/v1/console-events",
]


@pytest.mark.parametrize("path", [*API_PATHS, "/api/v1/no/such/thing"])
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_admin_api_never_answers_unauthenticated(gw, path, token):
    reply = gw.admin_call(path, token)
    assert reply.status == 401
    assert b"rows" not in reply.body and b"policy" not in reply.body


@pytest.mark.parametrize("path", ["/", "/requests", "/requests?user=alice", "/no/such/page"])
def test_console_pages_send_strangers_to_the_login_page(gw, path):
    reply = gw.admin_call(path)
    assert reply.status == 302 and reply.headers["location"] == "/login"
    assert reply.body == b""


def test_metrics_count_requests_by_decision(gw, upstream):
    curl(f"http://localhost:{upstream.http_port}/for-metrics", gw.proxy)
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'egress_guard_requests_total{category="webmail",decision="block"' in text
    assert 'egress_guard_policy_rules{category="cloud_drive"}' in text


def test_plain_http_inside_a_connect_tunnel_is_still_decided(gw, upstream):
    # curl -p: CONNECT first, then plain HTTP inside the tunnel (no TLS to intercept).
    reply = curl(
        f"http://localhost:{upstream.http_port}/tunnelled", gw.proxy, extra=("--proxytunnel",)
    )
    assert_block_page(reply, "webmail.e2e-localhost", "webmail")
    assert "/tunnelled" not in upstream.paths()


def test_failed_request_is_logged_with_its_error(gw):
    from harness import free_port

    closed = free_port()  # nothing listens there
    reply = curl(f"http://127.0.0.1:{closed}/nobody-home", gw.proxy)
    assert reply.status == 502
    rows = gw.wait_rows(lambda rs: any(r["path"] == "/nobody-home" for r in rs))
    (row,) = [r for r in rows if r["path"] == "/nobody-home"]
    assert row["decision"] == "allow" and row["reason_kind"] == "error"
    assert row["status"] == 502 and row["error"]


def test_shutdown_flushes_the_queue_and_table_keeps_six_months(gw, upstream):
    """Last in this module: stop the gateway and read the store directly."""
    for i in range(20):
        curl(f"http://localhost:{upstream.http_port}/final-{i}", gw.proxy)
    assert gw.stop() == 0
    assert "Traceback" not in gw.text(), gw.text()
    from egress_guard.requestlog.store import Store, default_dsn

    store = Store(default_dsn(gw.data_dir))
    try:
        final = store.query("SELECT count() FROM requests WHERE startsWith(path, '/final-')")
        assert final == [(20,)]
        assert store.retention_months() >= 6
        ((ttl,),) = store.query(
            "SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
            "AND name = 'requests'"
        )
        assert "TTL toDateTime(ts) + toIntervalMonth(6)" in ttl
        assert "PARTITION BY toYYYYMM(ts)" in ttl
    finally:
        store.close()
