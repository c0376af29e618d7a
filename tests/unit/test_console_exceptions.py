"""The approvers' exception workflow in the console, in process (``make_app`` over a fake
store and a real ``ExceptionBook`` on disk, the wall clock moved by hand): the API's answers
and filters, every refusal of the model as a 4xx recorded in ``console_events``, two approvers
for marker levels, narrowing, the blocked request an approver may see, the notices, the pages
and their forms, and the ``egress-guard exceptions`` CLI against it. Who may call which route
is pinned in test_console_app.py's role table."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_console_app import (
    BOOTSTRAP,
    FORM,
    STATUS,
    Clock,
    FakeAudit,
    FakeStore,
    InProcessConsole,
    Login,
    Reply,
    accounts_file,  # noqa: F401 (a fixture)
    login,
    page,
    request_row,
)

from egress_guard.cli import main as cli_main
from egress_guard.console import exception_ops as ops
from egress_guard.console.accounts import AccountBook
from egress_guard.console.certs import tls_context
from egress_guard.console.context import ConsoleContext
from egress_guard.core import exceptions as ex
from egress_guard.notify import ExceptionNotice
from egress_guard.requestlog.store import RequestFilter
from exception_fixtures import (
    ACTIVE_ID,
    BLOCKED_REQUEST,
    PENDING_ID,
    REQUESTER,
    RULES,
    WallClock,
    requested,
    seeded_book,
)

MiB = 1 << 20


class Store(FakeStore):
    """The fake store, also filtering by request and connection id (the blocked request)."""

    def query_requests(self, f: RequestFilter) -> list[dict[str, Any]]:
        hits = super().query_requests(RequestFilter(since=f.since, until=f.until, limit=10**6))
        hits = [
            r
            for r in hits
            if (f.request_id is None or r["request_id"] == f.request_id)
            and (f.connection_id is None or r["connection_id"] == f.connection_id)
        ]
        return hits[: f.limit]


class Setup(InProcessConsole):
    clock_ms: WallClock
    notices: list[ExceptionNotice]
    groups: dict[str, tuple[str, ...]]
    ca: Path
    history: list[ex.Event]  # the store's events (what the book has let go)

    def as_(self, who: str) -> str:
        return self.tokens[who]

    def api(self, path: str, who: str, body: Any = None) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        method = "GET" if body is None else "POST"
        return self.call(path, self.tokens[who], method=method, body=data)

    def events(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.store.events if e["action"] == action]

    @property
    def exceptions(self) -> Any:  # the exception book (``book`` is the accounts)
        return self.ctx.exceptions


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext, Path]:
    confdir = tmp_path_factory.mktemp("mitmproxy")
    server = tls_context(confdir, tmp_path_factory.mktemp("certs"), "127.0.0.1")
    ca = confdir / "mitmproxy-ca-cert.pem"
    return server, ssl.create_default_context(cafile=str(ca)), ca


@pytest.fixture(scope="module")
def policy() -> Any:
    from egress_guard.core.policy import load_policy
    from support import POLICIES

    return load_policy(POLICIES)


def make_setup(
    tls_files: tuple[ssl.SSLContext, ssl.SSLContext, Path],
    accounts: tuple[Path, dict[str, str]],
    policy: Any,
    directory: Path,
) -> Setup:
    """The console over a seeded book (``exception_fixtures``), the shipped policy's
    categories, the approver "appr" in the group finance, a second approver "appr2", notices
    kept in a list, and the blocked request's connection in the fake store."""
    path, tokens = accounts
    shutil.copy(path, directory / "accounts.json")
    book = AccountBook(directory / "accounts.json")
    book.add("appr2", ["approver"])  # a second approver (token only)
    tokens = tokens | {"approver2": book.issue_token("appr2")}
    store = Store()
    clock = WallClock()
    notices: list[ExceptionNotice] = []
    groups: dict[str, tuple[str, ...]] = {"appr": ("finance",)}
    history: list[ex.Event] = []

    def read_history(**query: Any) -> list[ex.Event]:
        store._reachable("query")
        if "exception_id" in query:
            return [e for e in history if e.exception_id == query["exception_id"]]
        return [e for e in history if e.ts_ms >= ops.ms_of(query["since"])]

    ctx = ConsoleContext(
        bootstrap_token=BOOTSTRAP,
        accounts=book,
        store=store,
        status=lambda: dict(STATUS),
        node="unit-node",
        clock=Clock(),
        now=lambda: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=clock()),
        audit=FakeAudit(store),
        exceptions=seeded_book(directory, clock),
        approval_rules=lambda: RULES,
        target_category=lambda target: ops.category_of(policy, target),
        groups_of=lambda name: groups.get(name, ()),
        notify=notices.append,
        exception_history=read_history,
        wall_ms=clock,
    )
    setup = Setup(ctx, store, tokens, tls_files[:2])
    setup.clock_ms, setup.notices, setup.groups, setup.ca = clock, notices, groups, tls_files[2]
    setup.history = history
    blocked_at = ctx.now() - timedelta(minutes=3)
    store.rows = [
        request_row(
            ts=blocked_at - timedelta(seconds=1),
            request_id="conn-1",
            connection_id="conn-1",
            kind="connect",
            method="CONNECT",
            host="example.com",
            port=443,
            path="",
            decision="block",
            reason_kind="blocklist",
            rule_id="webmail.example",
        ),
        request_row(
            ts=blocked_at,
            request_id=BLOCKED_REQUEST,
            connection_id="conn-1",
            scheme="https",
            host="example.com",
            port=443,
            path="/compose",
            query="token=secret-in-query",
            user_agent="secret-agent/1.0",
            method="POST",
            status=403,
            decision="block",
            reason_kind="blocklist",
            rule_id="webmail.example",
            category="webmail",
            upload_bytes=12345,
            declared_bytes=12345,
        ),
        request_row(ts=blocked_at, request_id="other", user="someone.else", path="/elsewhere"),
    ]
    return setup


@pytest.fixture
def c(tls_files, accounts_file, policy, tmp_path) -> Iterator[Setup]:  # noqa: F811
    setup = make_setup(tls_files, accounts_file, policy, tmp_path)
    yield setup
    setup.close()


def code_of(reply: Reply) -> str:
    return reply.json().get("code", "")


def session_post(c: Setup, who: Login, path: str, fields: dict[str, str]) -> Reply:
    body = urllib.parse.urlencode({"_xsrf": who.xsrf_field, **fields}).encode()
    headers = {**FORM, "Cookie": who.cookie, "Origin": c.origin}
    return c.call(path, method="POST", body=body, headers=headers)


# --- the API: reading ----------------------------------------------------------------------


def test_the_list_filters_orders_and_keeps_its_shape(c):
    later = requested(c.clock_ms, "ex-pending00002", user="li.si")
    c.clock_ms.t += 60_000
    c.exceptions.append(later)
    got = c.api("/api/v1/exceptions", "approver").json()
    assert list(got) == ["exceptions", "count", "partial"] and got["partial"] is False
    assert {e["id"] for e in got["exceptions"]} == {PENDING_ID, ACTIVE_ID, "ex-pending00002"}
    # The queue: the oldest first. Everything else: the newest first.
    pending = c.api("/api/v1/exceptions?state=pending", "auditor").json()["exceptions"]
    assert [e["id"] for e in pending] == [PENDING_ID, "ex-pending00002"]
    active = c.api("/api/v1/exceptions?state=active", "approver").json()["exceptions"]
    assert [e["id"] for e in active] == [ACTIVE_ID]
    mine = c.api(f"/api/v1/exceptions?user={REQUESTER}", "approver").json()["exceptions"]
    assert {e["id"] for e in mine} == {PENDING_ID, ACTIVE_ID}
    assert c.api("/api/v1/exceptions?control=marker", "approver").json()["count"] == 0
    assert c.api("/api/v1/exceptions?state=live&limit=1", "approver").json()["count"] == 1

    e = next(x for x in got["exceptions"] if x["id"] == PENDING_ID)
    assert e["state"] == "pending" and e["origin"] == "request" and e["requester"] == REQUESTER
    assert e["request_id"] == BLOCKED_REQUEST and e["category"] == "webmail"
    assert e["terms"]["subject"] == f"user:{REQUESTER}" and e["terms"]["control"] == "block"
    assert e["terms"]["target"]["host"] == "example.com" and e["terms"]["duration"] == "2d"
    assert e["requested_at"] == "2027-01-15T08:00:00.000Z" and e["approved_at"] is None
    assert "events" not in e  # the history is the show call's

    for query, error in (
        ("state=maybe", "state must be one of"),
        ("limit=0", "limit must be between 1 and 1000"),
        ("control=marker:", "control:"),
        ("since=soon", "is not a time"),
    ):
        reply = c.api(f"/api/v1/exceptions?{query}", "approver")
        assert reply.status == 400 and error in reply.json()["error"], query


def test_show_gives_the_whole_history_and_reads_the_store_for_what_the_book_let_go(c):
    shown = c.api(f"/api/v1/exceptions/{PENDING_ID}", "auditor").json()
    assert [(e["kind"], e["actor"], e["applied"]) for e in shown["events"]] == [
        ("requested", REQUESTER, True)
    ]
    assert shown["events"][0]["reason"] == "the customer sends the contract by webmail"
    assert c.api("/api/v1/exceptions/ex-nosuchthing", "approver").status == 404
    # An exception ended long ago is only in the store: shown from there.
    old = requested(WallClock(c.clock_ms.t - 90 * ex.DAY), "ex-oldone00001")
    c.history.append(old)
    got = c.api("/api/v1/exceptions/ex-oldone00001", "approver").json()
    assert got["state"] == "expired" and [e["kind"] for e in got["events"]] == ["requested"]
    listed = c.api("/api/v1/exceptions?state=expired&since=100d", "approver").json()
    assert [e["id"] for e in listed["exceptions"]] == ["ex-oldone00001"]
    c.store.failing = {"query"}  # the store is away: the book's still answer, marked partial
    partial = c.api("/api/v1/exceptions?since=100d", "approver").json()
    assert partial["partial"] is True and partial["count"] == 2


def test_an_approver_sees_the_blocked_request_rows_only_and_the_read_is_recorded(c):
    got = c.api(f"/api/v1/exceptions/{PENDING_ID}/request", "approver")
    assert got.status == 200, got.body
    found = got.json()
    assert found["exception_id"] == PENDING_ID and found["request_id"] == BLOCKED_REQUEST
    assert found["row"]["path"] == "/compose" and found["row"]["upload_bytes"] == 12345
    assert [r["request_id"] for r in found["rows"]] == ["conn-1", BLOCKED_REQUEST]
    assert set(found["row"]) == set(ops.APPROVER_COLUMNS) and found["truncated"] is False
    assert b"secret-in-query" not in got.body and b"secret-agent" not in got.body
    assert b"someone.else" not in got.body  # nobody else's traffic
    (read,) = c.events("query_exception_request")
    assert read["actor"] == "appr" and read["roles"] == ["approver"]
    assert json.loads(read["detail"]) == {
        "exception_id": PENDING_ID,
        "request_id": BLOCKED_REQUEST,
    }
    # A long connection: its rows are bounded.
    base = c.store.rows[1]["ts"]
    c.store.rows += [
        request_row(ts=base + timedelta(seconds=i), request_id=f"more-{i}", connection_id="conn-1")
        for i in range(80)
    ]
    many = c.api(f"/api/v1/exceptions/{PENDING_ID}/request", "approver").json()
    assert len(many["rows"]) == ops.MAX_BLOCKED_ROWS and many["truncated"] is True
    # A direct grant came from no request; a read that cannot be recorded is not run.
    assert c.api(f"/api/v1/exceptions/{ACTIVE_ID}/request", "approver").status == 404
    queries = len(c.store.queries)
    c.store.failing = {"insert"}
    refused = c.api(f"/api/v1/exceptions/{PENDING_ID}/request", "approver")
    assert refused.status == 503 and len(c.store.queries) == queries


def test_admins_and_the_bootstrap_token_neither_read_nor_decide(c):
    for who in ("admin", "bootstrap"):
        assert c.api("/api/v1/exceptions", who).status == 403
        assert c.api(f"/api/v1/exceptions/{PENDING_ID}/approve", who, {}).status == 403
    assert c.api(f"/api/v1/exceptions/{PENDING_ID}/approve", "auditor", {}).status == 403
    denied = [e for e in c.store.events if e["outcome"] == "denied" and e["action"] == "access"]
    assert [e["actor"] for e in denied] == ["ann", "ann", "admin-token", "admin-token", "aud"]
    assert c.exceptions.state(PENDING_ID).state == "pending"
    assert c.api("/api/v1/openapi.json", "admin").status == 200  # the document is for all


# --- the API: changing ---------------------------------------------------------------------


def test_a_grant_is_in_force_at_once_recorded_and_notified(c):
    body = {
        "subject": "user:li.na",
        "host": "Drive.Example.COM",
        "path": "/share/",
        "duration": "7d",
        "reason": "the auditors' data room",
    }
    reply = c.api("/api/v1/exceptions", "approver", body)
    assert reply.status == 200, reply.body
    change = reply.json()
    e = change["exception"]
    assert e["state"] == "active" and e["origin"] == "grant" and e["approvers"] == ["appr"]
    assert e["terms"]["target"] == {
        "host": "drive.example.com",
        "exact": False,
        "path": "/share/",
        "category": "",
        "rule_id": "",
        "text": "drive.example.com/share/",
    }
    assert e["terms"]["expiry"] == "2027-01-22T08:00:00.000Z"
    assert change["event"]["kind"] == "granted" and change["event"]["client_ip"] == "127.0.0.1"
    assert [ev["kind"] for ev in e["events"]] == ["granted"]
    found = c.exceptions.active.find(
        "li.na", (), "10.0.0.1", ex.BLOCK, "a.drive.example.com", "/share/x", "", "", c.clock_ms()
    )
    assert found is not None and found.id == e["id"]
    (note,) = c.events("exception_grant")
    assert note["outcome"] == "ok" and json.loads(note["detail"])["exception_id"] == e["id"]
    (notice,) = c.notices
    assert (notice.kind, notice.exception_id, notice.requester, notice.actor) == (
        "granted",
        e["id"],
        "li.na",
        "appr",
    )
    assert (
        notice.target == "drive.example.com/share/"
        and notice.expiry_ms == c.clock_ms() + 7 * ex.DAY
    )

    c.clock_ms.t += ex.HOUR
    revoked = c.api(f"/api/v1/exceptions/{e['id']}/revoke", "approver2", {"reason": "done"})
    assert revoked.status == 200 and revoked.json()["exception"]["state"] == "revoked"
    assert revoked.json()["exception"]["ended_by"] == "appr2"
    assert (
        c.exceptions.active.find(
            "li.na", (), "", ex.BLOCK, "drive.example.com", "/share/x", "", "", c.clock_ms()
        )
        is None
    )
    assert [n.kind for n in c.notices] == ["granted", "revoked"]
    assert c.notices[1].reason == "done" and c.notices[1].actor == "appr2"


def test_approve_and_deny_tell_the_requester(c):
    approved = c.api(f"/api/v1/exceptions/{PENDING_ID}/approve", "approver", {"reason": "ok"})
    assert approved.status == 200, approved.body
    e = approved.json()["exception"]
    assert e["state"] == "active" and e["approvers"] == ["appr"]
    assert [ev["kind"] for ev in e["events"]] == ["requested", "approved"]
    c.exceptions.append(requested(c.clock_ms, "ex-pending00003", user="li.si"))
    denied = c.api("/api/v1/exceptions/ex-pending00003/deny", "approver", {"reason": "use FTP"})
    assert denied.json()["exception"]["state"] == "denied"
    assert [(n.kind, n.requester) for n in c.notices] == [
        ("approved", REQUESTER),
        ("denied", "li.si"),
    ]
    assert c.notices[0].request_id == BLOCKED_REQUEST and c.notices[1].reason == "use FTP"
    assert [json.loads(e["detail"])["state"] for e in c.events("exception_approve")] == ["active"]


def grant_body(**changes: Any) -> dict[str, Any]:
    """A valid grant, but for what a case changes."""
    return {
        "subject": "user:li.na",
        "host": "mail.qq.com",
        "duration": "1d",
        "reason": "r",
    } | changes


GRANT, PENDING = "/api/v1/exceptions", f"/api/v1/exceptions/{PENDING_ID}"
REFUSALS = [
    # (path, body, status, code): the approver "appr" (in the group finance, at 127.0.0.1)
    (GRANT, grant_body(subject="user:appr"), 403, "self_approval"),
    (GRANT, grant_body(subject="group:finance"), 403, "self_approval"),
    (GRANT, grant_body(subject="client:127.0.0.0/8"), 403, "self_approval"),
    (GRANT, grant_body(duration="60d"), 400, "too_long"),
    (GRANT, grant_body(control="upload", per_request=10 << 30), 400, "too_large"),
    (GRANT, grant_body(duration="soon"), 400, "bad_input"),
    (GRANT, grant_body(host="com"), 400, "ambiguous_category"),
    (GRANT, grant_body(reason=""), 400, "no_reason"),
    (f"{PENDING}/approve", {"duration": "30d"}, 400, "widening"),
    (f"{PENDING}/approve", {"host": "other.org"}, 400, "widening"),
    (f"{PENDING}/approve", {"subject": "user:x"}, 400, "widening"),
    ("/api/v1/exceptions/ex-nosuchthing/approve", {}, 404, "unknown_exception"),
    (f"/api/v1/exceptions/{ACTIVE_ID}/approve", {}, 409, "wrong_state"),
    (f"{PENDING}/revoke", {"reason": "x"}, 409, "wrong_state"),
    (f"/api/v1/exceptions/{ACTIVE_ID}/deny", {"reason": "x"}, 409, "wrong_state"),
    (f"{PENDING}/deny", {}, 400, "no_reason"),
    (f"/api/v1/exceptions/{ACTIVE_ID}/revoke", {"reason": " "}, 400, "no_reason"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), REFUSALS)
def test_every_refusal_of_the_model_is_a_4xx_recorded_and_changes_nothing(
    c, path, body, status, code
):
    events_before = len(c.exceptions.events())
    reply = c.api(path, "approver", body)
    assert reply.status == status, reply.body
    assert code_of(reply) == code and reply.json()["error"]
    assert len(c.exceptions.events()) == events_before and c.notices == []
    (note,) = [e for e in c.store.events if e["outcome"] == "denied"]
    assert note["action"].startswith("exception_") and note["actor"] == "appr"
    assert json.loads(note["detail"])["code"] == code


def test_approving_what_one_requested_or_is_for_is_refused(c):
    c.exceptions.append(requested(c.clock_ms, "ex-mine00000001", user="appr", request_id="r-1"))
    own = c.api("/api/v1/exceptions/ex-mine00000001/approve", "approver", {})
    assert own.status == 403 and code_of(own) == "own_request"
    for_them = requested(c.clock_ms, "ex-forfinance01", user="li.si", request_id="r-2")
    c.exceptions.append(for_them)
    narrowed = c.api("/api/v1/exceptions/ex-forfinance01/approve", "approver2", {})
    assert narrowed.status == 200  # a different approver: fine


def test_a_marker_level_needs_two_different_approvers(c):
    body = {
        "subject": "user:li.na",
        "control": "marker:confidential",
        "host": "partner.example",
        "duration": "8h",
        "reason": "the signed contract goes to the partner",
    }
    first = c.api("/api/v1/exceptions", "approver", body).json()["exception"]
    assert first["state"] == "pending" and first["approvals_needed"] == 2
    assert first["terms"]["lowered_to"] == "alert"
    assert (
        c.exceptions.active.find(
            "li.na", (), "", ex.marker("confidential"), "partner.example", "/", "", "", c.clock_ms()
        )
        is None
    )
    assert [(n.kind, n.approvals_given, n.approvals_needed) for n in c.notices] == [
        ("pending", 1, 2)
    ]
    again = c.api(f"/api/v1/exceptions/{first['id']}/approve", "approver", {})
    assert again.status == 403 and code_of(again) == "own_request"
    second = c.api(f"/api/v1/exceptions/{first['id']}/approve", "approver2", {"duration": "4h"})
    assert second.status == 200, second.body
    e = second.json()["exception"]
    assert e["state"] == "active" and e["approvers"] == ["appr", "appr2"]
    assert e["terms"]["duration"] == "4h"
    assert (
        c.exceptions.active.find(
            "li.na", (), "", ex.marker("confidential"), "partner.example", "/", "", "", c.clock_ms()
        )
        is not None
    )
    assert [n.kind for n in c.notices] == ["pending", "approved"]


def test_an_approval_narrows_never_widens(c):
    asked = requested(
        c.clock_ms,
        "ex-category0001",
        target=ex.Target.for_category("webmail"),
        hours=72,
        request_id="req-9",
    )
    c.exceptions.append(asked)
    narrow = {"host": "mail.qq.com", "path": "/cgi-bin/compose", "duration": "2h", "exact": True}
    got = c.api("/api/v1/exceptions/ex-category0001/approve", "approver", narrow)
    assert got.status == 200, got.body
    t = got.json()["exception"]["terms"]
    assert t["target"] == {
        "host": "mail.qq.com",
        "exact": True,
        "path": "/cgi-bin/compose",
        "category": "webmail",  # the one host within what was asked
        "rule_id": "",
        "text": "=mail.qq.com/cgi-bin/compose, category webmail",
    }
    assert t["duration"] == "2h"
    now = c.clock_ms()
    hit = c.exceptions.active.find(
        REQUESTER, (), "", ex.BLOCK, "mail.qq.com", "/cgi-bin/compose/x", "webmail", "", now
    )
    assert hit is not None
    assert (
        c.exceptions.active.find(
            REQUESTER, (), "", ex.BLOCK, "mail.qq.com", "/inbox", "webmail", "", now
        )
        is None
    )
    assert (
        c.exceptions.active.find(
            REQUESTER, (), "", ex.BLOCK, "x.mail.qq.com", "/cgi-bin/compose", "webmail", "", now
        )
        is None
    )

    upload = requested(
        c.clock_ms,
        "ex-upload000001",
        control=ex.UPLOAD,
        grant=ex.UploadGrant(per_request=500 * MiB),
        request_id="req-10",
    )
    c.exceptions.append(upload)
    wider = c.api(
        "/api/v1/exceptions/ex-upload000001/approve", "approver", {"per_request": 1 << 30}
    )
    assert wider.status == 400 and code_of(wider) == "widening"
    smaller = c.api(
        "/api/v1/exceptions/ex-upload000001/approve", "approver", {"per_request": 100 * MiB}
    )
    assert smaller.json()["exception"]["terms"]["grant"] == {
        "per_request": 100 * MiB,
        "per_window": None,
    }


def test_a_late_approval_starts_its_window_then(c):
    c.clock_ms.t += 10 * ex.HOUR
    e = c.api(f"/api/v1/exceptions/{PENDING_ID}/approve", "approver", {}).json()["exception"]
    assert e["terms"]["start"] == ops.iso(c.clock_ms()) and e["terms"]["duration"] == "2d"


def test_bodies_that_cannot_be_read_are_400s(c):
    for body in (b"[]", b"not json", b'{"subject": 5}', b'{"unknown": 1}'):
        reply = c.call("/api/v1/exceptions", c.tokens["approver"], method="POST", body=body)
        assert reply.status == 400 and list(reply.json()) in (["error"], ["error", "code"]), body
    reply = c.api(f"/api/v1/exceptions/{PENDING_ID}/approve", "approver", {"exact": "yes"})
    assert reply.status == 400 and "true or false" in reply.json()["error"]
    assert c.exceptions.state(PENDING_ID).state == "pending"


def test_a_console_without_the_book_says_so(c):
    c.ctx.exceptions = None
    reply = c.api("/api/v1/exceptions", "approver")
    assert reply.status == 503 and "not available" in reply.json()["error"]


# --- notices -------------------------------------------------------------------------------


def test_a_notice_holds_plain_fields_only(c):
    from egress_guard.notify import check_notice

    c.api(f"/api/v1/exceptions/{PENDING_ID}/approve", "approver", {"duration": "1d"})
    (n,) = c.notices
    assert check_notice(n) is n
    assert (n.kind, n.subject, n.control, n.target, n.category) == (
        "approved",
        f"user:{REQUESTER}",
        "block",
        "example.com",
        "webmail",
    )
    assert n.start_ms == c.clock_ms() and n.expiry_ms == c.clock_ms() + ex.DAY
    assert (n.approvals_needed, n.approvals_given, n.ts_ms) == (1, 1, c.clock_ms())


def test_a_notifier_that_fails_never_fails_the_decision(c):
    def broken(notice: ExceptionNotice) -> None:
        raise RuntimeError("smtp on fire")

    c.ctx.notify = broken
    reply = c.api(f"/api/v1/exceptions/{PENDING_ID}/approve", "approver", {})
    assert reply.status == 200 and c.exceptions.state(PENDING_ID).state == "active"


# --- the pages -----------------------------------------------------------------------------


def test_the_queue_shows_each_pending_request_with_its_blocked_request(c):
    c.clock_ms.t += ex.MINUTE
    c.exceptions.append(requested(c.clock_ms, "ex-pending00002", user="li.si", request_id="gone"))
    html = page(c, "/exceptions", login(c, "appr"))
    queue = html.split('id="queue"')[1]
    assert queue.index(PENDING_ID) < queue.index("ex-pending00002")  # the oldest first
    row = queue.split(f'id="pending-{PENDING_ID}"')[1].split("</tr>")[0]
    for shown in (REQUESTER, "10.1.2.3", "POST", "example.com", "/compose", "webmail.example"):
        assert shown in row, shown
    assert "12.1 KiB" in row and "secret-in-query" not in html
    assert "request gone: no row found" in queue
    assert f'href="/exceptions/{PENDING_ID}"' in row and ACTIVE_ID not in queue
    (read,) = c.events("query_exception_requests")
    assert json.loads(read["detail"]) == {"exception_requests": [BLOCKED_REQUEST, "gone"]}
    # The request log being away does not take the queue away.
    c.store.failing = {"query"}
    still = page(c, "/exceptions", login(c, "appr"))
    assert PENDING_ID in still and "The request log is unavailable" in still


def test_an_approver_approves_from_the_detail_page(c):
    who = login(c, "appr")
    html = page(c, f"/exceptions/{PENDING_ID}", who)
    assert 'id="approve"' in html and 'id="deny"' in html and 'id="revoke"' not in html
    assert 'id="blocked-rows"' in html and "/compose" in html
    assert 'id="a-duration" value="2d"' in html and 'id="a-host" value="example.com"' in html
    reply = session_post(c, who, f"/exceptions/{PENDING_ID}/approve", {"duration": "1d"})
    assert reply.status == 303, reply.body
    assert reply.headers["location"] == f"/exceptions/{PENDING_ID}?done=approved"
    done = page(c, reply.headers["location"], who)
    assert 'id="done"' in done and "ex-active" in done and 'id="revoke"' in done
    assert c.exceptions.state(PENDING_ID).state == "active"
    assert c.exceptions.state(PENDING_ID).terms.duration_ms == ex.DAY
    assert [n.kind for n in c.notices] == ["approved"]


def test_a_refused_form_shows_why_and_is_recorded(c):
    who = login(c, "appr")
    reply = session_post(c, who, f"/exceptions/{PENDING_ID}/approve", {"duration": "9d"})
    assert reply.status == 400 and b'id="error"' in reply.body
    assert b"an approval may narrow the exception, not widen it" in reply.body
    assert b'id="a-duration" value="9d"' in reply.body  # what was typed is kept
    (note,) = c.events("exception_approve")
    assert note["outcome"] == "denied" and json.loads(note["detail"])["code"] == "widening"
    no_reason = session_post(c, who, f"/exceptions/{PENDING_ID}/deny", {"reason": ""})
    assert no_reason.status == 400 and b"give a reason" in no_reason.body
    denied = session_post(c, who, f"/exceptions/{PENDING_ID}/deny", {"reason": "use the portal"})
    assert denied.status == 303 and c.exceptions.state(PENDING_ID).state == "denied"
    assert session_post(c, who, "/exceptions/ex-nothere/approve", {}).status == 404


def test_the_grant_form_grants_or_says_why_not(c):
    who = login(c, "appr")
    form = page(c, "/exceptions/grant", who)
    assert 'id="grant"' in form and 'name="_xsrf"' in form
    fields = {
        "subject_kind": "client",
        "subject_value": "10.20.0.7",
        "control_kind": "upload",
        "target_kind": "exact_host",
        "target": "upload.example.net",
        "duration": "3d",
        "max_bytes": "200MiB",
        "reason": "the lab's instrument uploads its data",
    }
    reply = session_post(c, who, "/exceptions/grant", fields)
    assert reply.status == 303, reply.body
    exception_id = reply.headers["location"].split("/")[2].split("?")[0]
    s = c.exceptions.state(exception_id)
    assert s.state == "active" and str(s.terms.subject) == "client:10.20.0.7/32"
    assert s.terms.target == ex.Target("upload.example.net", True)
    assert s.terms.grant == ex.UploadGrant(per_request=200 * MiB)
    mine = session_post(c, who, "/exceptions/grant", fields | {"subject_value": "127.0.0.1"})
    assert mine.status == 403 and b"nobody grants an exception for themselves" in mine.body
    assert b'value="127.0.0.1"' in mine.body


def test_the_active_list_revokes_and_the_history_filters(c):
    who = login(c, "appr")
    active = page(c, "/exceptions/active", who)
    assert f'id="row-{ACTIVE_ID}"' in active and PENDING_ID not in active
    assert f'id="revoke-{ACTIVE_ID}"' in active
    reply = session_post(c, who, f"/exceptions/{ACTIVE_ID}/revoke", {"reason": "left the team"})
    assert reply.status == 303 and c.exceptions.state(ACTIVE_ID).state == "revoked"
    history = page(c, "/exceptions/history?state=revoked", who)
    assert f'id="row-{ACTIVE_ID}"' in history and PENDING_ID not in history
    shown = page(c, f"/exceptions/{ACTIVE_ID}", who)
    assert "left the team" in shown and "granted" in shown and "revoked" in shown
    assert 'id="revoke"' not in shown and 'id="approve"' not in shown
    bad = c.call("/exceptions/history?state=nope", headers={"Cookie": who.cookie})
    assert bad.status == 400 and b"state must be one of" in bad.body


def test_auditors_read_the_pages_without_forms(c):
    who = login(c, "aud")
    for path in ("/exceptions", "/exceptions/active", f"/exceptions/{PENDING_ID}"):
        html = page(c, path, who)
        assert '<form method="post" action="/exceptions' not in html, path
    assert c.call("/exceptions/grant", headers={"Cookie": who.cookie}).status == 403


def test_exception_pages_carry_no_script_escape_everything_and_token_every_form(c):
    hostile = '"><script>alert(1)</script>'
    c.exceptions.append(
        requested(c.clock_ms, "ex-hostile00001", reason=hostile, request_id="req-x")
    )
    who = login(c, "li.all")
    posts = 0
    for path in (
        "/exceptions",
        "/exceptions/active",
        "/exceptions/history",
        "/exceptions/grant",
        "/exceptions/ex-hostile00001",
        f"/exceptions/{ACTIVE_ID}",
    ):
        html = page(c, path, who)
        assert "<script" not in html.lower(), path
        assert not re.search(r"<[^>]+\son[a-z]+=", html, re.I), path
        for form in re.findall(r'<form\b[^>]*\bmethod="post".*?</form>', html, re.S | re.I):
            assert re.search(r'<input type="hidden" name="_xsrf" value="[^"]+"', form), form
            posts += 1
    assert posts >= 10
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page(c, "/exceptions", who)


def test_a_form_without_its_token_or_from_elsewhere_is_refused(c):
    who = login(c, "appr")
    path = f"/exceptions/{PENDING_ID}/approve"
    headers = {**FORM, "Cookie": who.cookie}
    assert c.call(path, method="POST", body=b"", headers=headers).status == 403
    body = urllib.parse.urlencode({"_xsrf": who.xsrf_field}).encode()
    evil = {**headers, "Origin": "https://evil.example"}
    assert c.call(path, method="POST", body=body, headers=evil).status == 403
    assert c.exceptions.state(PENDING_ID).state == "pending"


# --- the CLI against it --------------------------------------------------------------------


def cli(c: Setup, who: str, *args: str) -> Any:
    base = ["--admin", f"127.0.0.1:{c.port}", "--token", c.tokens[who], "--ca-cert", str(c.ca)]
    command, rest = args[0], list(args[1:])
    return CliRunner().invoke(cli_main, ["exceptions", command, *base, *rest])


def test_the_cli_grants_lists_shows_approves_denies_and_revokes(c):
    granted = cli(c, "approver", "grant", "--user", "li.na", "--host", "pan.example.cn",
                  "--for", "12h", "--reason", "hand over the drawings")  # fmt: skip
    assert granted.exit_code == 0, granted.output
    exception_id = granted.stdout.strip()
    assert re.fullmatch(r"ex-[0-9a-f]{12}", exception_id)
    assert c.exceptions.state(exception_id).terms.duration_ms == 12 * ex.HOUR

    listed = cli(c, "auditor", "list", "--state", "active", "--format", "json")
    assert {e["id"] for e in json.loads(listed.stdout)} == {ACTIVE_ID, exception_id}
    table = cli(c, "approver", "list", "--user", REQUESTER)
    assert table.exit_code == 0 and PENDING_ID in table.stdout and "requested by" in table.stdout

    approved = cli(c, "approver", "approve", PENDING_ID, "--for", "1d", "--reason", "fine")
    assert approved.exit_code == 0 and approved.stdout.strip() == PENDING_ID
    shown = cli(c, "auditor", "show", PENDING_ID)
    assert "exception ex-pending00001: active" in shown.stdout
    assert re.search(r"approved\s+appr ", shown.stdout) and "fine" in shown.stdout

    marker = cli(c, "approver", "grant", "--group", "sales", "--category", "webmail",
                 "--control", "marker:confidential", "--for", "8h",
                 "--reason", "the tender")  # fmt: skip
    assert marker.exit_code == 0, marker.output
    assert "pending" in marker.stderr and "approvals 1 of 2" in marker.stderr

    revoked = cli(c, "approver2", "revoke", exception_id, "--reason", "done early")
    assert revoked.exit_code == 0 and c.exceptions.state(exception_id).state == "revoked"
    c.exceptions.append(requested(c.clock_ms, "ex-pending00002", user="li.si", request_id="r2"))
    denied = cli(c, "approver", "deny", "ex-pending00002", "--reason", "not for work")
    assert denied.exit_code == 0 and c.exceptions.state("ex-pending00002").state == "denied"

    refused = cli(c, "approver", "grant", "--user", "appr", "--host", "x.example", "--for", "1h",
                  "--reason", "me")  # fmt: skip
    assert refused.exit_code == 1
    assert "admin API answered 403: nobody grants an exception for themselves" in refused.output
    wrong_role = cli(c, "auditor", "revoke", PENDING_ID, "--reason", "x")
    assert wrong_role.exit_code == 1 and "403" in wrong_role.output
    usage = cli(c, "approver", "grant", "--user", "a", "--group", "b", "--host", "h",
                "--for", "1h", "--reason", "r")  # fmt: skip
    assert usage.exit_code == 2 and "exactly one of --user, --group, --client" in usage.output
