"""The console in a real headless Chromium (driven by Debian's chromedriver): log in, search
the request log, see the cookie flags the browser stored, survive a forged cross-site form,
and log out."""

from __future__ import annotations

import hashlib
import os
import shutil
from urllib.parse import quote

import pytest
from test_blockpage_browser import CHROMIUM, spki_hash

from egress_guard.console.accounts import AccountBook, accounts_path
from harness import GatewayProcess, curl
from support import POLICIES

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


@pytest.fixture
def browser(gw, tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        # The console's certificate is signed with the gateway CA's key pair.
        f"--ignore-certificate-errors-spki-list={spki_hash(gw.ca_pem().read_bytes())}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(15)  # find_element waits for the page a click started
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
