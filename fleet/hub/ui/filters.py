"""Jinja filters: how the dashboard writes times, sizes, rates and predictions."""

from __future__ import annotations

import time
from collections.abc import Sequence

from fleet.protocol import Classification, Detection, Prediction


def utc(t: float | None) -> str:
    return "–" if t is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def ago(t: float | None, now: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago`` (and the time itself beyond a week)."""
    if t is None:
        return "never"
    dt = max(now - t, 0.0)
    for unit, seconds in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if dt >= seconds:
            return utc(t) if unit == "d" and dt >= 7 * 86_400 else f"{int(dt // seconds)} {unit} ago"
    return f"{int(dt)} s ago"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def size(n: float | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def prediction(p: Prediction | None, class_names: Sequence[str]) -> str:
    """A prediction or label in words: ``cat (0.81)`` for a class, ``3 boxes: car 0.92, ...`` for detections."""
    if p is None:
        return "–"
    if isinstance(p, Classification):
        text = _name(p.label, class_names)
        return f"{text} ({p.probs[p.label]:.2f})" if p.probs else text
    if isinstance(p, Detection):
        shown = ", ".join(f"{_name(b.label, class_names)}{f' {b.score:.2f}' if b.score is not None else ''}"
                          for b in p.boxes[:5])
        more = f", … {len(p.boxes) - 5} more" if len(p.boxes) > 5 else ""
        return f"{len(p.boxes)} box{'es' if len(p.boxes) != 1 else ''}" + (f": {shown}{more}" if p.boxes else "")
    return repr(p)


def _name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label] if 0 <= label < len(class_names) else f"class {label}"
