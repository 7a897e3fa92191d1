"""Inline SVG charts for the dashboard: no script, no CDN; each returns markup safe to put in a page."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

PALETTE = ("#3b6ea8", "#d9822b", "#3a9b6b", "#a83b6e")


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]], *, title: str,
              y_max: float | None = None, fmt: str = "{:.3g}", width: int = 640, height: int = 220) -> Markup:
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
    top = y_max if y_max is not None else max(max(finite), 1e-12)
    left, right, bottom, head = 44, 8, 46 if len(labels) > 8 else 30, 26
    plot_w, plot_h = width - left - right, height - bottom - head
    group = plot_w / len(labels)
    bar = max(2.0, group * 0.8 / max(len(series), 1))
    parts = [_frame(title, width, height, left, head, plot_w, plot_h, top, fmt)]
    for g, label in enumerate(labels):
        x0 = left + g * group + group * 0.1
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
            if bar >= 18:
                parts.append(f'<text x="{x + bar / 2:.1f}" y="{y - 3:.1f}" class="val">{escape(fmt.format(v))}</text>')
        parts.append(_xlabel(left + g * group + group / 2, head + plot_h, label, slanted=len(labels) > 8))
    if len(series) > 1:
        for k, name in enumerate(series):
            x = left + k * 130
            parts.append(f'<rect x="{x}" y="{height - 12}" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
                         f'<text x="{x + 14}" y="{height - 3}" class="legend">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _frame(title: str, width: int, height: int, left: int, head: int, plot_w: float, plot_h: float, top: float,
           fmt: str) -> str:
    ticks = "".join(
        f'<line x1="{left}" x2="{left + plot_w:.1f}" y1="{head + plot_h * (1 - f):.1f}" '
        f'y2="{head + plot_h * (1 - f):.1f}" class="grid"/>'
        f'<text x="{left - 4}" y="{head + plot_h * (1 - f) + 4:.1f}" class="tick">{escape(fmt.format(top * f))}</text>'
        for f in (0.0, 0.5, 1.0))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{escape(title)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
            f'<text x="{left}" y="16" class="title">{escape(title)}</text>{ticks}')


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
