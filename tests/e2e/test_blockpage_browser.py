"""The block page in a real headless Chromium going through the gateway, HTTPS included."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from harness import GatewayProcess
from support import POLICIES

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must install Debian's chromium package (see .ci/run)")


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = GatewayProcess(tmp_path_factory.mktemp("gw-browser"), POLICIES).start()
    yield g
    g.stop()


def spki_hash(pem: bytes) -> str:
    """Chromium trusts certificates with this key. mitmproxy signs every interception
    certificate with the CA's key pair, so the CA's SPKI covers them all."""
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def chromium(gw, url, tmp_path, *extra):
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--proxy-server={gw.proxy}",
        f"--ignore-certificate-errors-spki-list={spki_hash(gw.ca_pem().read_bytes())}",
        *extra,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
@pytest.mark.parametrize(
    ("url", "rule_id"),
    [
        ("https://mail.qq.com/", "webmail.qq-mail"),
        ("http://pan.baidu.com/disk/home", "cloud_drive.baidu-netdisk"),
    ],
)
def test_browser_renders_the_block_page(gw, tmp_path, url, rule_id):
    result = chromium(gw, url, tmp_path, "--dump-dom")
    dom = result.stdout
    assert "Access blocked by company policy" in dom, result.stderr[-2000:]
    assert "根据公司规定，已阻止访问" in dom
    assert rule_id in dom
    assert "ERR_" not in dom  # not the browser's own error page

    shot = tmp_path / "page.png"
    result = chromium(gw, url, tmp_path, f"--screenshot={shot}", "--window-size=1000,800")
    assert shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]
