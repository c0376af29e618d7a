"""The employees' side of exceptions, in process: the block page carries a request form signed
for the identity and the destination, the gateway's portal host takes it (never forwarded),
and a forged, changed, stale, replayed or borrowed form is refused."""

import re
from html import unescape
from urllib.parse import urlencode

from mitmproxy.test import tflow, tutils

from egress_guard.core.exceptions import ApprovalRules, ControlRule
from egress_guard.requestlog.exception_snapshot import ExceptionBook, ExceptionSnapshot
from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.portal import PORTAL_HOST, Portal
from support import FakeRuntime

DAY = 24 * 3600 * 1000
RULES = ApprovalRules(pending_ms=3 * DAY, controls={"block": ControlRule(True, 30 * DAY)})


def setup(tmp_path):
    rt = FakeRuntime(tmp_path / "held")
    book = ExceptionBook(ExceptionSnapshot(tmp_path / "snap"), None, clock=rt.now_ms)
    book.start()
    rt.portal = Portal(b"k" * 32, rt.clock, lambda: book, lambda: RULES)
    return rt, book, EgressGuard(rt)


def request(guard, user, host, method=b"GET", path="/", body=b"", client="10.1.2.3"):
    flow = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", method=method))
    flow.client_conn.peername = (client, 50000)
    if user:
        flow.metadata["proxyauth"] = (user, "")
    flow.request.path = path
    flow.request.headers["host"] = host
    if body:
        flow.request.headers["content-type"] = "application/x-www-form-urlencoded"
        flow.request.headers["content-length"] = str(len(body))
        flow.request.content = body
    guard.requestheaders(flow)
    if flow.response is None:
        guard.request(flow)
    return flow


def form_of(page: bytes) -> dict[str, str]:
    return {
        n: unescape(v)
        for n, v in re.findall(rb'<input type="hidden" name="(\w+)" value="([^"]*)">', page)
        for n, v in [(n.decode(), v.decode())]
    }


def post(guard, user, fields, client="10.1.2.3"):
    body = urlencode(fields).encode()
    return request(guard, user, PORTAL_HOST, b"POST", "/request", body, client)


def test_the_block_page_form_becomes_a_pending_request_for_the_identity(tmp_path):
    _, book, guard = setup(tmp_path)
    blocked = request(guard, "alice", "mail.qq.com")
    assert blocked.response.status_code == 403
    fields = form_of(blocked.response.content)
    assert fields["requester"] == "alice" and fields["host"] == "mail.qq.com" and fields["sig"]
    answer = post(guard, "alice", {**fields, "reason": "client sends specs by QQ mail"})
    assert answer.response.status_code == 200, answer.response.content
    (state,) = book.states().values()
    assert (state.state, state.requester, state.request_id) == ("pending", "alice", blocked.id)
    assert state.terms.target.host == "mail.qq.com" and state.terms.control.kind == "block"
    status = request(guard, "alice", PORTAL_HOST)
    assert status.response.status_code == 200 and state.id.encode() in status.response.content


def test_forged_changed_borrowed_replayed_and_stale_forms_are_refused(tmp_path):
    rt, book, guard = setup(tmp_path)
    fields = form_of(request(guard, "alice", "mail.qq.com").response.content)
    reason = {"reason": "work"}
    assert (
        post(guard, "alice", {**fields, "host": "pan.baidu.com", **reason}).response.status_code
        == 403
    )
    assert post(guard, "alice", {**fields, "sig": "0" * 64, **reason}).response.status_code == 403
    assert post(guard, "mallory", {**fields, **reason}).response.status_code == 403  # not hers
    assert post(guard, "alice", fields).response.status_code == 400  # no reason
    assert post(guard, "alice", {**fields, **reason}).response.status_code == 200
    assert post(guard, "alice", {**fields, **reason}).response.status_code == 409  # replayed
    stale = form_of(request(guard, "alice", "wx.mail.qq.com").response.content)
    rt.now += 2 * 24 * 3600
    assert post(guard, "alice", {**stale, **reason}).response.status_code == 403
    assert len(book.states()) == 1


def test_the_portal_host_is_answered_by_the_gateway_never_forwarded(tmp_path):
    _, _, guard = setup(tmp_path)
    page = request(guard, "alice", PORTAL_HOST, path="/nowhere")
    assert page.response.status_code == 404 and b"egress-guard" in page.response.content
