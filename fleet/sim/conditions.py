"""Edge conditions made with numpy: night, fog, rain streaks, motion blur, occlusion.

Every function takes uint8 images ``(n, h, w)`` or ``(n, h, w, c)`` and a numpy Generator, and
returns new uint8 images of the same shape. Severities are chosen so that a model trained mostly
on clear frames has real blind spots, while a human can still tell the class.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Images = npt.NDArray[np.uint8]
Condition = Callable[..., Images]  # (images, rng, *, unit) -> images

CLEAR = "clear"


def night(images: Images, rng: np.random.Generator, *, unit: int | None = None) -> Images:
    """Low light: strong darkening, lifted black level, sensor noise."""
    x = images.astype(np.float32) / 255.0
    gain = rng.uniform(0.18, 0.3, size=(len(x),) + (1,) * (x.ndim - 1))
    noise = rng.normal(0.0, 0.06, size=x.shape)
    y = x * gain + 0.08 + noise
    return _to_uint8(y * 255.0)


def fog(images: Images, rng: np.random.Generator, *, unit: int | None = None) -> Images:
    """Haze: contrast squeezed toward a bright grey veil."""
    x = images.astype(np.float32)
    alpha = rng.uniform(0.3, 0.42, size=(len(x),) + (1,) * (x.ndim - 1))
    veil = rng.uniform(150, 200, size=alpha.shape)
    return _to_uint8(x * alpha + veil * (1 - alpha))


def rain(images: Images, rng: np.random.Generator, *, unit: int | None = None) -> Images:
    """Rain streaks: bright diagonal lines over a slightly darkened frame. ``unit``: an object's side in pixels
    (default the frame's: one object fills it); streaks are a third of it long, and sparser as objects get
    smaller than the frame (density x (unit / h) ** 1.5), so a scene's objects stay partly visible."""
    out = images.astype(np.float32) * 0.85
    n, h, w = images.shape[:3]
    u = unit or h
    n_streaks = max(2, int((h * w) / 12 * min(1.0, u / h) ** 1.5))
    length = max(2, u // 3)
    for i in range(n):
        ys = rng.integers(0, h, n_streaks)
        xs = rng.integers(0, w, n_streaks)
        for step in range(length):
            yy = np.clip(ys + step, 0, h - 1)
            xx = np.clip(xs + step // 2, 0, w - 1)
            out[i, yy, xx] = np.maximum(out[i, yy, xx], 235.0)
    return _to_uint8(out)


def motion_blur(images: Images, rng: np.random.Generator, *, unit: int | None = None) -> Images:
    """Horizontal motion blur with a kernel about a third of an object's side (``unit``; default the width)."""
    x = images.astype(np.float32)
    w = images.shape[2]
    k = max(3, (unit or w) // 3) | 1
    pad = k // 2
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad)] + [(0, 0)] * (x.ndim - 3), mode="edge")
    csum = np.cumsum(padded, axis=2, dtype=np.float64)
    csum = np.concatenate([np.zeros_like(csum[:, :, :1]), csum], axis=2)
    blurred = (csum[:, :, k:] - csum[:, :, :-k]) / k
    shift = rng.integers(-1, 2)
    return _to_uint8(np.roll(blurred, int(shift), axis=2))


def occlusion(images: Images, rng: np.random.Generator, *, unit: int | None = None) -> Images:
    """A dark block at a random place, its side 0.45 of an object's (``unit``; default the frame's: about a fifth
    of the frame's area)."""
    out = images.copy()
    n, h, w = images.shape[:3]
    bh, bw = max(1, int(round((unit or h) * 0.45))), max(1, int(round((unit or w) * 0.45)))
    for i in range(n):
        y0 = int(rng.integers(0, h - bh + 1))
        x0 = int(rng.integers(0, w - bw + 1))
        out[i, y0 : y0 + bh, x0 : x0 + bw] = rng.integers(0, 40)
    return out


CONDITIONS: dict[str, Condition] = {
    "night": night,
    "fog": fog,
    "rain": rain,
    "motion_blur": motion_blur,
    "occlusion": occlusion,
}


def apply_conditions(images: Images, conditions: list[str] | npt.NDArray[np.str_], *, seed: int,
                     unit: int | None = None) -> Images:
    """Apply ``conditions[i]`` (a name in CONDITIONS or "clear") to ``images[i]``; shape kept. ``unit``: an
    object's side in pixels when a frame holds several (a scene); default: one object fills the frame."""
    names = np.asarray(conditions)
    if names.shape != (len(images),):
        raise ValueError(f"need one condition per image: {len(images)} images, {names.shape} conditions")
    unknown = sorted(set(names.tolist()) - set(CONDITIONS) - {CLEAR})
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; expected one of {[CLEAR, *CONDITIONS]}")
    rng = np.random.default_rng(seed)
    out = images.copy()
    for name, fn in CONDITIONS.items():
        idx = np.flatnonzero(names == name)
        if len(idx):
            out[idx] = fn(images[idx], rng, unit=unit)
    return out


def sample_conditions(n: int, mix: dict[str, float], *, rng: np.random.Generator) -> npt.NDArray[np.str_]:
    """Draw ``n`` condition names from a mix such as ``{"clear": 0.6, "night": 0.1, ...}``."""
    names = list(mix)
    p = np.asarray([mix[k] for k in names], dtype=np.float64)
    if np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"condition mix must have non-negative weights with a positive sum; received {mix}")
    unknown = sorted(set(names) - set(CONDITIONS) - {CLEAR})
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; expected one of {[CLEAR, *CONDITIONS]}")
    return np.asarray(rng.choice(names, size=n, p=p / p.sum()))


def _to_uint8(x: npt.NDArray[np.floating]) -> Images:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
