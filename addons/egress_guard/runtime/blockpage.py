"""Block page: the one place that renders the gateway's refusals (zh-CN and en).

Self-contained HTML (inline CSS, no scripts, nothing fetched) from a tornado template with
auto-escaping, so no value can carry markup. It names the category, rule, reason, user, time
and request id so the employee can ask for an exception and the approver can find the row. It
never repeats request content.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tornado.template import Loader

from .portal import DURATIONS, FORM_ACTION, PORTAL_HOST  # the portal answers the form

_TEMPLATES = Loader(str(Path(__file__).with_name("templates")), autoescape="xhtml_escape")


@dataclass(frozen=True)
class Refusal:
    status: int
    title_en: str
    title_zh: str
    reason_en: str
    reason_zh: str
    category: str
    rule_id: str
    user: str
    client_ip: str
    host: str
    request_id: str
    when: datetime  # aware; shown in the gateway's local time
    details: tuple[tuple[str, str], ...] = ()  # extra (label, value) rows, e.g. cap and size
    form: tuple[tuple[str, str], ...] = ()  # the signed fields of an exception request form


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","PingFang SC","Microsoft YaHei",sans-serif;
background:#f4f5f7;color:#1d2330;margin:0;padding:2rem 1rem}
main{max-width:42rem;margin:0 auto;background:#fff;border-radius:8px;padding:1.5rem 2rem;
box-shadow:0 1px 3px rgba(0,0,0,.12);border-top:6px solid #b42318}
h1{font-size:1.35rem;margin:.2rem 0}h2{font-size:1.05rem;margin:.2rem 0 1rem;color:#475467;
font-weight:500}p{line-height:1.55}dl{display:grid;grid-template-columns:max-content 1fr;
gap:.35rem 1rem;background:#f9fafb;padding:1rem;border-radius:6px;font-size:.92rem}
dt{color:#475467}dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;
word-break:break-all}footer{font-size:.8rem;color:#667085;margin-top:1rem}
"""


def render(refusal: Refusal) -> bytes:
    r = refusal
    when = r.when.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z (UTC%z)")
    rows = [
        ("类别 Category", r.category or "-"),
        ("规则 Rule", r.rule_id or "-"),
        ("目标 Destination", r.host or "-"),
        ("用户 User", r.user or f"({r.client_ip})"),
        ("时间 Time", when),
        ("请求编号 Request ID", r.request_id),
        *r.details,
    ]
    return _TEMPLATES.load("blockpage.html").generate(
        r=r, rows=rows, css=_CSS, form=dict(r.form), form_action=FORM_ACTION, durations=DURATIONS
    )


def headers(refusal: Refusal) -> dict[str, str]:
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'unsafe-inline'; form-action https://{PORTAL_HOST}"
        ),
        "X-Egress-Guard-Request-Id": refusal.request_id,
        "X-Egress-Guard-Rule": refusal.rule_id,
    }
