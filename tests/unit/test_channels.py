"""Channels outside the body, in process: the request target and headers scanned before
anything is forwarded, and the row that keeps none of the text a marker matched."""

import base64
from urllib.parse import quote

import pytest
from mitmproxy.test import tflow, tutils

from egress_guard.core.channels import MAX_HEAD_TEXT, head_findings
from egress_guard.core.policy import load_policy
from egress_guard.runtime.adapters.audit import REDACTED
from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.flows import STATE
from support import POLICIES, FakeRuntime

MARKERS = load_policy(POLICIES).markers.markers
SECRET = "机密★5年"  # blocks (national_secret)
b64 = base64.b64encode(SECRET.encode()).decode()


@pytest.mark.parametrize(
    ("target", "headers", "channel"),
    [
        (f"/a?memo={quote(SECRET)}", [], "query"),
        (f"/a?memo={quote(quote(SECRET))}", [], "query"),  # double-encoded
        (f"/a?memo={b64}", [], "query"),
        (f"/{quote(SECRET)}/b", [], "path"),
        (f"/files/{b64}", [], "path"),
        ("/a", [("X-Note", SECRET)], "header:x-note"),
        ("/a", [("User-Agent", f"curl {b64}")], "header:user-agent"),
        ("/a", [("Cookie", f"sid=1; memo={quote(SECRET)}")], "header:cookie"),
        ("/a", [("Referer", f"https://x.example/?q={quote(SECRET)}")], "header:referer"),
        ("/a", [("X-J", '{"v": "\\u673a\\u5bc6\\u26055\\u5e74"}')], "header:x-j"),
    ],
)
def test_a_marker_in_any_channel_of_the_head_is_found(target, headers, channel):
    scan = head_findings(MARKERS, target, headers)
    assert set(scan.found) == {channel} and scan.markers and not scan.unscannable


def test_an_ordinary_head_carries_nothing():
    headers = [
        ("Host", "example.com"),
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120"),
        ("Cookie", "a=1; sid=abcdef0123456789"),
        ("Authorization", "Basic " + base64.b64encode(b"alice:s3cret").decode()),
    ]
    assert head_findings(MARKERS, "/search?q=hello+world&page=2", headers).found == {}


def test_a_head_too_large_to_read_is_unscannable_not_passed():
    scan = head_findings(MARKERS, "/", [("X-Big", "a" * MAX_HEAD_TEXT)])
    assert scan.unscannable and not scan.found


def flow_with(target: str, headers: dict[str, str], method: bytes = b"GET"):
    flow = tflow.tflow(req=tutils.treq(host="93.184.216.34", port=80, method=method))
    flow.request.path = target
    flow.request.headers.clear()
    flow.request.headers.update({"host": "93.184.216.34", **headers})
    return flow


def test_a_marked_query_is_refused_at_the_headers_and_stored_redacted(tmp_path):
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    flow = flow_with(f"/up?memo={quote(SECRET)}&x=1", {"User-Agent": f"ua {SECRET}"})
    guard.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    guard.response(flow)
    (row,) = rt.rows
    assert (row.decision, row.reason_kind) == ("block", "marker")
    assert row.query == REDACTED and row.user_agent == REDACTED and row.path == "/up"
    assert SECRET not in repr(row.values()) and quote(SECRET) not in repr(row.values())


def test_an_alert_in_the_head_is_kept_through_the_body_verdict(tmp_path):
    rt = FakeRuntime(tmp_path)
    guard = EgressGuard(rt)
    mention = "分为核心商密和普通商密"  # a grade inside a sentence: an alert in the policy
    flow = flow_with("/up", {"X-Note": mention, "content-length": "5"}, b"POST")
    guard.requestheaders(flow)
    assert flow.response is None and flow.metadata[STATE].decision.verdict == "alert"
