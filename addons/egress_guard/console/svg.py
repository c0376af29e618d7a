"""Charts drawn by the gateway: SVG made on the server and put in the page, so nothing is
fetched and no script runs (the console's CSP allows neither).

Every text that goes into a chart (a user name, a host, a label) is escaped here; a template
puts a chart in with ``{% raw %}``, and only this module makes the ``Svg`` it may put in.
Each mark carries a ``<title>``, which the browser shows on hover: the exact value.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

PALETTE = ("#3b6fb6", "#d9822b", "#b42318", "#2e8540", "#7b4fa0", "#5d6b82", "#c2a000", "#0f8a8a")
ALLOWED, ALERT, BLOCKED = "#8fa9cf", "#e0a030", "#c0392b"
FONT = 'font-family="system-ui,sans-serif" font-size="11"'


class Svg(str):
    """Markup made by this module (every value in it escaped): safe to put in a page raw."""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _nice_max(value: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten, at or above ``value``."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def _steps(top: float) -> int:
    """How many gridlines up to ``top`` (a ``_nice_max``) so that each tick is a round
    number: 10 → 0, 2, … 10; 20 → 0, 5, … 20; 5 → 0, 1, … 5; 2 → 0, 1, 2."""
    if top <= 5:
        return max(1, int(top))
    lead = round(top / 10 ** math.floor(math.log10(top)))
    return 4 if lead == 2 else 5


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _empty(title: str, width: int, height: int = 60) -> Svg:
    return Svg(
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>'
        f'<text x="8" y="34" {FONT} fill="#5d6b82">no data in this range</text></svg>'
    )


def bars(
    items: Sequence[tuple[str, float]],
    *,
    title: str,
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    color: str = BLOCKED,
    width: int = 560,
    label_width: int = 220,
) -> Svg:
    """Horizontal bars, largest first as given: a label, a bar, the value."""
    if not items:
        return _empty(title, width)
    row, top = 22, 8
    height = top + row * len(items) + 6
    biggest = max(v for _, v in items) or 1
    span = width - label_width - 90
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>'
    ]
    for i, (label, value) in enumerate(items):
        y = top + i * row
        w = max(1.0, span * value / biggest)
        shown = label if label != "" else "(none)"
        out.append(
            f"<g><title>{_e(shown)}: {_e(fmt(value))}</title>"
            f'<text x="{label_width - 6}" y="{y + 14}" text-anchor="end" {FONT}>'
            f"{_e(_clip(shown, 34))}</text>"
            f'<rect x="{label_width}" y="{y + 3}" width="{w:.1f}" height="15" fill="{color}"/>'
            f'<text x="{label_width + w + 4:.1f}" y="{y + 14}" {FONT}>{_e(fmt(value))}</text></g>'
        )
    out.append("</svg>")
    return Svg("".join(out))


def columns(
    labels: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float]]],
    *,
    title: str,
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    width: int = 760,
    height: int = 220,
) -> Svg:
    """Stacked columns over time: ``labels`` one per bucket, ``series`` (name, colour, one
    value per bucket), with a y axis, a few x labels and a legend."""
    n = len(labels)
    if not n or not any(any(v for v in values) for _, _, values in series):
        return _empty(title, width)
    left, right, top, bottom = 56, 8, 10, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(values[i] for _, _, values in series) for i in range(n)]
    ymax = _nice_max(max(totals))
    step = plot_w / n
    bar_w = max(1.0, step * 0.8)
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>'
    ]
    steps = _steps(ymax)
    for k in range(steps + 1):  # gridlines and the y axis
        v = ymax * k / steps
        y = top + plot_h - plot_h * k / steps
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#e4e7ec"/><text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" '
            f"{FONT}>{_e(fmt(v))}</text>"
        )
    for i, label in enumerate(labels):
        x = left + i * step + (step - bar_w) / 2
        base = top + plot_h
        parts = [f"{_e(label)}"]
        for name, _, values in series:
            parts.append(f"{_e(name)} {_e(fmt(values[i]))}")
        tip = " · ".join(parts)
        out.append(f"<g><title>{tip}</title>")
        for _, colour, values in series:
            h = plot_h * values[i] / ymax
            if h <= 0:
                continue
            base -= h
            out.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colour}"/>'
            )
        out.append("</g>")
    ticks = sorted({0, n // 2, n - 1})
    for i in ticks:
        x = left + i * step + step / 2
        anchor = "start" if i == 0 else "end" if i == n - 1 and n > 1 else "middle"
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="{anchor}" {FONT}>'
            f"{_e(labels[i])}</text>"
        )
    x = left
    for name, colour, _ in series:  # the legend
        out.append(
            f'<rect x="{x}" y="{height - 14}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14}" y="{height - 5}" {FONT}>{_e(name)}</text>'
        )
        x += 24 + 7 * len(name)
    out.append("</svg>")
    return Svg("".join(out))


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    value: Callable[[str, str], float],
    *,
    title: str,
    fmt: Callable[[float], str],
    width: int = 760,
) -> Svg:
    """A grid (rows × columns) whose cells are darker the larger their value: e.g. upload
    bytes per user (rows) per day (columns)."""
    if not rows or not cols:
        return _empty(title, width)
    left, top, cell_h = 170, 8, 20
    cell_w = max(4.0, (width - left - 8) / len(cols))
    height = top + cell_h * len(rows) + 30
    biggest = max((value(r, c) for r in rows for c in cols), default=0) or 1
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>'
    ]
    for i, r in enumerate(rows):
        y = top + i * cell_h
        out.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" {FONT}>'
            f"<title>{_e(r)}</title>{_e(_clip(r, 26))}</text>"
        )
        for j, c in enumerate(cols):
            v = value(r, c)
            # Square root: one huge day must not wash every other cell out.
            shade = 0 if v <= 0 else 0.12 + 0.88 * math.sqrt(v / biggest)
            out.append(
                f'<rect x="{left + j * cell_w:.1f}" y="{y}" width="{cell_w - 1:.1f}" '
                f'height="{cell_h - 2}" fill="{PALETTE[0]}" fill-opacity="{shade:.2f}" '
                f'stroke="#e4e7ec"><title>{_e(r)} · {_e(c)}: {_e(fmt(v))}</title></rect>'
            )
    for j in sorted({0, len(cols) // 2, len(cols) - 1}):
        x = left + j * cell_w + cell_w / 2
        out.append(
            f'<text x="{x:.1f}" y="{top + cell_h * len(rows) + 14}" text-anchor="middle" '
            f"{FONT}>{_e(cols[j])}</text>"
        )
    out.append("</svg>")
    return Svg("".join(out))


def sparkbar(value: float, biggest: float, *, width: int = 120, colour: str = PALETTE[0]) -> Svg:
    """A small bar for a table cell (its share of the biggest value in the column)."""
    w = 0 if biggest <= 0 else max(1.0, width * value / biggest) if value > 0 else 0
    return Svg(
        f'<svg class="spark" viewBox="0 0 {width} 10" width="{width}" height="10" '
        f'xmlns="http://www.w3.org/2000/svg" aria-hidden="true">'
        f'<rect x="0" y="1" width="{w:.1f}" height="8" fill="{colour}"/></svg>'
    )
