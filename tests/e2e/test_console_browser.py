"""The console in a real headless Chromium (driven by Debian's chromedriver): log in, search
the request log, see the cookie flags the browser stored, survive a forged cross-site form,
and log out; and an auditor's investigation page by page (request log, one request and its
connection, timeline, reports, incidents, event log, retention), with a screenshot of each
(kept in $EGRESS_SCREENSHOTS when set) and what only a browser can tell: cells that do not
wrap, blocked rows that stand out, charts that are drawn."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from test_blockpage_browser import CHROMIUM, spki_hash

from egress_guard.console.accounts import AccountBook, accounts_path
from harness import GatewayProcess, curl
from support import POLICIES, policy_copy

pytestmark = pytest.mark.slow

CHROMEDRIVER = shutil.which("chromedriver")
if CHROMEDRIVER is None and os.environ.get("CI"):
    raise RuntimeError("CI must install Debian's chromium-driver package (see .ci/run)")
webdriver = pytest.importorskip("selenium.webdriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PASSWORD = "browser test password"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    g = GatewayProcess(tmp_path_factory.mktemp("gw-console-browser"), POLICIES).start()
    AccountBook(accounts_path(g.data_dir)).add("wang.auditor", ["auditor"], PASSWORD)
    yield g
    g.stop()


def chromium_for(gateway, profile: Path):
    """A headless Chromium that trusts this gateway's console certificate."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # The console's certificate is signed with the gateway CA's key pair.
        f"--ignore-certificate-errors-spki-list={spki_hash(gateway.ca_pem().read_bytes())}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(15)  # find_element waits for the page a click started
    return driver


@pytest.fixture
def browser(gw, tmp_path):
    driver = chromium_for(gw, tmp_path / "profile")
    yield driver
    driver.quit()


def wait_for(browser, condition) -> None:
    WebDriverWait(browser, 15).until(lambda _: condition())


def test_an_auditor_logs_in_searches_and_logs_out(gw, upstream, browser):
    base = f"https://127.0.0.1:{gw.admin_port}"
    curl(f"http://127.0.0.1:{upstream.http_port}/seen-in-the-browser", gw.proxy)
    gw.wait_rows(lambda rs: any(r["path"] == "/seen-in-the-browser" for r in rs))

    browser.get(f"{base}/requests")
    assert browser.current_url == f"{base}/login"  # strangers go to the login page
    browser.find_element(By.ID, "username").send_keys("wang.auditor")
    browser.find_element(By.ID, "password").send_keys("wrong password!!")
    browser.find_element(By.ID, "submit").click()
    assert "Wrong user name or password" in browser.find_element(By.ID, "error").text
    browser.find_element(By.ID, "username").clear()
    browser.find_element(By.ID, "username").send_keys("wang.auditor")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "submit").click()
    assert browser.find_element(By.ID, "who").text == "wang.auditor (auditor)"

    cookies = {c["name"]: c for c in browser.get_cookies()}
    session = cookies["egress_session"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
    assert "expiry" not in session  # a session cookie: gone when the browser closes
    assert "egress_session" not in browser.execute_script("return document.cookie")

    browser.find_element(By.ID, "nav-requests").click()
    browser.find_element(By.ID, "f-host").send_keys("127.0.0.1")
    browser.find_element(By.ID, "search").click()
    table = browser.find_element(By.ID, "results").text
    assert "/seen-in-the-browser" in table
    export = browser.find_element(By.ID, "export").get_attribute("href")
    assert export.startswith(f"{base}/api/v1/export?") and "host=127.0.0.1" in export
    # The browser's session works for the export as for the page (the page's CSP allows no
    # script fetch, so the same request is made with the browser's cookie).
    got = gw.admin_call(
        export.removeprefix(base), headers={"Cookie": f"egress_session={session['value']}"}
    )
    assert got.status == 200 and b"/seen-in-the-browser" in got.body
    assert got.headers["x-egress-guard-sha256"] == hashlib.sha256(got.body).hexdigest()

    # A page on another site posts a form at the console: the browser sends no cookie
    # (SameSite=Strict) and there is no token, so it is refused and the session survives.
    forged = "data:text/html," + quote(
        f'<form method="post" action="{base}/logout"><button id="go">win</button></form>'
    )
    browser.get(forged)
    browser.find_element(By.ID, "go").click()
    wait_for(browser, lambda: "403" in browser.title)
    browser.get(f"{base}/")
    assert browser.find_element(By.ID, "who").text == "wang.auditor (auditor)"

    browser.find_element(By.ID, "logout").click()
    wait_for(browser, lambda: browser.current_url == f"{base}/login")
    browser.get(f"{base}/requests")
    assert browser.current_url == f"{base}/login"


# --- an auditor's investigation ---------------------------------------------------------------

IDENTITIES = """  identities:
    - {cidr: 127.0.0.1/32, user: "zhang.wei", groups: [finance]}
"""


@pytest.fixture(scope="module")
def audit_gw(tmp_path_factory, upstream):
    base = tmp_path_factory.mktemp("gw-console-audit")
    gateway_yaml = (POLICIES / "gateway.yaml").read_text(encoding="utf-8")
    assert "  identities: []\n" in gateway_yaml
    policies = policy_copy(
        base, {"gateway.yaml": gateway_yaml.replace("  identities: []\n", IDENTITIES)}
    )
    g = GatewayProcess(base / "data", policies, upstream.ca_path).start()
    AccountBook(accounts_path(g.data_dir)).add("li.auditor", ["auditor"], PASSWORD)
    yield g
    g.stop()


def shoot(browser, tmp_path, name: str, height: int = 1400) -> Path:
    """A screenshot of the page as it is (tall enough for the page), kept for a person."""
    browser.set_window_size(1600, height)
    shot = tmp_path / f"console-{name}.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000, name
    keep = os.environ.get("EGRESS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return shot


@pytest.fixture
def audit_browser(audit_gw, tmp_path):
    driver = chromium_for(audit_gw, tmp_path / "profile")
    yield driver
    driver.quit()


def test_an_auditor_investigates_page_by_page(audit_gw, upstream, audit_browser, tmp_path):
    gw, browser = audit_gw, audit_browser
    https = f"https://127.0.0.1:{upstream.https_port}"
    curl(f"http://127.0.0.1:{upstream.http_port}/morning-news", gw.proxy)
    curl(f"{https}/drive/upload", gw.proxy, gw.ca_pem(), method="POST", data=b"x" * 300_000)
    marked = "季度报告\n绝密★10年\n附件如下".encode()
    curl(f"{https}/drive/secret", gw.proxy, gw.ca_pem(), method="POST", data=marked)
    alerted = "周报\n内部资料 注意保密\n".encode()
    curl(f"{https}/drive/weekly", gw.proxy, gw.ca_pem(), method="POST", data=alerted)
    curl("https://mail.qq.com/", gw.proxy, gw.ca_pem())  # blocked: a CONNECT and its request
    rows = gw.wait_rows(
        lambda rs: (
            {"/drive/secret", "/drive/weekly", "/morning-news"} <= {r["path"] for r in rs}
            and any(r["host"] == "mail.qq.com" and r["kind"] == "http" for r in rs)
        ),
        "--limit",
        "1000",
    )
    secret = next(r for r in rows if r["path"] == "/drive/secret")
    assert secret["decision"] == "block" and secret["marker_levels"] == ["national_secret"]

    base = f"https://127.0.0.1:{gw.admin_port}"
    browser.get(f"{base}/login")
    browser.find_element(By.ID, "username").send_keys("li.auditor")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "submit").click()
    assert browser.find_element(By.ID, "who").text == "li.auditor (auditor)"

    # The request log: one line per row, blocked rows in red, the CONNECT with its request.
    browser.get(f"{base}/requests?since=1h&limit=50")
    table = browser.find_element(By.ID, "results")
    assert "mail.qq.com" in table.text and "/drive/secret" in table.text
    cells = browser.find_elements(By.CSS_SELECTOR, "#results td.c-ts")
    heights = {c.size["height"] for c in cells}
    assert max(heights) < 30, heights  # one line each: nothing wraps mid-value
    ts_title = cells[0].get_attribute("title")
    assert ts_title.startswith("UTC ") and ts_title.endswith("Z")
    blocked = browser.find_element(By.CSS_SELECTOR, "#results tr.d-block td")
    assert blocked.value_of_css_property("background-color") == "rgba(253, 236, 234, 1)"
    assert browser.find_elements(By.CSS_SELECTOR, "#results tr.conn-head")
    shoot(browser, tmp_path, "requests")

    # One request in full, with its connection.
    browser.get(f"{base}/request?id={quote(secret['request_id'])}")
    assert "forwarded_bytes" in browser.find_element(By.ID, "detail").text
    assert browser.find_element(By.ID, "link-incident")
    shoot(browser, tmp_path, "request")
    blocked_page = next(r for r in rows if r["host"] == "mail.qq.com" and r["kind"] == "http")
    browser.get(f"{base}/request?id={quote(blocked_page['request_id'])}")
    connection = browser.find_element(By.ID, "connection").find_element(By.XPATH, "..").text
    assert "CONNECT" in connection and "block page" in connection
    shoot(browser, tmp_path, "connection")

    # The timeline.
    browser.get(f"{base}/timeline?user=zhang.wei&since=1h")
    days = browser.find_element(By.ID, "days").text
    assert "national_secret" in browser.find_element(By.ID, "events").text and days
    shoot(browser, tmp_path, "timeline")

    # The reports: every chart drawn.
    browser.get(f"{base}/reports?since=1h")
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) >= 8 and all(c.size["width"] > 100 for c in charts)
    assert browser.find_elements(By.CSS_SELECTOR, "#r-requests svg rect")
    shoot(browser, tmp_path, "reports", 2600)

    # The incidents: the marked upload first, then the alert; triage one.
    browser.get(f"{base}/incidents")
    queue = browser.find_element(By.ID, "queue").text
    assert queue.index("national_secret") < queue.index("internal")
    shoot(browser, tmp_path, "incidents")
    browser.get(f"{base}/incident?id={quote(secret['request_id'])}")
    browser.find_element(By.ID, "u-status").send_keys("investigating")
    browser.find_element(By.ID, "u-assignee").send_keys("li.auditor")
    browser.find_element(By.ID, "u-comment").send_keys("asked zhang.wei about the file")
    browser.find_element(By.ID, "u-submit").click()
    wait_for(browser, lambda: "asked zhang.wei" in browser.find_element(By.ID, "history").text)
    assert "investigating" in browser.find_element(By.ID, "state").text
    shoot(browser, tmp_path, "incident")

    # The event log, and the retention proof.
    browser.get(f"{base}/events?actor=li.auditor")
    log = browser.find_element(By.ID, "events").text
    assert "update_incident" in log and "query_timeline" in log
    shoot(browser, tmp_path, "events")
    browser.get(f"{base}/retention")
    assert browser.find_element(By.ID, "t-requests")
    shoot(browser, tmp_path, "retention")
