"""Flows: the state the adapters keep on a flow, and the responses they answer with.

Everything here is per flow (it lives in ``flow.metadata`` and goes with the flow); the block
pages are rendered by ``blockpage`` from what the decision says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from mitmproxy import connection, http

from egress_guard.core.channels import HeadScan
from egress_guard.core.decision import Decision
from egress_guard.core.hosts import normalize_host, split_host_port
from egress_guard.core.identity import Who
from egress_guard.core.scan import Verdict
from egress_guard.core.upload import CapHit, Limits, UploadGate, describe

from . import blockpage
from .portal import Portal, RequestForm, requester_of

log = logging.getLogger("egress_guard")


STATE = "egress_guard"
PASSTHROUGH = "egress_guard.passthrough"  # on a TCP flow the gateway chose to pass through


@dataclass
class FlowState:
    who: Who
    decision: Decision
    logged: bool = False
    limits: Limits | None = None  # upload caps in force for this flow
    base_limits: Limits | None = None  # the policy's caps, before any exception raised them
    upload_exception: str = ""  # an approved upload exception in force for this flow
    window_before: int = 0  # the user's window when this request began
    gate: UploadGate | None = None  # set when the body (or tunnel) is counted as it streams
    declared: int | None = None  # Content-Length as announced
    window_bytes: int = 0  # bytes this flow put into the user's upload window
    ws_sent: int = 0
    ws_forwarded: int = 0  # of ws_sent, what the upstream got (a cut message is dropped)
    ws_received: int = 0
    ws_cut: bool = False
    head: HeadScan | None = None  # what the request head (target, headers) was found to carry


# --- flow helpers ----------------------------------------------------------------------------


def proxyauth_user(flow: http.HTTPFlow) -> str | None:
    auth = flow.metadata.get("proxyauth")
    return auth[0] if auth else None


def client_ip(client: connection.Client) -> str:
    return client.peername[0] if client.peername else ""


def window_key(who: Who, client: connection.Client) -> str:
    """Whose upload window: the user, or the client address when nobody is known."""
    return who.user or f"ip:{client_ip(client)}"


def request_hosts(flow: http.HTTPFlow) -> tuple[str, ...]:
    """Every name this request could reach: the URL/connection host, the SNI the client sent,
    the request target's authority (absolute form, HTTP/2's :authority) and the Host header (a
    client can make them disagree to sneak past a check on one)."""
    req = flow.request
    hosts = [req.host]
    if req.authority:
        hosts.append(split_host_port(req.authority)[0])
    if flow.client_conn.sni:
        hosts.append(flow.client_conn.sni)
    if flow.server_conn.address:
        hosts.append(flow.server_conn.address[0])
    host_header = req.host_header
    if host_header:
        hosts.append(split_host_port(host_header)[0])
    return tuple(hosts)


def tunnel_hosts(client: connection.Client, server: connection.Server) -> tuple[str, ...]:
    """The names a tunnel goes to: its CONNECT target and the SNI the client sent."""
    return tuple(h for h in (server.address[0] if server.address else "", client.sni) if h)


def header_bytes(message: http.Message, first_line: int) -> int:
    return first_line + sum(len(k) + len(v) + 4 for k, v in message.headers.fields) + 2


def request_form(
    portal: Portal | None, flow: http.HTTPFlow, state: FlowState, control: str, now: float
) -> tuple[tuple[str, str], ...]:
    """The signed fields of the block page's exception request form: what would be lifted
    (``control``) for this destination, for the identity the proxy knows; none when there is
    no portal."""
    if portal is None:
        return ()
    d = state.decision
    form = RequestForm(
        request_id=flow.id,
        requester=requester_of(state.who.user, client_ip(flow.client_conn)),
        control=control,
        host=d.host or normalize_host(flow.request.host),
        rule_id=d.rule_id,
        category=d.category,
        issued=int(now),
    )
    return tuple(portal.form(form).items())


def refusal_response(
    flow: http.HTTPFlow,
    state: FlowState,
    now: float,
    status: int,
    titles: tuple[str, str],
    reasons: tuple[str, str],
    details: tuple[tuple[str, str], ...] = (),
    form: tuple[tuple[str, str], ...] = (),
) -> http.Response:
    """The block page for this flow: titles and reasons as (en, zh); ``form`` the signed
    fields of an exception request, when one can lift the refusal."""
    d = state.decision
    refusal = blockpage.Refusal(
        status=status,
        title_en=titles[0],
        title_zh=titles[1],
        reason_en=reasons[0],
        reason_zh=reasons[1],
        category=d.category,
        rule_id=d.rule_id,
        user=state.who.user,
        client_ip=client_ip(flow.client_conn),
        host=d.host or normalize_host(flow.request.host),
        request_id=flow.id,
        when=datetime.fromtimestamp(now, UTC),
        details=details,
        form=form,
    )
    return http.Response.make(status, blockpage.render(refusal), blockpage.headers(refusal))


def blocked_response(
    flow: http.HTTPFlow, state: FlowState, now: float, portal: Portal | None = None
) -> http.Response:
    rule = state.decision.rule
    assert rule is not None
    liftable = state.decision.reason_kind == "blocklist"  # not the gateway's own refusals
    return refusal_response(
        flow,
        state,
        now,
        403,
        ("Access blocked by company policy", "根据公司规定，已阻止访问"),
        (rule.reason.en, rule.reason.zh),
        form=request_form(portal, flow, state, "block", now) if liftable else (),
    )


def cap_response(
    flow: http.HTTPFlow, state: FlowState, hit: CapHit, now: float, portal: Portal | None = None
) -> http.Response:
    window = state.limits.window_seconds if state.limits else 86400
    en, zh = describe(hit, window)
    return refusal_response(
        flow,
        state,
        now,
        413,
        ("Upload over the allowed size", "上传超过允许的大小"),
        (
            en + " Company rules limit how much data may be uploaded to the Internet.",
            zh + " 公司规定限制向外部网络上传的数据量。",
        ),
        (
            ("限额 Limit", f"{hit.cap:,} bytes ({hit.kind})"),
            ("本次 This upload", f"{hit.size:,} bytes"),
            ("窗口已用 Used in window", f"{hit.used:,} bytes"),
        ),
        form=request_form(portal, flow, state, "upload", now),
    )


def audit_unavailable_response(flow: http.HTTPFlow, state: FlowState, now: float) -> http.Response:
    return refusal_response(
        flow,
        state,
        now,
        503,
        ("Audit log unavailable", "审计日志不可用"),
        (
            "The gateway cannot record requests right now, and company rules do not allow "
            "unrecorded access to the Internet. Please try again later or tell IT.",
            "网关当前无法记录访问日志，按公司规定不得在无记录的情况下访问外部网络。请稍后再试或联系信息部门。",
        ),
    )


def marker_response(
    flow: http.HTTPFlow,
    state: FlowState,
    verdict: Verdict,
    now: float,
    portal: Portal | None = None,
) -> http.Response:
    """The refusal for a marked (or unscannable) upload: level and marker id, never the text."""
    if verdict.hits and any(h.action == "block" for h in verdict.hits):
        reasons = (
            f"The content carries a confidentiality marking (level {verdict.level}, "
            f"rule {verdict.rule_id}). Documents with this marking may not leave the company.",
            f"内容带有密级或商业秘密标志（级别 {verdict.level}，规则 {verdict.rule_id}），"
            "按公司规定不得外发。",
        )
    else:
        reasons = (
            f"The content could not be fully checked for confidentiality markings "
            f"({verdict.unscannable}), so company policy blocks it.",
            f"无法完整检查内容是否带有密级标志（{verdict.unscannable}），按公司规定予以阻止。",
        )
    return refusal_response(
        flow,
        state,
        now,
        403,
        ("Upload blocked: confidential content", "已阻止外发：内容涉密"),
        reasons,
        (("级别 Level", verdict.level or "-"),),
        form=request_form(
            portal,
            flow,
            state,
            f"marker:{verdict.level}" if verdict.level else "unscannable",
            now,
        ),
    )
