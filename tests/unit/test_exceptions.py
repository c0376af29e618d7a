"""Exceptions, the pure model: values, the event fold, the rules approvers act under, the active
set the decision path asks, and the approvals policy section. Clocks are injected: no sleeps."""

import dataclasses
import ipaddress
import time

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from egress_guard.core.approvals import ApprovalsSpec, compile_approvals
from egress_guard.core.exceptions import (
    APPROVER_ROLE,
    BLOCK,
    DAY,
    HOUR,
    UNSCANNABLE,
    UPLOAD,
    ActiveException,
    ActiveExceptions,
    Actor,
    ApprovalRules,
    Control,
    ControlRule,
    Event,
    Refusal,
    Subject,
    Target,
    Terms,
    UploadGrant,
    approve,
    cancel,
    deny,
    event_from_json,
    event_to_json,
    grant,
    marker,
    new_event_id,
    new_exception_id,
    raised_limits,
    request,
    revoke,
    state_of,
    widening,
)
from egress_guard.core.policy import _validation_problems
from egress_guard.core.upload import Limits, check
from support import POLICIES

T0 = 1_800_000_000_000  # ms since the epoch (2027-01-15)
MiB = 1024 * 1024
GiB = 1024 * MiB

ALICE = Actor("alice", client_ip="10.1.2.3", groups=("finance",))  # an employee
LI = Actor("li.na", frozenset({APPROVER_ROLE}), "10.9.0.5")
WANG = Actor("wang.fang", frozenset({APPROVER_ROLE}), "10.9.0.6")
ZHAO = Actor("zhao.lei", frozenset({APPROVER_ROLE, "admin"}), "10.9.0.7")
ROOT = Actor("root", frozenset({"admin", "auditor"}), "10.9.0.8")

RULES = ApprovalRules(
    pending_ms=3 * DAY,
    controls={
        "block": ControlRule(True, 30 * DAY),
        "upload": ControlRule(True, 7 * DAY, max_per_request=1024 * MiB, max_per_window=5120 * MiB),
        "marker": ControlRule(True, DAY, approvals=2),
        "unscannable": ControlRule(True, DAY, approvals=2),
    },
    categories={("block", "webmail"): ControlRule(True, 7 * DAY)},
    levels={"national_secret": ControlRule(False)},
    approver_groups={"security": frozenset({"wang.fang"})},
)

QQ_MAIL = Target.for_host("mail.qq.com")
ALICE_SUBJECT = Subject.user("alice")


def terms(
    subject=ALICE_SUBJECT,
    control=BLOCK,
    target=QQ_MAIL,
    start=T0,
    days=5.0,
    grant=None,
    lowered_to="",
):
    return Terms(subject, control, target, start, start + int(days * DAY), grant, lowered_to)


class Log:
    """The append-only event list an API would keep, with the commands applied to its state."""

    def __init__(self, rules=RULES):
        self.rules = rules
        self.events: list[Event] = []
        self.id = new_exception_id()

    def add(self, result):
        assert isinstance(result, Event), result
        self.events.append(result)
        return result

    def state(self, now):
        return state_of(self.events, now).get(self.id)

    def request(self, t, now=T0, actor=ALICE, category="webmail", reason="customer sent files"):
        return request(
            self.rules,
            exception_id=self.id,
            event_id=new_event_id(),
            actor=actor,
            now_ms=now,
            terms=t,
            reason=reason,
            category=category,
            request_id="r-123",
        )

    def grant(self, t, actor=LI, now=T0, category="", reason="project X"):
        return grant(
            self.rules,
            exception_id=self.id,
            event_id=new_event_id(),
            actor=actor,
            now_ms=now,
            terms=t,
            reason=reason,
            category=category,
        )

    def approve(self, actor, now, t=None, reason=""):
        return approve(
            self.rules,
            self.state(now),
            event_id=new_event_id(),
            actor=actor,
            now_ms=now,
            terms=t,
            reason=reason,
        )

    def deny(self, actor, now, reason="not for work"):
        return deny(
            self.rules,
            self.state(now),
            event_id=new_event_id(),
            actor=actor,
            now_ms=now,
            reason=reason,
        )

    def cancel(self, actor, now):
        return cancel(self.state(now), event_id=new_event_id(), actor=actor, now_ms=now)

    def revoke(self, actor, now, reason="project over"):
        return revoke(
            self.rules,
            self.state(now),
            event_id=new_event_id(),
            actor=actor,
            now_ms=now,
            reason=reason,
        )


def active(events, now):
    return ActiveExceptions.from_states(state_of(events, now).values())


def find_block(index, now, user="alice", host="mail.qq.com", path="/", category="webmail"):
    return index.find(user, (), "10.1.2.3", BLOCK, host, path, category, "webmail.qq", now)


def refused(result, code):
    assert isinstance(result, Refusal), result
    assert result.code == code, result
    assert result.reason
    return result


# --- values --------------------------------------------------------------------------------


def test_values_are_validated_and_normalized():
    assert Subject.client("10.1.0.0/16").value == "10.1.0.0/16"
    assert Subject.client("10.1.2.3").value == "10.1.2.3/32"
    assert Subject.client("::ffff:10.1.0.0/112").value == "10.1.0.0/16"
    with pytest.raises(ValueError, match="host bits"):
        Subject.client("10.1.2.3/16")
    with pytest.raises(ValueError):
        Subject.user("")
    assert Subject.parse("group:finance") == Subject.group("finance")
    assert str(Subject.parse("client:fd00::/64")) == "client:fd00::/64"
    with pytest.raises(ValueError, match="user:NAME, group:NAME or client:CIDR"):
        Subject.parse("team:x")

    assert Control.parse("marker:trade_secret") == marker("trade_secret")
    assert str(marker("trade_secret")) == "marker:trade_secret"
    assert Control.parse("block") == BLOCK
    for bad in ("marker:", "marker", "block:x", "upload:x", "allow"):
        with pytest.raises(ValueError):
            Control.parse(bad)

    assert Target.for_host("Mail.QQ.com.").host == "mail.qq.com"
    assert Target.for_host("mail.qq.com", "/Mail/../Inbox/").path == "/inbox/"
    assert Target.for_exact_host("mail.qq.com").exact
    assert Target.for_category("webmail").kind == "category"
    assert Target.for_rule("webmail.qq").kind == "rule"
    for bad in (
        dict(),
        dict(path="/x"),
        dict(host="https://mail.qq.com"),
        dict(exact=True, category="webmail"),
        dict(category="Web Mail"),
    ):
        with pytest.raises(ValueError):
            Target(**bad)

    with pytest.raises(ValueError, match="after"):
        terms(days=0)
    with pytest.raises(ValueError, match="upload"):
        terms(control=UPLOAD)  # an upload exception names its limits
    with pytest.raises(ValueError, match="upload"):
        terms(grant=UploadGrant(per_request=MiB))  # and only an upload exception does
    with pytest.raises(ValueError, match="never unlimited"):
        UploadGrant()
    with pytest.raises(ValueError):
        UploadGrant(per_request=0)
    with pytest.raises(ValueError, match="lowered"):
        terms(control=marker("trade_secret"))
    with pytest.raises(ValueError, match="lowered"):
        terms(control=UNSCANNABLE, lowered_to="block")


def test_events_round_trip_through_json():
    log = Log()
    up = terms(control=UPLOAD, grant=UploadGrant(per_request=100 * MiB), days=2)
    first = log.add(log.request(up, category=""))
    again = event_from_json(event_to_json(first))
    assert again == first
    mark = terms(
        subject=Subject.client("fd00:1::/64"),
        control=marker("trade_secret"),
        target=Target.for_exact_host("drive.example.com", "/upload/"),
        lowered_to="alert",
        days=1,
    )
    ev = Log().grant(mark)
    assert event_from_json(event_to_json(ev)) == ev
    with pytest.raises(ValueError):
        event_from_json({**event_to_json(ev), "kind": "approved", "terms": None})


# --- lifecycle -----------------------------------------------------------------------------


def test_request_approve_active_until_the_exact_expiry():
    log = Log()
    t = terms(days=5)
    log.add(log.request(t))
    s = log.state(T0)
    assert s.state == "pending" and s.requester == "alice" and s.origin == "request"
    assert s.request_id == "r-123" and s.category == "webmail" and s.approvals_needed == 1
    assert find_block(active(log.events, T0), T0) is None  # pending lets nobody past

    approved_at = T0 + HOUR
    ev = log.add(log.approve(LI, approved_at))
    assert ev.kind == "approved" and ev.actor == "li.na" and ev.actor_roles == (APPROVER_ROLE,)
    assert ev.client_ip == "10.9.0.5" and ev.ts_ms == approved_at
    s = log.state(approved_at)
    assert s.state == "active" and s.approvers == ("li.na",)
    # Approved an hour late without narrowing: the five days run from the approval.
    assert s.terms.start_ms == approved_at and s.terms.expiry_ms == approved_at + 5 * DAY
    expiry = s.terms.expiry_ms

    index = active(log.events, approved_at)
    found = find_block(index, expiry - 1)
    assert isinstance(found, ActiveException) and found.id == log.id
    assert find_block(index, expiry) is None  # bites at the exact millisecond
    assert log.state(expiry - 1).state == "active"
    s = log.state(expiry)
    assert s.state == "expired" and s.ended_ms == expiry
    refused(log.revoke(LI, expiry), "wrong_state")


def test_deny_cancel_and_revoke_end_an_exception_and_nothing_follows():
    denied = Log()
    denied.add(denied.request(terms()))
    refused(denied.deny(WANG, T0 + 1, reason=" "), "no_reason")
    ev = denied.add(denied.deny(WANG, T0 + 1))
    s = denied.state(T0 + 2)
    assert s.state == "denied" and s.ended_by == "wang.fang" and s.end_reason == "not for work"
    refused(denied.approve(LI, T0 + 2), "wrong_state")
    # A late approval recorded on another node (a race) does not bring it back.
    late = dataclasses.replace(
        ev,
        id=new_event_id(),
        kind="approved",
        actor="li.na",
        ts_ms=T0 + 3,
        reason="",
        terms=terms(),
        approvals_needed=1,
    )
    s = state_of([*denied.events, late], T0 + 4)[denied.id]
    assert s.state == "denied" and s.ignored == (late.id,)

    cancelled = Log()
    cancelled.add(cancelled.request(terms()))
    refused(cancelled.cancel(LI, T0 + 1), "not_requester")
    cancelled.add(cancelled.cancel(ALICE, T0 + 1))
    assert cancelled.state(T0 + 1).state == "cancelled"
    assert cancelled.state(T0 + 1).ended_by == "alice"

    revoked = Log()
    revoked.add(revoked.request(terms()))
    refused(revoked.revoke(LI, T0 + 1), "wrong_state")  # a pending request is denied instead
    revoked.add(revoked.approve(LI, T0 + 1))
    refused(revoked.cancel(ALICE, T0 + 2), "wrong_state")
    refused(revoked.revoke(ALICE, T0 + 2), "not_approver")
    refused(revoked.revoke(LI, T0 + 2, reason=""), "no_reason")
    index_before = active(revoked.events, T0 + 2)
    assert find_block(index_before, T0 + 2) is not None
    revoked.add(revoked.revoke(WANG, T0 + 2))
    s = revoked.state(T0 + 2)
    assert s.state == "revoked" and s.ended_by == "wang.fang" and s.ended_ms == T0 + 2
    assert find_block(active(revoked.events, T0 + 2), T0 + 2) is None
    assert len(s.events) == 3 and [e.kind for e in s.events] == ["requested", "approved", "revoked"]


def test_a_pending_request_nobody_answers_expires_after_the_policy_time():
    log = Log()
    log.add(log.request(terms(days=5)))
    deadline = T0 + RULES.pending_ms
    assert log.state(T0).decide_by_ms == deadline
    assert log.state(deadline - 1).state == "pending"
    s = log.state(deadline)
    assert s.state == "expired" and s.ended_ms == deadline
    refused(log.approve(LI, deadline), "wrong_state")
    # An approval stamped after the deadline, recorded anyway, is ignored by the fold.
    late = dataclasses.replace(
        log.request(terms()),
        kind="approved",
        actor="li.na",
        id=new_event_id(),
        exception_id=log.id,
        ts_ms=deadline,
        actor_roles=(APPROVER_ROLE,),
        request_id="",
        decide_by_ms=0,
    )
    assert state_of([*log.events, late], deadline + 1)[log.id].state == "expired"
    # A request whose own window ends before the deadline expires with it.
    short = Log()
    short.add(short.request(terms(days=1)))
    assert short.state(T0 + DAY).state == "expired"


def test_a_direct_grant_is_active_at_once_and_may_be_scheduled():
    log = Log()
    ev = log.add(log.grant(terms(start=T0 + DAY, days=2)))
    assert ev.kind == "granted" and ev.approvals_needed == 1
    s = log.state(T0)
    assert s.state == "scheduled" and s.origin == "grant" and s.approvers == ("li.na",)
    index = active(log.events, T0)
    assert find_block(index, T0) is None
    assert find_block(index, T0 + DAY) is not None
    assert log.state(T0 + DAY).state == "active"
    assert log.state(T0 + 3 * DAY).state == "expired"


def test_marker_levels_need_two_different_approvers():
    log = Log()
    t = terms(
        control=marker("trade_secret"),
        target=Target.for_host("partner.example.com"),
        lowered_to="alert",
        days=1,
    )
    log.add(log.request(t, category=""))
    assert log.state(T0).approvals_needed == 2
    log.add(log.approve(LI, T0 + 1))
    s = log.state(T0 + 1)
    assert s.state == "pending" and s.approvers == ("li.na",)
    idx = active(log.events, T0 + 1)
    assert idx.find("alice", (), "", t.control, "partner.example.com", "/", "", "", T0 + 1) is None
    refused(log.approve(LI, T0 + 2), "already_approved")
    log.add(log.approve(WANG, T0 + 3))
    s = log.state(T0 + 3)
    assert s.state == "active" and s.approvers == ("li.na", "wang.fang")
    idx = active(log.events, T0 + 3)
    found = idx.find("alice", (), "", t.control, "partner.example.com", "/x", "", "", T0 + 3)
    assert found is not None and found.lowered_to == "alert"
    # Another level is another control.
    other = marker("english_classified")
    assert idx.find("alice", (), "", other, "partner.example.com", "/x", "", "", T0 + 3) is None

    # A direct grant counts as the first approval and still needs a second approver.
    granted = Log()
    granted.add(granted.grant(t))
    assert granted.state(T0).state == "pending"
    refused(granted.approve(LI, T0 + 1), "own_request")
    granted.add(granted.approve(WANG, T0 + 1))
    assert granted.state(T0 + 1).state == "active"

    # The same approver twice (two nodes, one click each) counts once.
    twice = Log()
    twice.add(twice.request(t, category=""))
    first = twice.add(twice.approve(LI, T0 + 1))
    dup = dataclasses.replace(first, id=new_event_id(), ts_ms=T0 + 2)
    s = state_of([*twice.events, dup], T0 + 3)[twice.id]
    assert s.state == "pending" and s.ignored == (dup.id,)


def test_nobody_approves_for_themselves_or_their_own_request():
    own = Log()
    own.add(own.request(terms(subject=Subject.user("li.na")), actor=LI))
    r = refused(own.approve(LI, T0 + 1), "own_request")
    assert "another approver" in r.reason
    own.add(own.approve(WANG, T0 + 1))  # somebody else may
    assert own.state(T0 + 1).state == "active"

    for_li = Log()
    for_li.add(for_li.request(terms(subject=Subject.user("li.na")), actor=ALICE))
    refused(for_li.approve(LI, T0 + 1), "self_approval")

    refused(Log().grant(terms(subject=Subject.user("li.na")), actor=LI), "self_approval")
    li_in_sales = dataclasses.replace(LI, groups=("sales",))
    refused(Log().grant(terms(subject=Subject.group("sales")), actor=li_in_sales), "self_approval")
    r = refused(
        Log().grant(terms(subject=Subject.client("10.9.0.0/24")), actor=LI), "self_approval"
    )
    assert "10.9.0.5" in r.reason
    assert isinstance(Log().grant(terms(subject=Subject.client("10.1.0.0/24")), actor=LI), Event)

    # The fold refuses the same even when handed such an event.
    selfish = Log()
    selfish.add(selfish.request(terms(subject=Subject.user("li.na")), actor=ALICE))
    forged = dataclasses.replace(
        selfish.events[0],
        id=new_event_id(),
        kind="approved",
        actor="li.na",
        actor_roles=(APPROVER_ROLE,),
        ts_ms=T0 + 1,
        request_id="",
        decide_by_ms=0,
    )
    assert state_of([*selfish.events, forged], T0 + 2)[selfish.id].state == "pending"


def test_only_the_approver_role_decides_and_approver_groups_narrow_who():
    log = Log()
    log.add(log.request(terms()))
    for actor in (ROOT, ALICE, Actor("bob", frozenset({"auditor"}))):
        refused(log.approve(actor, T0 + 1), "not_approver")
        refused(log.deny(actor, T0 + 1), "not_approver")
    refused(Log().grant(terms(), actor=ROOT), "not_approver")
    assert isinstance(log.approve(ZHAO, T0 + 1), Event)  # admin *and* approver: may

    rules = dataclasses.replace(
        RULES,
        controls={
            **RULES.controls,
            "upload": dataclasses.replace(
                RULES.controls["upload"], approved_by=frozenset({"security"})
            ),
        },
    )
    up = terms(control=UPLOAD, grant=UploadGrant(per_request=100 * MiB), days=1)
    log = Log(rules)
    log.add(log.request(up, category=""))
    r = refused(log.approve(LI, T0 + 1), "not_in_approver_group")
    assert "security" in r.reason
    refused(log.deny(LI, T0 + 1), "not_in_approver_group")
    log.add(log.approve(WANG, T0 + 1))
    assert log.state(T0 + 1).state == "active"


def test_the_rules_bound_what_may_be_asked_and_granted():
    log = Log()
    refused(log.request(terms(), actor=Actor("")), "unknown_requester")
    refused(log.request(terms(), reason="  "), "no_reason")
    # A webmail block: at most 7 days; any other block: 30.
    r = refused(log.request(terms(days=8)), "too_long")
    assert "7d" in r.reason
    assert isinstance(log.request(terms(days=8), category="cloud_drive"), Event)
    refused(log.request(terms(days=31), category="cloud_drive"), "too_long")
    nat = terms(control=marker("national_secret"), lowered_to="alert", days=1)
    refused(log.request(nat, category=""), "not_allowed")
    refused(log.grant(nat), "not_allowed")
    refused(log.request(terms(start=T0 - 2 * DAY, days=1)), "bad_terms")  # already over
    refused(log.request(terms(start=T0 + 60 * DAY, days=1)), "bad_terms")  # too far ahead
    big = terms(control=UPLOAD, grant=UploadGrant(per_request=2048 * MiB), days=1)
    r = refused(log.request(big, category=""), "too_large")
    assert "1 GiB" in r.reason
    low = terms(control=UNSCANNABLE, lowered_to="log", days=1)
    refused(log.request(low, category=""), "lowered_too_far")
    # The category the target names and the one the rules are applied under must agree.
    cat = terms(target=Target(host="mail.qq.com", category="webmail"))
    refused(log.request(cat, category="cloud_drive"), "bad_terms")
    assert log.request(cat, category="").category == "webmail"
    refused(Log(ApprovalRules()).request(terms()), "not_allowed")  # no rules: nothing lifts


def test_an_approval_may_narrow_but_never_widen():
    requested = terms(
        subject=Subject.client("10.1.0.0/16"),
        control=UPLOAD,
        target=Target.for_category("cloud_drive"),
        grant=UploadGrant(per_request=500 * MiB, per_window=2048 * MiB),
        days=5,
    )
    narrower = [
        dataclasses.replace(requested, expiry_ms=requested.expiry_ms - DAY),
        dataclasses.replace(requested, subject=Subject.client("10.1.2.0/24")),
        dataclasses.replace(requested, target=Target(host="pan.baidu.com", category="cloud_drive")),
        dataclasses.replace(
            requested, target=Target(host="pan.baidu.com", path="/disk/", category="cloud_drive")
        ),
        dataclasses.replace(requested, grant=UploadGrant(per_request=100 * MiB, per_window=MiB)),
        dataclasses.replace(requested, start_ms=T0 + HOUR, expiry_ms=requested.expiry_ms),
    ]
    for t in narrower:
        assert widening(t, requested) == "", t
    wider = {
        "expiry": dataclasses.replace(requested, expiry_ms=requested.expiry_ms + 1),
        "start": dataclasses.replace(requested, start_ms=T0 - 1, expiry_ms=requested.expiry_ms - 1),
        "subject": dataclasses.replace(requested, subject=Subject.client("10.0.0.0/8")),
        "another subject": dataclasses.replace(requested, subject=Subject.user("alice")),
        "category": dataclasses.replace(requested, target=Target.for_category("webmail")),
        "host outside": dataclasses.replace(requested, target=Target.for_host("pan.baidu.com")),
        "bytes": dataclasses.replace(requested, grant=UploadGrant(per_request=501 * MiB)),
        "window": dataclasses.replace(
            requested, grant=UploadGrant(per_request=MiB, per_window=4096 * MiB)
        ),
        "control": dataclasses.replace(requested, control=BLOCK, grant=None),
    }
    for what, t in wider.items():
        assert widening(t, requested), what

    host = terms(target=Target.for_host("mail.qq.com", "/inbox/"))
    assert widening(terms(target=Target.for_exact_host("mail.qq.com", "/inbox/x")), host) == ""
    assert widening(terms(target=Target.for_host("x.mail.qq.com", "/inbox/")), host) == ""
    assert widening(terms(target=Target.for_host("qq.com", "/inbox/")), host)
    assert widening(terms(target=Target.for_host("mail.qq.com")), host)
    exact = terms(target=Target.for_exact_host("mail.qq.com"))
    assert widening(terms(target=Target.for_host("mail.qq.com")), exact)
    assert widening(terms(target=Target.for_exact_host("x.mail.qq.com")), exact)
    rule = terms(target=Target.for_rule("webmail.qq"))
    assert widening(terms(target=Target(host="mail.qq.com", rule_id="webmail.qq")), rule) == ""
    assert widening(terms(target=Target.for_rule("webmail.163")), rule)
    alert = terms(control=marker("m"), lowered_to="alert")
    assert widening(terms(control=marker("m"), lowered_to="log"), alert)
    assert widening(alert, terms(control=marker("m"), lowered_to="log")) == ""

    log = Log()
    log.add(log.request(requested, category="cloud_drive"))
    r = refused(log.approve(LI, T0 + 1, t=wider["bytes"]), "widening")
    assert "500 MiB" in r.reason
    refused(log.approve(LI, T0 + 1, t=wider["host outside"]), "widening")
    narrowed = dataclasses.replace(narrower[3], start_ms=T0 + 1, expiry_ms=T0 + 1 + DAY)
    log.add(log.approve(LI, T0 + 1, t=narrowed))
    s = log.state(T0 + 2)
    assert s.state == "active" and s.terms == narrowed and s.requested == requested


def test_events_apply_in_order_with_the_creation_first():
    log = Log()
    log.add(log.request(terms()))
    approval = log.add(log.approve(LI, T0 + 1))
    # An approval stamped a little before the request (two nodes' clocks) still applies.
    skewed = [dataclasses.replace(approval, ts_ms=T0 - 5), log.events[0]]
    assert state_of(skewed, T0 + 1)[log.id].state == "active"
    # Replays of one event are one event; an event of an unknown exception is no exception.
    orphan = dataclasses.replace(approval, id=new_event_id(), exception_id="ex-unknown")
    states = state_of([*log.events, *log.events, orphan], T0 + 2)
    assert list(states) == [log.id] and len(states[log.id].events) == 2


# --- the active set --------------------------------------------------------------------------


def granted(subject, target=QQ_MAIL, control=BLOCK, days=1.0, **kw):
    log = Log()
    log.add(log.grant(terms(subject=subject, target=target, control=control, days=days, **kw)))
    return log


def index_of(*logs, now=T0):
    return active([e for log in logs for e in log.events], now)


def test_lookup_by_user_group_and_client_network():
    user = granted(Subject.user("alice"))
    group = granted(Subject.group("finance"), Target.for_host("pan.baidu.com"))
    v4 = granted(Subject.client("10.20.0.0/16"), Target.for_host("mega.nz"))
    host32 = granted(Subject.client("10.30.1.7"), Target.for_host("mega.nz"))
    v6 = granted(Subject.client("fd00:1::/64"), Target.for_host("mega.nz"))
    idx = index_of(user, group, v4, host32, v6)
    assert len(idx) == 5

    def who(u, groups, ip, host):
        found = idx.find(u, groups, ip, BLOCK, host, "/", "", "", T0)
        return found.id if found else None

    assert who("alice", (), "", "mail.qq.com") == user.id
    assert who("bob", (), "", "mail.qq.com") is None
    assert who("bob", ("sales", "finance"), "", "pan.baidu.com") == group.id
    assert who("bob", ("sales",), "", "pan.baidu.com") is None
    assert who("", (), "10.20.255.1", "mega.nz") == v4.id
    assert who("", (), "::ffff:10.20.0.9", "mega.nz") == v4.id
    assert who("", (), "10.21.0.1", "mega.nz") is None
    assert who("", (), "10.30.1.7", "mega.nz") == host32.id
    assert who("", (), "10.30.1.8", "mega.nz") is None
    assert who("", (), "fd00:1::abcd", "mega.nz") == v6.id
    assert who("", (), "fd00:2::1", "mega.nz") is None
    assert who("", (), "not an address", "mega.nz") is None
    assert idx.find("alice", (), "", UPLOAD, "mail.qq.com", "/", "", "", T0) is None


def test_lookup_by_target_kind():
    sub = granted(Subject.user("a"), Target.for_host("qq.com"))
    exact = granted(Subject.user("b"), Target.for_exact_host("mail.qq.com"))
    path = granted(Subject.user("c"), Target.for_host("www.icloud.com", "/mail/"))
    cat = granted(Subject.user("d"), Target.for_category("webmail"))
    rule = granted(Subject.user("e"), Target.for_rule("webmail.qq"))
    both = granted(Subject.user("f"), Target(host="mail.qq.com", category="webmail"))
    ip = granted(Subject.user("g"), Target.for_host("203.0.113.9"))
    idx = index_of(sub, exact, path, cat, rule, both, ip)

    def hit(user, host, path="/", category="", rule_id=""):
        return idx.find(user, (), "", BLOCK, host, path, category, rule_id, T0) is not None

    assert hit("a", "qq.com") and hit("a", "x.mail.qq.com") and hit("a", "MAIL.QQ.COM.")
    assert not hit("a", "notqq.com")
    assert hit("b", "mail.qq.com") and not hit("b", "x.mail.qq.com")
    assert hit("c", "www.icloud.com", "/mail/inbox") and hit("c", "www.icloud.com", "/MAIL/")
    assert not hit("c", "www.icloud.com", "/photos/")
    assert not hit("c", "www.icloud.com", "/x/../photos/")
    assert not hit("c", "www.icloud.com", None)  # a CONNECT: the path is not known yet
    assert hit("d", "anything.example", category="webmail") and not hit("d", "mail.qq.com")
    assert hit("e", "mail.qq.com", rule_id="webmail.qq") and not hit("e", "mail.qq.com")
    assert hit("f", "mail.qq.com", category="webmail")
    assert not hit("f", "mail.qq.com", category="cloud_drive")  # a host narrowed from webmail
    assert hit("g", "203.0.113.9") and not hit("g", "x.203.0.113.9")


def test_upload_exception_raises_the_cap_to_exactly_the_granted_size():
    g = UploadGrant(per_request=100 * MiB)
    log = granted(Subject.user("alice"), Target.for_category("cloud_drive"), UPLOAD, grant=g)
    idx = index_of(log)
    found = idx.find(
        "alice",
        ("finance",),
        "10.1.2.3",
        UPLOAD,
        "pan.baidu.com",
        "/",
        "cloud_drive",
        "cloud_drive.baidu",
        T0,
    )
    assert found is not None and found.grant == g
    policy = Limits(10 * MiB, 200 * MiB, 86400, "uploads.per_request", "uploads.per_user")
    limits = raised_limits(policy, found)
    assert limits.per_request == 100 * MiB and limits.per_request_id == f"exception.{log.id}"
    assert limits.per_user == 200 * MiB and limits.per_user_id == "uploads.per_user"
    assert check(limits, 100 * MiB, 0) is None
    hit = check(limits, 100 * MiB + 1, 0)
    assert hit is not None and hit.cap == 100 * MiB and hit.cap_id == f"exception.{log.id}"
    # A grant never lowers a cap: an unlimited or larger policy limit stays.
    unlimited = Limits(None, 50 * MiB, 86400, "uploads.company-services", "uploads.per_user")
    both = dataclasses.replace(found, grant=UploadGrant(per_request=MiB, per_window=GiB))
    assert raised_limits(unlimited, both).per_request is None
    assert raised_limits(unlimited, both).per_user == GiB
    assert raised_limits(policy, dataclasses.replace(found, grant=UploadGrant(per_window=MiB))) == (
        policy
    )


def test_the_most_generous_match_wins_and_its_id_is_returned():
    small = granted(
        Subject.user("alice"),
        Target.for_host("pan.baidu.com"),
        UPLOAD,
        grant=UploadGrant(per_request=20 * MiB),
    )
    large = granted(
        Subject.group("finance"),
        Target.for_category("cloud_drive"),
        UPLOAD,
        grant=UploadGrant(per_request=80 * MiB),
    )
    idx = index_of(small, large)
    found = idx.find("alice", ("finance",), "", UPLOAD, "pan.baidu.com", "/", "cloud_drive", "", T0)
    assert found.id == large.id
    x = Target.for_host("x.com")
    alert = ActiveException(
        "ex-alert", Subject.user("alice"), UNSCANNABLE, x, T0, T0 + DAY, lowered_to="alert"
    )
    log = ActiveException(
        "ex-log", Subject.group("finance"), UNSCANNABLE, x, T0, T0 + DAY, lowered_to="log"
    )
    idx = ActiveExceptions([alert, log])
    assert idx.find("alice", ("finance",), "", UNSCANNABLE, "x.com", "/", "", "", T0) == log
    assert idx.find("alice", (), "", UNSCANNABLE, "x.com", "/", "", "", T0) == alert


def test_active_set_counts_and_next_change():
    now_on = granted(Subject.user("a"), days=1)
    later = Log()
    later.add(later.grant(terms(subject=Subject.user("b"), start=T0 + HOUR, days=1)))
    idx = index_of(now_on, later)
    assert idx.count_in_force(T0) == 1 and idx.count_in_force(T0 + HOUR) == 2
    assert idx.next_change_ms(T0) == T0 + HOUR
    assert idx.next_change_ms(T0 + HOUR) == T0 + DAY
    assert idx.next_change_ms(T0 + 2 * DAY) is None


def test_ten_thousand_active_exceptions_cost_a_few_microseconds_per_lookup():
    """Lookups probe the user, each group and each network prefix length present: their cost
    does not grow with the number of exceptions."""
    entries = []
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            subject = Subject.user(f"user{i}")
        elif kind == 1:
            subject = Subject.group(f"group{i % 500}")
        elif kind == 2:
            subject = Subject.client(f"10.{i % 200}.{i % 250}.0/24")
        else:  # networks of five prefix lengths
            plen = (16, 20, 24, 28, 32)[i % 5]
            net = ipaddress.ip_network(f"10.{i % 256}.{i * 7 % 256}.{i % 256}/{plen}", strict=False)
            subject = Subject.client(str(net))
        target = (
            Target.for_host(f"h{i}.example.com", "/up/" if i % 3 == 0 else "")
            if i % 5
            else Target.for_category(f"cat{i % 7}")
        )
        entries.append(
            ActiveException(f"ex-{i}", subject, BLOCK, target, T0, T0 + DAY, None, "", ("li.na",))
        )
    idx = ActiveExceptions(entries)
    assert len(idx) == 10_000
    # A user with exceptions of their own, in groups that have some, behind a network that has.
    user, groups, ip = "user4", ("group1", "group5", "group9"), "10.2.2.7"
    assert idx.find(user, groups, ip, BLOCK, "h4.example.com", "/", "", "", T0).id == "ex-4"

    def per_call(user, groups, ip, host, category, n=20_000):
        find = idx.find
        start = time.perf_counter()
        for _ in range(n):
            find(user, groups, ip, BLOCK, host, "/up/x", category, "cloud.x", T0)
        return (time.perf_counter() - start) / n * 1e6

    def best(*args):
        per_call(*args)  # warm the caches
        return min(per_call(*args) for _ in range(3))

    hit = best(user, groups, ip, "h4.example.com", "")
    miss = best(user, groups, ip, "www.nowhere.example.org", "cat9")
    nobody = best("nobody", (), "192.168.1.1", "www.example.org", "")  # most requests
    print(
        f"\n10 000 exceptions, per lookup: {hit:.2f} µs (a match), {miss:.2f} µs (subject has "
        f"exceptions, none for this host), {nobody:.2f} µs (subject has none)"
    )
    assert max(hit, miss, nobody) < 25, (hit, miss, nobody)  # a few µs; generous for slow CI


# --- the approvals policy ------------------------------------------------------------------


class ApprovalsFile(BaseModel):
    """A file holding the ``approvals:`` section, as the policy loader's file schema has it."""

    model_config = ConfigDict(extra="forbid")
    approvals: ApprovalsSpec = ApprovalsSpec()


def shipped_approvals():
    """The shipped file (``approvals.yaml``; ``approvals.yaml.next`` until the policy loader
    takes the section)."""
    for name in ("approvals.yaml", "approvals.yaml.next"):
        if (POLICIES / name).exists():
            return POLICIES / name
    raise AssertionError("no shipped approvals policy")


def approvals_problems(path):
    """Validate one file's ``approvals:`` section as the policy loader does: file:line: field."""
    text = path.read_text(encoding="utf-8")
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    try:
        ApprovalsFile.model_validate(yaml.safe_load(text))
    except ValidationError as e:
        return _validation_problems(path, root, e)
    return []


def test_shipped_approvals_policy_compiles_to_the_documented_defaults():
    path = shipped_approvals()
    assert approvals_problems(path) == []
    spec = ApprovalsFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    rules = compile_approvals(spec.approvals)
    assert rules.pending_ms == 3 * DAY
    assert rules.rule_for(BLOCK, "cloud_drive").max_duration_ms == 30 * DAY
    assert rules.rule_for(BLOCK, "webmail").max_duration_ms == 30 * DAY
    assert rules.rule_for(BLOCK, "").approvals == 1
    up = rules.rule_for(UPLOAD, "")
    assert up.allowed and up.max_per_request == GiB and up.max_per_window == 5 * GiB
    m = rules.rule_for(marker("trade_secret"), "")
    assert m.allowed and m.max_duration_ms == DAY and m.approvals == 2 and m.lowest == "alert"
    assert not rules.rule_for(marker("national_secret"), "").allowed
    assert rules.rule_for(UNSCANNABLE, "").approvals == 2
    # An empty section means the same defaults, but only a file names the levels never lifted;
    # no section at all lifts nothing.
    assert compile_approvals(ApprovalsSpec()) == dataclasses.replace(rules, levels={})
    assert not ApprovalRules().rule_for(BLOCK, "").allowed


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        ("approvals:\n  pending_expiry: soon\n", 2, "approvals.pending_expiry", "duration"),
        (
            "approvals:\n  controls:\n    block:\n      max_duration: 120d\n",
            4,
            "approvals.controls.block.max_duration",
            "90d",
        ),
        (
            "approvals:\n  controls:\n    marker:\n      approvals: 5\n",
            4,
            "approvals.controls.marker.approvals",
            "less than or equal to 3",
        ),
        (
            "approvals:\n  controls:\n    block:\n      lowest_action: log\n",
            4,
            "approvals.controls.block.lowest_action",
            "Extra inputs",
        ),
        (
            "approvals:\n  controls:\n    block:\n      categories:\n        web-mail: {}\n",
            5,
            "approvals.controls.block.categories.web-mail.[key]",
            "pattern",
        ),
        (
            "approvals:\n  controls:\n    upload:\n      approved_by: [security]\n",
            4,
            "approvals.controls.upload.approved_by",
            "security",
        ),
        (
            "approvals:\n  controls:\n    upload:\n      max_per_request: unlimited\n",
            4,
            "approvals.controls.upload.max_per_request",
            "size",
        ),
    ],
)
def test_approvals_errors_name_file_line_and_field(tmp_path, text, line, field, words):
    path = tmp_path / "approvals.yaml"
    path.write_text(text, encoding="utf-8")
    msgs = approvals_problems(path)
    expected = f"{path}:{line}: {field}:"
    assert any(m.startswith(expected) and words in m for m in msgs), msgs


def test_approvals_overrides_inherit_and_groups_compile():
    spec = ApprovalsSpec.model_validate(
        {
            "pending_expiry": "12h",
            "approver_groups": {"security": ["wang.fang", "li.na"], "it": ["zhao.lei"]},
            "controls": {
                "block": {
                    "max_duration": "14d",
                    "approved_by": ["it"],
                    "categories": {"webmail": {"max_duration": "2d", "approvals": 2}},
                },
                "marker": {"levels": {"trade_secret": {"allowed": True, "lowest_action": "log"}}},
                "unscannable": {"allowed": False},
            },
        }
    )
    rules = compile_approvals(spec)
    assert rules.pending_ms == 12 * HOUR
    web = rules.rule_for(BLOCK, "webmail")
    assert (web.max_duration_ms, web.approvals, web.approved_by) == (2 * DAY, 2, {"it"})
    assert rules.rule_for(BLOCK, "cloud_drive").max_duration_ms == 14 * DAY
    assert rules.rule_for(marker("trade_secret"), "").lowest == "log"
    assert rules.rule_for(marker("trade_secret"), "").approvals == 2  # inherited
    assert not rules.rule_for(UNSCANNABLE, "").allowed
    assert rules.groups_of("li.na") == {"security"}
    assert spec.unknown_names({"webmail"}, {"national_secret"}) == [
        (
            ["approvals", "controls", "marker", "levels", "trade_secret"],
            "unknown marker level 'trade_secret' (levels: national_secret)",
        ),
    ]


def test_the_policy_loader_takes_the_section(tmp_path):
    """Once ``core/policy.py`` holds the ``approvals`` section (see the report for its lines)."""
    from egress_guard.core.policy import PolicyError, PolicyFileSpec, load_policy
    from support import policy_copy

    if "approvals" not in PolicyFileSpec.model_fields:
        pytest.skip("core/policy.py does not take the approvals section yet")
    policy = load_policy(POLICIES)
    assert not policy.approvals.rule_for(marker("national_secret"), "").allowed
    assert policy.approvals.rule_for(marker("trade_secret"), "").approvals == 2
    typo = "approvals:\n  controls:\n    block:\n      categories:\n        webmial: {}\n"
    d = policy_copy(tmp_path, {"approvals.yaml": typo})
    with pytest.raises(PolicyError) as err:
        load_policy(d)
    (msg,) = err.value.problems
    assert msg.startswith(f"{d / 'approvals.yaml'}:5: approvals.controls.block.categories.webmial:")
    assert "unknown category 'webmial'" in msg
    d = policy_copy(tmp_path / "two", {"more.yaml": "approvals:\n  pending_expiry: 1d\n"})
    with pytest.raises(PolicyError, match="approvals: already given"):
        load_policy(d)
