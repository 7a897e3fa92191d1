"""Synthetic detection scenes: real objects (scikit-learn's digits, or any small glyphs) scaled and placed on a
cluttered canvas, with their true boxes.

Each scene is a uint8 ``(size, size)`` canvas holding one to ``max_objects`` objects, each a glyph scaled to a
random side in ``scale`` (pixels) and pasted where it overlaps no other object by more than ``max_iou``; the
background has a smooth brightness gradient, sensor noise and clutter (thin strokes and faint blobs that are no
object). The true box of an object is the tight box around its visible ink, normalised to [0, 1] as the
contract's :class:`fleet.protocol.Box` wants it. The edge conditions of :mod:`fleet.sim.conditions` apply to the
canvases unchanged (they take ``(n, h, w)`` images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from fleet.sim.data import Dataset

INK_THRESHOLD = 64  # a glyph pixel at or above this (0..255) counts as the object's ink


@dataclass
class Scenes:
    """``images`` (n, h, w) uint8; per scene ``boxes[i]`` (m_i, 4) float32 normalised x1, y1, x2, y2 and
    ``labels[i]`` (m_i,) int64; ``class_names`` name each label."""

    images: npt.NDArray[np.uint8]
    boxes: list[npt.NDArray[np.float32]]
    labels: list[npt.NDArray[np.int64]]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: npt.NDArray[np.int64]) -> Scenes:
        """The scenes ``idx``, in that order (repeats allowed)."""
        return Scenes(self.images[idx], [self.boxes[int(i)] for i in idx], [self.labels[int(i)] for i in idx],
                      self.class_names)

    def to_npz_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Flat arrays for ``np.savez``: ``x``, ``boxes`` (total, 4), ``box_labels`` (total,), ``box_image`` (total,)
        (the scene each box belongs to) under ``prefix`` (e.g. ``"_train"`` gives ``x_train``, ``boxes_train``...)."""
        counts = np.array([len(b) for b in self.boxes], dtype=np.int64)
        return {
            f"x{prefix}": self.images,
            f"boxes{prefix}": np.concatenate(self.boxes) if len(self) else np.zeros((0, 4), np.float32),
            f"box_labels{prefix}": np.concatenate(self.labels) if len(self) else np.zeros(0, np.int64),
            f"box_image{prefix}": np.repeat(np.arange(len(self), dtype=np.int64), counts),
        }


def make_scenes(
    n: int,
    glyphs: npt.NDArray[np.uint8],
    glyph_labels: npt.NDArray[np.int64],
    class_names: list[str],
    *,
    seed: int = 0,
    size: int = 128,
    max_objects: int = 3,
    scale: tuple[int, int] | None = None,
    max_iou: float = 0.05,
    clutter: bool = True,
) -> Scenes:
    """``n`` scenes of side ``size`` built from ``glyphs`` (g, gh, gw) uint8 with labels ``glyph_labels`` (g,).

    ``scale``: the range of an object's side in pixels (default ``size/8 .. size/3``). Deterministic in ``seed``.
    """
    glyphs = np.asarray(glyphs)
    if glyphs.ndim != 3 or glyphs.dtype != np.uint8 or len(glyphs) == 0:
        raise ValueError(f"glyphs must be a non-empty uint8 array (g, h, w); received {glyphs.dtype} {glyphs.shape}")
    glyph_labels = np.asarray(glyph_labels, dtype=np.int64)
    if glyph_labels.shape != (len(glyphs),) or glyph_labels.min() < 0 or glyph_labels.max() >= len(class_names):
        raise ValueError(f"glyph_labels must be ({len(glyphs)},) in [0, {len(class_names)}); received "
                         f"shape {glyph_labels.shape}, range [{glyph_labels.min()}, {glyph_labels.max()}]")
    if n < 0 or size < 16 or max_objects < 1:
        raise ValueError(f"need n >= 0, size >= 16 and max_objects >= 1; received {n}, {size}, {max_objects}")
    lo, hi = scale or (max(6, size // 8), max(8, size // 3))
    if not 4 <= lo <= hi <= size:
        raise ValueError(f"scale must satisfy 4 <= low <= high <= size ({size}); received {(lo, hi)}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), np.uint8)
    boxes, labels = [], []
    for i in range(n):
        canvas = _background(rng, size, clutter=clutter)
        placed: list[np.ndarray] = []
        kinds: list[int] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            g = int(rng.integers(len(glyphs)))
            side = int(rng.integers(lo, hi + 1))
            glyph = _resize(glyphs[g], side)
            ink = glyph >= INK_THRESHOLD
            if not ink.any():
                continue
            ys, xs = np.nonzero(ink)
            for _attempt in range(20):
                y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float32)
                if not placed or _iou(box, np.stack(placed)).max() <= max_iou:
                    break
            else:
                continue
            region = canvas[y0: y0 + side, x0: x0 + side]
            bright = rng.uniform(0.75, 1.0)
            np.maximum(region, (glyph.astype(np.float32) * bright).astype(np.uint8), out=region)
            placed.append(box)
            kinds.append(int(glyph_labels[g]))
        images[i] = canvas
        boxes.append((np.stack(placed) / size).astype(np.float32) if placed else np.zeros((0, 4), np.float32))
        labels.append(np.asarray(kinds, np.int64))
    return Scenes(images, boxes, labels, list(class_names))


def digit_scenes(n: int, *, seed: int = 0, size: int = 128, max_objects: int = 3, split: str = "train",
                 test_fraction: float = 0.25, clutter: bool = True, digits: Sequence[int] | None = None) -> Scenes:
    """Scenes of scikit-learn's bundled digits; ``split`` ("train" or "test") picks disjoint digit images, so
    test scenes never reuse a training digit. ``digits`` keeps only those digits as the classes (in that order)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; received {split!r}")
    d = _digits(test_fraction)
    x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)
    names = d.class_names
    if digits is not None:
        keep = list(digits)
        if not keep or len(set(keep)) != len(keep) or not set(keep) <= set(range(10)):
            raise ValueError(f"digits must be distinct digits 0..9; received {keep}")
        lookup = np.full(10, -1, np.int64)
        lookup[keep] = np.arange(len(keep))
        mask = lookup[y] >= 0
        x, y, names = x[mask], lookup[y[mask]], [str(k) for k in keep]
    return make_scenes(n, x, y, names, seed=seed, size=size, max_objects=max_objects, clutter=clutter)


@lru_cache(maxsize=2)
def _digits(test_fraction: float) -> Dataset:
    """scikit-learn's digits split once per process (loading them costs seconds on a busy machine)."""
    from fleet.sim.data import load_dataset

    return load_dataset("digits", seed=0, test_fraction=test_fraction)


def _background(rng: np.random.Generator, size: int, *, clutter: bool) -> npt.NDArray[np.uint8]:
    """A dim gradient with noise; with ``clutter``, faint blobs and thin strokes that are no object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-20, 20, size=2)
    bg = rng.uniform(10, 40) + gx * xx + gy * yy + rng.normal(0, 4, (size, size))
    if clutter:
        for _ in range(int(rng.integers(1, 4))):  # soft blobs
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 16, size / 6)
            bg += rng.uniform(15, 45) * np.exp(-((yy * size - cy) ** 2 + (xx * size - cx) ** 2) / (2 * r * r))
        for _ in range(int(rng.integers(1, 4))):  # thin straight strokes
            y0, x0, y1, x1 = rng.uniform(0, size, 4)
            t = np.linspace(0, 1, 2 * size)
            ys = np.clip(np.rint(y0 + (y1 - y0) * t), 0, size - 1).astype(int)
            xs = np.clip(np.rint(x0 + (x1 - x0) * t), 0, size - 1).astype(int)
            bg[ys, xs] += rng.uniform(40, 90)
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8)


def _resize(glyph: npt.NDArray[np.uint8], side: int) -> npt.NDArray[np.uint8]:
    from PIL import Image

    return np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with others (m, 4), pixel xyxy."""
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)
