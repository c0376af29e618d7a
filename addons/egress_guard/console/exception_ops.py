"""The approvers' exception workflow, shared by the API (``exceptions_api``) and the pages
(``exceptions_pages``): who acts (an ``Actor`` from the caller's account and the policy's
groups), what they ask for (terms read from a JSON body or a form), the commands of
``core.exceptions`` checked and appended to the gateway's book under one lock, the notices a
change sends, the states read from the book (and older ones from the store), the blocked
request a pending exception came from, and the JSON shapes of all of it.

The book is the primary record (on disk before an answer, then in ``exception_events``);
``console_events`` notes each call and each refusal beside it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, get_args

from egress_guard.core import exceptions as ex
from egress_guard.core.hosts import is_ip_literal, normalize_path
from egress_guard.core.units import format_size, parse_duration, parse_size
from egress_guard.notify import ExceptionNotice
from egress_guard.requestlog.store import RequestFilter

from .context import ConsoleContext

if TYPE_CHECKING:
    from egress_guard.core.policy import Policy

log = logging.getLogger("egress_guard.console")

STATES: tuple[str, ...] = get_args(ex.StateName)
STATE_FILTERS = (*STATES, "live", "all")
MAX_LIST = 1000
# The blocked request an approver sees: the row and its connection's, at most this many.
MAX_BLOCKED_ROWS = 50
# A block page's form is good for a day: its request is at most that much older.
REQUEST_LOOKBACK = timedelta(days=2)
CONNECTION_SPAN = timedelta(hours=1)
# What an approver sees of those rows: what is needed to decide (no query string, no user
# agent, no error text: those are the auditor's, through the request log).
APPROVER_COLUMNS = (
    "ts",
    "request_id",
    "connection_id",
    "kind",
    "user",
    "groups",
    "client_ip",
    "method",
    "scheme",
    "host",
    "port",
    "path",
    "status",
    "decision",
    "reason_kind",
    "rule_id",
    "category",
    "marker_levels",
    "exception_id",
    "request_bytes",
    "upload_bytes",
    "declared_bytes",
    "forwarded_bytes",
)
# A refusal's code → the HTTP status it is answered with.
REFUSAL_STATUS = {
    "unknown_exception": 404,
    "wrong_state": 409,
    "already_approved": 409,
    "superseded": 409,
    "not_approver": 403,
    "not_in_approver_group": 403,
    "self_approval": 403,
    "own_request": 403,
    "not_requester": 403,
    "unavailable": 503,
}

# One decision at a time on this node: the state a command checks is the state it appends to.
# (Two nodes racing are settled by the fold: the later event is ignored, and said so.)
_decisions = threading.Lock()


class BadInput(ValueError):
    """A field that cannot be read (wrong type, unknown, malformed): 400 with its message."""


# --- the policy, for the gateway's wiring ----------------------------------------------------


def category_of(policy: Policy, target: ex.Target) -> str:
    """The destination category an exception to ``target`` is decided under: the target's own,
    a rule's, or that of every rule the target's host reaches (the rules naming the host or a
    parent that covers it, and for a host with its subdomains the rules naming those), block
    rules first. ValueError when these span several categories: the rules of one must not
    decide for another's sites."""
    if target.category:
        return target.category
    if target.rule_id:
        rule = next((r for r in policy.rules if r.id == target.rule_id), None)
        return rule.category if rule else ""
    host, path = target.host, target.path
    found: dict[str, set[str]] = {"block": set(), "allow": set()}
    for rule in policy.rules:
        if (
            path
            and rule.paths
            and not any(
                normalize_path(p).startswith(path) or path.startswith(normalize_path(p))
                for p in rule.paths
            )
        ):
            continue
        patterns = [(h, is_ip_literal(h)) for h in rule.hosts]
        patterns += [(h, True) for h in rule.exact_hosts]
        for pattern, exact in patterns:
            covers = pattern == host or (not exact and host.endswith("." + pattern))
            within = not target.exact and pattern.endswith("." + host)
            if covers or within:
                found.setdefault(rule.action, set()).add(rule.category)
                break
    categories = found["block"] or found["allow"]
    if len(categories) > 1:
        raise ValueError(
            f"{host} reaches sites of several categories ({', '.join(sorted(categories))}): "
            "give a narrower host, or one category"
        )
    return next(iter(categories), "")


def groups_of(policy: Policy, name: str) -> tuple[str, ...]:
    """The groups a proxy user of this name is in: ``user_groups``, and the groups of every
    identity (client network) that names them."""
    groups = list(policy.user_groups.get(name, ()))
    for identity in policy.identities:
        if identity.user == name:
            groups += identity.groups
    return tuple(dict.fromkeys(groups))


# --- times and values ------------------------------------------------------------------------


def iso(ms: int) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC (``2026-11-21T08:30:00.123Z``); None for 0."""
    if not ms:
        return None
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_of(when: datetime) -> int:
    return round((when - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1))


def duration_ms(text: str) -> int:
    try:
        ms = int(parse_duration(text).total_seconds() * 1000)
    except OverflowError:
        raise BadInput(f"{text!r} is too long a duration") from None
    except ValueError as e:
        raise BadInput(str(e)) from None
    if ms <= 0:
        raise BadInput("a duration is longer than zero")
    return ms


def start_ms(text: str) -> int:
    """A start given as ISO 8601 (naive: UTC)."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ms = ms_of(when.astimezone(UTC))
    except (ValueError, OverflowError):
        raise BadInput(f"start {text!r} is not an ISO 8601 time (2026-11-21T09:00:00Z)") from None
    if ms < 0:
        raise BadInput("start is before 1970")
    return ms


def grant_text(terms: ex.Terms) -> str:
    """What an exception lets through, in a few words (for notices and tables)."""
    if terms.grant is not None:
        parts = []
        if terms.grant.per_request is not None:
            parts.append(f"up to {format_size(terms.grant.per_request)} per request")
        if terms.grant.per_window is not None:
            parts.append(f"up to {format_size(terms.grant.per_window)} per window")
        return ", ".join(parts)
    if terms.lowered_to:
        return f"block → {terms.lowered_to}"
    return ""


# --- input -----------------------------------------------------------------------------------


class Fields:
    """The fields of a JSON object (typed: a wrong type is refused) or of a form (text)."""

    def __init__(self, data: Mapping[str, Any], *, form: bool, known: Iterable[str]):
        self.data, self.form = data, form
        if not form:
            unknown = sorted(set(data) - set(known))
            if unknown:
                raise BadInput(f"unknown field {unknown[0]!r}")

    def text(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadInput(f"{name} must be text")
        if not value.isprintable() and name != "reason":
            raise BadInput(f"{name} holds control characters")
        value = value.strip()
        return value or None

    def required(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise BadInput(f"{name} is required")
        return value

    def flag(self, name: str) -> bool | None:
        value = self.data.get(name)
        if value is None:
            return None
        if self.form:
            return str(value).strip().lower() in ("1", "on", "true", "yes")
        if not isinstance(value, bool):
            raise BadInput(f"{name} must be true or false")
        return value

    def size(self, name: str) -> int | None:
        value = self.data.get(name)
        if value is None or (self.form and not str(value).strip()):
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadInput(f"{name} must be a number of bytes")
        try:
            size = parse_size(value)
        except ValueError as e:
            raise BadInput(f"{name}: {e}") from None
        if size <= 0:
            raise BadInput(f"{name} must be above zero")
        return size


GRANT_FIELDS = (
    "subject",
    "control",
    "host",
    "exact",
    "path",
    "category",
    "rule",
    "duration",
    "start",
    "per_request",
    "per_window",
    "lowered_to",
    "reason",
)
APPROVE_FIELDS = (
    "duration",
    "subject",
    "host",
    "exact",
    "path",
    "per_request",
    "per_window",
    "lowered_to",
    "reason",
)
REASON_FIELDS = ("reason",)


def _lowered(f: Fields, control: ex.Control) -> str:
    lowered = f.text("lowered_to")
    if control.kind in ("marker", "unscannable"):
        lowered = lowered or "alert"
        if lowered not in ("alert", "log"):
            raise BadInput("lowered_to must be alert or log")
        return lowered
    if lowered is not None:
        raise BadInput("only a marker or unscannable exception lowers an action")
    return ""


def _grant(f: Fields, control: ex.Control) -> ex.UploadGrant | None:
    per_request, per_window = f.size("per_request"), f.size("per_window")
    if control.kind != "upload":
        if per_request is not None or per_window is not None:
            raise BadInput("only an upload exception grants bytes")
        return None
    if per_request is None and per_window is None:
        raise BadInput("an upload exception needs per_request and/or per_window bytes")
    return ex.UploadGrant(per_request, per_window)


def _target(host: str | None, exact: bool, path: str | None, category: str, rule: str) -> ex.Target:
    if host is not None:
        t = ex.Target.for_host(host, path or "", exact=exact)
        return ex.Target(t.host, t.exact, t.path, category, rule)
    if path is not None or exact:
        raise BadInput("a path prefix or an exact host needs a host")
    return ex.Target(category=category, rule_id=rule)


def grant_terms(f: Fields, now_ms: int) -> ex.Terms:
    """The terms a direct grant asks for; BadInput says which field is wrong."""
    try:
        subject = ex.Subject.parse(f.required("subject"))
        control = ex.Control.parse(f.text("control") or "block")
        target = _target(
            f.text("host"),
            bool(f.flag("exact")),
            f.text("path"),
            f.text("category") or "",
            f.text("rule") or "",
        )
        start = start_ms(s) if (s := f.text("start")) else now_ms
        end = start + duration_ms(f.required("duration"))
        lowered = _lowered(f, control)
        return ex.Terms(subject, control, target, start, end, _grant(f, control), lowered)  # type: ignore[arg-type]
    except BadInput:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise BadInput(str(e)) from None


def narrowed_terms(current: ex.ExceptionState, f: Fields, now_ms: int) -> ex.Terms | None:
    """The terms an approval narrows a pending exception to, None when it narrows nothing (the
    model then approves the pending terms, starting no earlier than now). Fields left out keep
    the pending value; the model refuses what would widen it."""
    if not any(f.data.get(n) not in (None, "") for n in APPROVE_FIELDS if n != "reason"):
        return None
    base = current.terms.shifted(now_ms)
    try:
        t = base.target
        host, exact = f.text("host"), f.flag("exact")
        if host is not None:
            name = ex.Target.for_host(host).host  # normalized as the target keeps it
            exact = exact if exact is not None else (t.exact and name == t.host)
        else:
            name = t.host
            exact = t.exact if exact is None else exact
        path_text = f.text("path")
        path = normalize_path(path_text) if path_text else t.path
        path = "" if path == "/" else path
        if name:
            target = ex.Target(name, bool(exact), path, t.category, t.rule_id)
        elif path or exact:
            raise BadInput("a path prefix or an exact host needs a host")
        else:
            target = t
        subject = ex.Subject.parse(s) if (s := f.text("subject")) else base.subject
        length = duration_ms(d) if (d := f.text("duration")) else base.duration_ms
        grant = base.grant
        per_request, per_window = f.size("per_request"), f.size("per_window")
        if per_request is not None or per_window is not None:
            if base.control.kind != "upload":
                raise BadInput("only an upload exception grants bytes")
            assert grant is not None
            grant = ex.UploadGrant(
                per_request if per_request is not None else grant.per_request,
                per_window if per_window is not None else grant.per_window,
            )
        lowered = f.text("lowered_to")
        if lowered is not None and base.control.kind not in ("marker", "unscannable"):
            raise BadInput("only a marker or unscannable exception lowers an action")
        if lowered is not None and lowered not in ("alert", "log"):
            raise BadInput("lowered_to must be alert or log")
        return ex.Terms(
            subject,
            base.control,
            target,
            base.start_ms,
            base.start_ms + length,
            grant,
            lowered or base.lowered_to,  # type: ignore[arg-type]
        )
    except BadInput:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise BadInput(str(e)) from None


# --- outcomes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a command came to: the event appended and the exception's state after it, or the
    refusal (and the state it was refused against, when there is one)."""

    action: str  # grant | approve | deny | revoke
    exception_id: str
    state: ex.ExceptionState | None = None
    event: ex.Event | None = None
    refusal: ex.Refusal | None = None

    @property
    def status(self) -> int:
        if self.refusal is None:
            return 200
        return REFUSAL_STATUS.get(self.refusal.code, 400)

    def detail(self) -> str:
        """The console event's detail: ids and codes, never the terms in full."""
        d: dict[str, Any] = {"exception_id": self.exception_id}
        if self.refusal is not None:
            d |= {"code": self.refusal.code, "reason": self.refusal.reason}
        if self.event is not None:
            d["event_id"] = self.event.id
        if self.state is not None:
            d |= {"state": self.state.state, "subject": str(self.state.terms.subject)}
            d |= {"control": str(self.state.terms.control), "target": str(self.state.terms.target)}
            if self.event is not None and self.event.terms is not None:
                d["expiry"] = iso(self.event.terms.expiry_ms)
        return json.dumps(d, ensure_ascii=False, sort_keys=True)


def refused(action: str, exception_id: str, code: str, reason: str) -> Outcome:
    return Outcome(action, exception_id, refusal=ex.Refusal(code, reason))


class Workflow:
    """The commands, on one console context's book. Call from a worker thread: the book
    writes its snapshot (fsync) before ``append`` returns."""

    def __init__(self, ctx: ConsoleContext):
        self.ctx = ctx

    @property
    def book(self) -> Any:
        if self.ctx.exceptions is None:
            raise LookupError("the exception book is not available on this console")
        return self.ctx.exceptions

    def actor(self, name: str, roles: frozenset[str], client_ip: str) -> ex.Actor:
        return ex.Actor(name, roles, client_ip, tuple(self.ctx.groups_of(name)))

    # --- reading ---

    def _history(self, **query: Any) -> list[ex.Event]:
        if self.ctx.exception_history is None:
            return []
        return self.ctx.exception_history(**query)

    def events_of(self, exception_id: str) -> list[ex.Event]:
        """Every event of one exception: the book's, else the store's (an exception that ended
        long enough ago for the book to let it go)."""
        evs = [e for e in self.book.events() if e.exception_id == exception_id]
        if not evs or self.book.state(exception_id) is None:
            try:
                evs += self._history(exception_id=exception_id)
            except Exception as e:  # the store is away: what the book knows still counts
                log.error("exception history unavailable: %s", e)
        return list({e.id: e for e in evs}.values())

    def current(self, exception_id: str) -> ex.ExceptionState | None:
        state = self.book.state(exception_id)
        if state is not None:
            return state
        evs = self.events_of(exception_id)
        return ex.state_of(evs, self.ctx.wall_ms()).get(exception_id) if evs else None

    def states(self, since_ms: int | None) -> tuple[list[ex.ExceptionState], bool]:
        """The book's exceptions, and with ``since`` also the store's created since then;
        ``partial`` when the store could not be read."""
        if since_ms is None:
            return list(self.book.states().values()), False
        events = self.book.events()
        partial = False
        if self.ctx.exception_history is not None:
            try:
                since = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=since_ms)
                events += self._history(since=since)
            except Exception as e:
                log.error("exception history unavailable: %s", e)
                partial = True
        found = ex.state_of(events, self.ctx.wall_ms())
        return [s for s in found.values() if s.requested_ms >= since_ms], partial

    # --- changing ---

    def _append(self, action: str, result: ex.Event | ex.Refusal, exception_id: str) -> Outcome:
        if isinstance(result, ex.Refusal):
            return Outcome(action, exception_id, self.book.state(exception_id), refusal=result)
        state = self.book.append(result)
        if state is None or result.id in state.ignored:
            return Outcome(
                action,
                exception_id,
                state,
                result,
                ex.Refusal("superseded", "another decision on this exception came first"),
            )
        return Outcome(action, exception_id, state, result)

    def grant(self, actor: ex.Actor, terms: ex.Terms, reason: str) -> Outcome:
        exception_id = ex.new_exception_id()
        try:
            category = self.ctx.target_category(terms.target)
        except ValueError as e:
            return refused("grant", exception_id, "ambiguous_category", str(e))
        with _decisions:
            result = ex.grant(
                self.ctx.approval_rules(),
                exception_id=exception_id,
                event_id=ex.new_event_id(),
                actor=actor,
                now_ms=self.ctx.wall_ms(),
                terms=terms,
                reason=reason,
                category=category,
            )
            return self._append("grant", result, exception_id)

    def approve(
        self,
        actor: ex.Actor,
        exception_id: str,
        narrow: Callable[[ex.ExceptionState, int], ex.Terms | None],
        reason: str,
    ) -> Outcome:
        """``narrow(current, now_ms)``: the narrowed terms (None: as pending); it may raise
        BadInput, which the caller answers."""
        with _decisions:
            current = self.current(exception_id)
            now = self.ctx.wall_ms()
            terms = narrow(current, now) if current is not None and current.live else None
            result = ex.approve(
                self.ctx.approval_rules(),
                current,
                event_id=ex.new_event_id(),
                actor=actor,
                now_ms=now,
                terms=terms,
                reason=reason,
            )
            return self._append("approve", result, exception_id)

    def decide(self, action: str, actor: ex.Actor, exception_id: str, f: Fields) -> Outcome:
        """Approve (narrowed by the fields given), deny or revoke, as the API and the forms
        ask; BadInput for a field that cannot be read."""
        reason = f.text("reason") or ""
        if action == "approve":

            def narrow(current: ex.ExceptionState, now_ms: int) -> ex.Terms | None:
                return narrowed_terms(current, f, now_ms)

            return self.approve(actor, exception_id, narrow, reason)
        return self.end(action, actor, exception_id, reason)

    def end(self, action: str, actor: ex.Actor, exception_id: str, reason: str) -> Outcome:
        """Deny (a pending exception) or revoke (an approved one)."""
        command = ex.deny if action == "deny" else ex.revoke
        with _decisions:
            result = command(
                self.ctx.approval_rules(),
                self.current(exception_id),
                event_id=ex.new_event_id(),
                actor=actor,
                now_ms=self.ctx.wall_ms(),
                reason=reason,
            )
            return self._append(action, result, exception_id)


# --- notices ---------------------------------------------------------------------------------


def notice_of(outcome: Outcome) -> ExceptionNotice | None:
    """What a successful change tells people: a pending exception its approvers (a grant or an
    approval that still needs another approver), a decision the requester (or, for a direct
    grant, the user it is for)."""
    s, e = outcome.state, outcome.event
    if outcome.refusal is not None or s is None or e is None:
        return None
    t = s.terms
    if s.state == "pending":
        kind = "pending"
    elif outcome.action == "grant":
        kind = "granted"
    elif outcome.action == "approve" and s.state in ("active", "scheduled"):
        kind = "approved"
    elif outcome.action in ("deny", "revoke"):
        kind = "denied" if outcome.action == "deny" else "revoked"
    else:
        return None
    requester = s.requester
    if s.origin == "grant":
        requester = t.subject.value if t.subject.kind == "user" else ""
    return ExceptionNotice(
        kind=kind,  # type: ignore[arg-type]
        exception_id=s.id,
        requester=requester,
        subject=str(t.subject),
        control=str(t.control),
        target=str(t.target),
        category=s.category,
        rule_id=t.target.rule_id,
        request_id=s.request_id,
        grant=grant_text(t),
        reason=s.reason if kind == "pending" else e.reason,
        actor=e.actor,
        start_ms=t.start_ms,
        expiry_ms=t.expiry_ms,
        approvals_needed=s.approvals_needed,
        approvals_given=len(s.approvers),
        ts_ms=e.ts_ms,
    )


def send_notice(notify: Callable[[ExceptionNotice], None], outcome: Outcome) -> None:
    """Hand the notice to the notifier; a failure there is logged, never the caller's."""
    try:
        notice = notice_of(outcome)
        if notice is not None:
            notify(notice)
    except Exception as e:
        log.error("notice for %s not sent: %s", outcome.exception_id, e)


# --- listing ---------------------------------------------------------------------------------


def matches(
    s: ex.ExceptionState,
    state: str,
    user: str | None,
    subject: str | None,
    control: str | None,
) -> bool:
    if state == "live" and not s.live:
        return False
    if state not in ("all", "live") and s.state != state:
        return False
    if user is not None and s.requester != user and str(s.terms.subject) != f"user:{user}":
        return False
    if subject is not None and str(s.terms.subject) != subject:
        return False
    if control is not None:
        key = str(s.terms.control)
        if control != key and not (control == "marker" and s.terms.control.kind == "marker"):
            return False
    return True


def ordered(states: Iterable[ex.ExceptionState], state: str) -> list[ex.ExceptionState]:
    """Pending: the oldest first (the queue); otherwise the newest first."""
    return sorted(states, key=lambda s: (s.requested_ms, s.id), reverse=state != "pending")


# --- the blocked request ---------------------------------------------------------------------


def blocked_filters(state: ex.ExceptionState) -> RequestFilter | None:
    """The filter of the one row an exception request came from, bounded in time (the form is
    issued with the block page and good for a day)."""
    if not state.request_id:
        return None
    asked = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=state.requested_ms)
    return RequestFilter(
        request_id=state.request_id,
        since=asked - REQUEST_LOOKBACK,
        until=asked + timedelta(minutes=5),
        limit=1,
    )


def blocked_request(store: Any, state: ex.ExceptionState) -> dict[str, Any]:
    """The blocked request's row and its connection's rows (at most ``MAX_BLOCKED_ROWS``,
    ``APPROVER_COLUMNS`` only). Runs store queries: call from a worker thread, after the read
    is recorded."""
    flt = blocked_filters(state)
    out: dict[str, Any] = {"request_id": state.request_id, "row": None, "rows": []}
    out["truncated"] = False
    if flt is None:
        return out
    found = store.query_requests(flt)
    if not found:
        return out
    row = found[0]
    rows = [row]
    cid = row.get("connection_id") or ""
    if cid:
        ts = row["ts"] if row["ts"].tzinfo else row["ts"].replace(tzinfo=UTC)
        span = {"since": ts - CONNECTION_SPAN, "until": ts + CONNECTION_SPAN}
        members = store.query_requests(
            RequestFilter(connection_id=cid, limit=MAX_BLOCKED_ROWS + 1, **span)
        )
        members += store.query_requests(RequestFilter(request_id=f"{cid}/tunnel", limit=1, **span))
        seen = {row["request_id"]}
        for m in members:
            if m["request_id"] not in seen:
                seen.add(m["request_id"])
                rows.append(m)
        if len(rows) > MAX_BLOCKED_ROWS:
            out["truncated"] = True
            rows = rows[:MAX_BLOCKED_ROWS]
    rows.sort(key=lambda r: (r["ts"], r["request_id"]))

    def shown(r: dict[str, Any]) -> dict[str, Any]:
        return {c: r.get(c) for c in APPROVER_COLUMNS}

    out["row"], out["rows"] = shown(row), [shown(r) for r in rows]
    return out


# --- JSON ------------------------------------------------------------------------------------


def terms_json(t: ex.Terms) -> dict[str, Any]:
    return {
        "subject": str(t.subject),
        "control": str(t.control),
        "target": {
            "host": t.target.host,
            "exact": t.target.exact,
            "path": t.target.path,
            "category": t.target.category,
            "rule_id": t.target.rule_id,
            "text": str(t.target),
        },
        "start": iso(t.start_ms),
        "expiry": iso(t.expiry_ms),
        "duration": ex.span(t.duration_ms),
        "grant": None
        if t.grant is None
        else {"per_request": t.grant.per_request, "per_window": t.grant.per_window},
        "lowered_to": t.lowered_to,
    }


def event_json(e: ex.Event, applied: bool) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "at": iso(e.ts_ms),
        "actor": e.actor,
        "actor_roles": list(e.actor_roles),
        "client_ip": e.client_ip,
        "reason": e.reason,
        "terms": None if e.terms is None else terms_json(e.terms),
        "approvals_needed": e.approvals_needed,
        "applied": applied,  # False: not a valid step when it came (e.g. a race between nodes)
    }


def state_json(s: ex.ExceptionState, events: Iterable[ex.Event] | None = None) -> dict[str, Any]:
    """An exception as the API shows it; with ``events``, its whole history in order."""
    out: dict[str, Any] = {
        "id": s.id,
        "state": s.state,
        "origin": s.origin,
        "requester": s.requester,
        "requested_at": iso(s.requested_ms),
        "reason": s.reason,
        "category": s.category,
        "request_id": s.request_id,
        "terms": terms_json(s.terms),
        "requested_terms": terms_json(s.requested),
        "approvals_needed": s.approvals_needed,
        "approvers": list(s.approvers),
        "decide_by": iso(s.decide_by_ms),
        "approved_at": iso(s.approved_ms),
        "ended_by": s.ended_by,
        "ended_at": iso(s.ended_ms),
        "end_reason": s.end_reason,
    }
    if events is not None:
        applied = {e.id for e in s.events}
        # As the fold orders them: the creation first, whatever the nodes' clocks said.
        history = sorted(
            events, key=lambda e: (e.kind not in ("requested", "granted"), e.ts_ms, e.id)
        )
        out["events"] = [event_json(e, e.id in applied) for e in history]
    return out
