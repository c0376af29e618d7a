"""End to end: starting with a bad policy, hot reload, env-var configuration, proxy-auth
identity, and the same addons loaded into plain mitmdump."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from harness import GatewayProcess, Upstream, cli, curl, egress_guard_bin, free_port
from support import policy_copy

pytestmark = pytest.mark.slow

BAD_RULE = """\
categories:
  webmail:
    rules:
      - id: webmail.bad
        hosts: [https://mail.example.com/inbox]
"""


@pytest.fixture
def upstream(tmp_path):
    (tmp_path / "up").mkdir()
    up = Upstream(tmp_path / "up").start()
    yield up
    up.stop()


@pytest.fixture
def policy_dir(tmp_path):
    return policy_copy(tmp_path)


def test_run_refuses_an_invalid_policy_naming_file_line_and_field(tmp_path, policy_dir):
    (policy_dir / "zz-bad.yaml").write_text(BAD_RULE)
    result = subprocess.run(
        [
            egress_guard_bin(),
            "run",
            "--policies",
            str(policy_dir),
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid policy, not starting" in result.stderr
    assert f"{policy_dir / 'zz-bad.yaml'}:5: categories.webmail.rules[0].hosts[0]:" in result.stderr
    assert "Traceback" not in result.stderr

    check = cli("check-policy", str(policy_dir), check=False)
    assert check.returncode == 2 and "zz-bad.yaml:5:" in check.stderr
    (policy_dir / "zz-bad.yaml").unlink()
    check = cli("check-policy", str(policy_dir))
    assert "webmail" in check.stdout and "cloud_drive" in check.stdout


def test_env_configuration_proxyauth_identity_and_hot_reload(tmp_path, policy_dir, upstream):
    gw = GatewayProcess(
        tmp_path / "data",
        policy_dir,
        upstream.ca_path,
        via="env",
        extra_args=("--set", "proxyauth=alice:s3cret"),
    ).start()
    try:
        url = f"http://127.0.0.1:{upstream.http_port}/newly-blocked"
        auth = ("--proxy-user", "alice:s3cret")
        assert curl(url, gw.proxy, extra=auth).status == 200
        assert curl(url, gw.proxy).status == 407  # proxyauth is mitmproxy's own
        assert curl("http://mail.qq.com/", gw.proxy).status == 407  # who first, then policy

        # Hot reload: a new rule file takes effect without a restart.
        (policy_dir / "extra.yaml").write_text(
            "categories:\n  cloud_drive:\n    rules:\n      - id: cloud_drive.e2e-new\n"
            "        exact_hosts: [127.0.0.1]\n        paths: [/newly-blocked]\n"
        )
        deadline = time.monotonic() + 20
        while (reply := curl(url, gw.proxy, extra=auth)).status != 403:
            assert time.monotonic() < deadline, "reload not picked up"
            time.sleep(0.3)
        page = reply.body.decode()
        assert "cloud_drive.e2e-new" in page and "alice" in page  # the user on the page

        # An invalid edit is reported and the last good policy stays in force.
        (policy_dir / "extra.yaml").write_text(BAD_RULE)
        deadline = time.monotonic() + 20
        while "policy reload failed" not in gw.text():
            assert time.monotonic() < deadline, gw.text()
            time.sleep(0.3)
        assert "extra.yaml:5: categories.webmail.rules[0].hosts[0]" in gw.text()
        assert curl(url, gw.proxy, extra=auth).status == 403
        token = (gw.data_dir / "admin-token").read_text().strip()
        status = gw.admin_call("/api/v1/status", token).json()
        assert "extra.yaml:5" in status["policy"]["last_reload_error"][0]

        rows = gw.wait_rows(
            lambda rs: any(r["rule_id"] == "cloud_drive.e2e-new" for r in rs), "--user", "alice"
        )
        assert rows and all(r["user"] == "alice" for r in rows)
        assert any(r["rule_id"] == "cloud_drive.e2e-new" for r in rows)
    finally:
        assert gw.stop() == 0


def test_mitmdump_loads_the_same_addons(tmp_path, policy_dir, upstream):
    gw = GatewayProcess(tmp_path / "data", policy_dir, upstream.ca_path, via="mitmdump").start()
    try:
        reply = curl("https://mail.qq.com/", gw.proxy, gw.ca_pem())
        assert reply.status == 403 and "webmail.qq-mail" in reply.body.decode()
        ok = curl(f"https://127.0.0.1:{upstream.https_port}/via-mitmdump", gw.proxy, gw.ca_pem())
        assert ok.status == 200
        rows = gw.wait_rows(
            lambda rs: (
                any(r["path"] == "/via-mitmdump" for r in rs)
                and any(r["rule_id"] == "webmail.qq-mail" for r in rs)
            )
        )
        assert {r["node"] for r in rows} == {"e2e-node"}
    finally:
        gw.stop()
    assert "Traceback" not in gw.text(), gw.text()


def test_ca_export_prints_the_ca_the_proxy_uses(tmp_path):
    data = tmp_path / "data"
    first = cli("ca", "export", "--data-dir", str(data)).stdout
    assert first.startswith("-----BEGIN CERTIFICATE-----")
    assert cli("ca", "export", "--data-dir", str(data)).stdout == first  # stable, not regenerated
    assert (data / "mitmproxy" / "mitmproxy-ca.pem").exists()
    assert oct(os.stat(data / "mitmproxy" / "mitmproxy-ca.pem").st_mode & 0o077) == "0o0"


def test_passthrough_hosts_are_tunnelled_uninspected_and_logged(tmp_path, policy_dir, upstream):
    (policy_dir / "gateway.yaml").write_text(
        "settings:\n  retention_months: 7\n  passthrough_hosts: [localhost]\n"
    )
    gw = GatewayProcess(tmp_path / "data", policy_dir, upstream.ca_path).start()
    try:
        # The client sees the upstream's own certificate: it trusts only the upstream CA.
        reply = curl(
            f"https://localhost:{upstream.https_port}/pinned-ok", gw.proxy, upstream.ca_path
        )
        assert reply.status == 200, reply.stderr
        assert "/pinned-ok" in upstream.paths()
        rows = gw.wait_rows(lambda rs: any(r["kind"] == "tunnel" for r in rs))
        (tunnel,) = [r for r in rows if r["kind"] == "tunnel"]
        assert (tunnel["host"], tunnel["port"], tunnel["decision"], tunnel["tls_intercepted"]) == (
            "localhost",
            upstream.https_port,
            "allow",
            False,
        )
        assert not any(r["path"] == "/pinned-ok" for r in rows)  # nothing inside was seen
        assert "request log kept 7 months" in gw.text()
    finally:
        gw.stop()


def test_admin_api_throttles_token_guessing_and_offers_no_cors(tmp_path, policy_dir):
    gw = GatewayProcess(tmp_path / "data", policy_dir).start()
    try:
        good = (gw.data_dir / "admin-token").read_text().strip()

        def call(token=None, method="GET", cookie=None):
            headers = {"Cookie": cookie} if cookie else {}
            reply = gw.admin_call("/api/v1/status", token, method=method, headers=headers)
            return reply.status, reply.headers

        assert call(good)[0] == 200
        assert call(cookie=f"token={good}")[0] == 401  # a token in a cookie is no credential
        assert call(cookie=f"egress_session={good}")[0] == 401  # nor is an unknown session
        status, headers = call(good, method="OPTIONS")
        assert status in (403, 405) and "access-control-allow-origin" not in headers
        codes = [call(f"guess-{i}")[0] for i in range(12)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
        assert call(good)[0] == 429  # locked for the window, right token or not
    finally:
        gw.stop()


def test_run_refuses_options_of_addons_a_gateway_does_not_load(tmp_path, policy_dir):
    base = (
        "run",
        "--data-dir",
        str(tmp_path / "data"),
        "--policies",
        str(policy_dir),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin",
        "",
        "--metrics",
        "",
    )
    refused = cli(*base, "--set", "modify_headers=/~q/X-Test/1", check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "bad --set" in refused.stderr and "modify_headers" in refused.stderr
    assert "Traceback" not in refused.stderr
