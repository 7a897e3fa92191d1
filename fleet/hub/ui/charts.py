"""Inline SVG charts for the dashboard: no script, no CDN; each returns markup safe to put in a page."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

PALETTE = ("#3b6ea8", "#d9822b", "#3a9b6b", "#a83b6e")


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]], *, title: str,
              y_max: float | None = None, fmt: str = "{:.3g}", width: int = 600, height: int = 230) -> Markup:
    """Grouped vertical bars: one group per label, one bar per series (None draws no bar, and says "n/a").

    ``labels``: (n,) group names; ``series``: name -> (n,) values. ``y_max`` fixes the axis (1.0 for a rate);
    by default it is the largest value. An empty chart says so instead of drawing axes over nothing.
    """
    for name, values in series.items():
        if len(values) != len(labels):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(labels)} labels")
    finite = [float(v) for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not labels or not finite:
        return _empty(title, width)
    counts = all(isinstance(v, int) for vs in series.values() for v in vs if v is not None)
    ticks = nice_ticks(y_max if y_max is not None else max(finite), integer=counts)
    top = ticks[-1]
    left, right, bottom, head = 44, 8, 46 if len(labels) > 8 else 30, 34
    plot_w, plot_h = width - left - right, height - bottom - head - (14 if len(series) > 1 else 0)
    group = plot_w / len(labels)
    bar = min(max(2.0, group * 0.8 / max(len(series), 1)), 56.0)
    parts = [_frame(title, width, height, left, head, plot_w, plot_h, ticks, fmt)]
    for g, label in enumerate(labels):
        x0 = left + g * group + (group - bar * len(series)) / 2
        for k, (name, values) in enumerate(series.items()):
            v = values[g]
            x = x0 + k * bar
            if v is None or not math.isfinite(v):
                parts.append(f'<text x="{x + bar / 2:.1f}" y="{head + plot_h - 3}" class="na">n/a</text>')
                continue
            h = plot_h * min(max(float(v), 0.0), top) / top
            y = head + plot_h - h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(name)} {escape(label)}: '
                         f'{escape(fmt.format(v))}</title></rect>')
            if bar >= 14 and v != 0:
                parts.append(f'<text x="{x + bar / 2:.1f}" y="{y - 3:.1f}" class="val">{escape(fmt.format(v))}</text>')
        parts.append(_xlabel(left + g * group + group / 2, head + plot_h, label, slanted=len(labels) > 8))
    if len(series) > 1:
        x = left
        for k, name in enumerate(series):
            parts.append(f'<rect x="{x}" y="{height - 12}" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
                         f'<text x="{x + 14}" y="{height - 3}" class="legend">{escape(name)}</text>')
            x += 24 + 7 * len(name)
    parts.append("</svg>")
    return Markup("".join(parts))


def nice_ticks(largest: float, *, integer: bool = False) -> list[float]:
    """Axis ticks from 0 up to a round number at or above ``largest``: steps of 1, 2 or 5 times a power of ten,
    at most five of them (whole steps when ``integer``)."""
    largest = max(float(largest), 1.0 if integer else 1e-9)
    raw = largest / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    n = math.ceil(largest / step - 1e-9)
    return [round(i * step, 12) for i in range(n + 1)]


def _frame(title: str, width: int, height: int, left: int, head: int, plot_w: float, plot_h: float,
           ticks: list[float], fmt: str) -> str:
    top = ticks[-1]
    lines = []
    for t in ticks:
        y = head + plot_h * (1 - t / top)
        lines.append(f'<line x1="{left}" x2="{left + plot_w:.1f}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" class="tick">{escape(fmt.format(t))}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{escape(title)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
            f'<text x="{left}" y="18" class="title">{escape(title)}</text>{"".join(lines)}')


def _xlabel(x: float, y: float, label: str, *, slanted: bool) -> str:
    text = escape(label if len(label) <= 14 else label[:13] + "…")
    if slanted:
        return f'<text x="{x:.1f}" y="{y + 12:.1f}" class="xl" transform="rotate(-35 {x:.1f} {y + 12:.1f})" ' \
               f'text-anchor="end">{text}</text>'
    return f'<text x="{x:.1f}" y="{y + 14:.1f}" class="xl">{text}</text>'


def _empty(title: str, width: int) -> Markup:
    return Markup(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{escape(title)}" '
                  f'viewBox="0 0 {width} 48" width="{width}" height="48"><text x="8" y="18" class="title">'
                  f'{escape(title)}</text><text x="8" y="38" class="na">no data yet</text></svg>')
