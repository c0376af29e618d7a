"""The reports page: over a time range, requests and blocks over time, the most blocked users,
hosts and categories, upload bytes per user per day, marker hits per level over time,
exception usage and the busiest destinations, each as a chart the gateway draws (``svg``)
above the table it is drawn from."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from egress_guard.requestlog import evidence

from . import display, svg
from .filters import json_default
from .investigate import AuditorPage


def bucket_label(value: datetime, bucket: str) -> str:
    local = evidence.as_utc(value).astimezone()
    return local.strftime("%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d")


def filled(report: dict[str, Any]) -> list[datetime]:
    """Every bucket of the range, including the empty ones the store has no row for."""
    step = timedelta(hours=1) if report["bucket"] == "hour" else timedelta(days=1)
    seen = sorted(evidence.as_utc(r["time"]) for r in report["requests_over_time"])
    seen += sorted(evidence.as_utc(r["time"]) for r in report["marker_hits_over_time"])
    if not seen:
        return []
    first, last = min(seen), max(seen)
    out, t = [], first
    while t <= last and len(out) < 2000:
        out.append(t)
        t += step
    return out


def charts(report: dict[str, Any]) -> dict[str, svg.Svg]:
    """Each report's chart."""
    bucket = report["bucket"]
    times = filled(report)
    labels = [bucket_label(t, bucket) for t in times]
    by_time = {evidence.as_utc(r["time"]): r for r in report["requests_over_time"]}

    def series(key: str) -> list[float]:
        return [by_time.get(t, {}).get(key, 0) for t in times]

    counts = zip(series("requests"), series("blocked"), series("alerts"), strict=True)
    allowed = [r - b - a for r, b, a in counts]
    out = {
        "requests_over_time": svg.columns(
            labels,
            [
                ("allowed", svg.ALLOWED, allowed),
                ("alert", svg.ALERT, series("alerts")),
                ("blocked", svg.BLOCKED, series("blocked")),
            ],
            title="requests and blocks over time",
        )
    }
    for name, colour in (
        ("top_blocked_users", svg.BLOCKED),
        ("top_blocked_hosts", svg.BLOCKED),
        ("top_blocked_categories", svg.BLOCKED),
    ):
        top = [(r["key"], r["value"]) for r in report[name]]
        out[name] = svg.bars(top, title=name.replace("_", " "), color=colour)
    levels = sorted({r["level"] for r in report["marker_hits_over_time"]})
    hits = {
        (evidence.as_utc(r["time"]), r["level"]): r["hits"] for r in report["marker_hits_over_time"]
    }
    out["marker_hits_over_time"] = svg.columns(
        labels,
        [
            (level, svg.PALETTE[i % len(svg.PALETTE)], [hits.get((t, level), 0) for t in times])
            for i, level in enumerate(levels)
        ],
        title="marker hits per level over time",
    )
    uploads = report["upload_per_user_day"]
    total: dict[str, int] = {}
    for r in uploads:
        total[r["user"]] = total.get(r["user"], 0) + r["upload_bytes"]
    users = sorted(total, key=lambda u: (-total[u], u))
    days = sorted({r["day"] for r in uploads})
    per = {(r["user"], r["day"].isoformat()): r["upload_bytes"] for r in uploads}
    out["upload_per_user_day"] = svg.heatmap(
        users,
        [d.isoformat() for d in days],
        lambda u, d: per.get((u, d), 0),
        title="upload bytes per user per day",
        fmt=display.size,
    )
    out["exception_usage"] = svg.bars(
        [(r["exception_id"], r["requests"]) for r in report["exception_usage"][:10]],
        title="requests under each exception",
        color=svg.PALETTE[4],
    )
    out["busiest_destinations"] = svg.bars(
        [(r["host"], r["requests"]) for r in report["busiest_destinations"]],
        title="busiest destinations",
        color=svg.PALETTE[0],
    )
    return out


def report_detail(since: datetime, until: datetime) -> str:
    return json.dumps({"since": since, "until": until}, default=json_default, sort_keys=True)


class Reports(AuditorPage):
    async def get(self) -> None:
        form = {n: self.arg(n) for n in ("since", "until")}
        try:
            since, until = self.time_range()
        except ValueError as e:
            self.page("reports.html", "报表 Reports", 400, form=form, report=None, error=str(e))
            return
        report = await self.audited_query(
            "query_report",
            report_detail(since, until),
            lambda: self.ctx.audit.report(since, until),
        )
        self.page(
            "reports.html",
            "报表 Reports",
            form=form,
            report=report,
            charts=charts(report),
            error="",
        )
