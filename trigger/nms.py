"""Dense detector outputs to boxes on the device: score threshold, top-k, class-wise NMS, a cap per frame.

A detector exported in the contract's dense layout (``fleet/protocol/model.py``: ``boxes (n, A, 4)`` every
anchor's decoded box, ``scores (n, A, k)`` every anchor's per-class score in [0, 1]) leaves post-processing to
the device, as the manifest's ``DetectorSpec`` says: :func:`decode_dense` keeps each anchor once, with its best
class, and, unlike torchvision's post-processing, keeps the anchor's whole class distribution for the
triggers (:mod:`trigger.box_scores`): the anchor's per-class scores divided by their sum.

NMS is torchvision's ``batched_nms`` rule: within one frame and one class, from the highest score down, a box
is dropped when it overlaps a box kept before it by more than ``iou``. It runs on all frames and classes at
once: the overlapping pairs of each (frame, class) group (found by a sweep over x, not by all pairs) form a
graph ordered by score, and "kept" is computed for every box together, round after round, until nothing
changes; a box's state is final once every box above it is, so the rounds reproduce the sequential loop
exactly (tests compare with torchvision).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trigger._checks import F32, I64, Bool, as_float, describe, positive_int
from trigger.boxes import Boxes, _make, _ragged_arange, _unit

__all__ = ["batched_nms", "decode_dense"]


def decode_dense(boxes: Any, scores: Any, *, score_threshold: float = 0.05, pre_nms_top_k: int = 1000,
                 nms_iou: float = 0.5, max_detections: int = 100) -> Boxes:
    """The detections of n frames from a detector's dense outputs.

    ``boxes: (n, A, 4)`` x1, y1, x2, y2 normalised per anchor; ``scores: (n, A, k)`` per-class scores in [0, 1].
    Per frame: each anchor takes its best class; anchors under ``score_threshold`` are dropped, and so are boxes
    left without area once clipped to [0, 1]; the ``pre_nms_top_k`` best remain (the first anchors among equal
    scores); same-class boxes overlapping a better one by more than ``nms_iou`` are suppressed; the
    ``max_detections`` best are kept.
    Returns :class:`Boxes` (frames in order, each frame's boxes by score, best first) with ``scores``: the best
    class score, ``labels``: that class, ``probs (m, k)``: the anchor's class scores normalised to sum 1 (the box's
    class distribution; uniform if every score is 0). The defaults are ``DetectorSpec``'s.
    """
    b: F32 = as_float(boxes, "boxes", ndim=3, finite=False, dtype=np.float32)
    s: F32 = as_float(scores, "scores", ndim=3, finite=False, dtype=np.float32)
    n, a = s.shape[:2]
    if b.shape != (n, a, 4) or s.shape[2] < 1:
        raise ValueError(f"decode_dense expects boxes (n, A, 4) and scores (n, A, k) for the same n and A; received "
                         f"boxes {describe(b)} and scores {describe(s)}")
    if s.size:  # min and max are NaN when anything is: two fast passes check range and finiteness together
        lo, hi = float(s.min()), float(s.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"scores must be per-class scores in [0, 1]; received values in [{lo:.4g}, {hi:.4g}] "
                             f"(apply the sigmoid in the model)")
        if not (math.isfinite(float(b.min())) and math.isfinite(float(b.max()))):
            raise ValueError(f"boxes must be finite; received {int((~np.isfinite(b)).sum())} non-finite values")
    return _decode(b, s, _unit(score_threshold, "score_threshold"), positive_int(pre_nms_top_k, "pre_nms_top_k"),
                   _unit(nms_iou, "nms_iou"), positive_int(max_detections, "max_detections"))


def batched_nms(boxes: Any, scores: Any, groups: Any, *, iou: float = 0.5) -> I64:
    """Greedy NMS within each group (torchvision.ops.batched_nms). ``boxes: (m, 4)``, ``scores: (m,)``,
    ``groups: (m,)`` ints (class, or frame and class) -> the indices kept, by decreasing score."""
    x = as_float(boxes, "boxes", ndim=2)
    m = x.shape[0]
    if x.shape != (m, 4):
        raise ValueError(f"boxes must have shape (m, 4); received {describe(x)}")
    sc = as_float(scores, "scores", ndim=1)
    g = np.asarray(groups)
    if sc.shape != (m,) or g.shape != (m,) or (m and g.dtype.kind not in "iu"):
        raise ValueError(f"scores and groups must have shape ({m},), groups integers; received scores "
                         f"{describe(sc)} and groups {describe(g)}")
    kept = np.flatnonzero(_nms(x, g.astype(np.int64), sc, _unit(iou, "iou")))
    out: I64 = kept[np.argsort(-sc[kept], kind="stable")]
    return out


# ---------------------------------------------------------------------------------------------
# unchecked kernels
# ---------------------------------------------------------------------------------------------


def _decode(b: F32, s: F32, score_threshold: float, top_k: int, nms_iou: float, max_det: int) -> Boxes:
    n, a, k = s.shape
    flat = s.reshape(n * a, k)
    best = flat[:, 0].copy()  # (n * A,) each anchor's best class score: k elementwise passes, faster than a
    for c in range(1, k):  # reduction over a short last axis
        np.maximum(best, flat[:, c], out=best)
    xy_all = b.reshape(n * a, 4)
    idx = np.flatnonzero(best >= score_threshold)  # candidates, frame by frame
    xy = np.clip(xy_all[idx], 0.0, 1.0)
    idx = idx[(xy[:, 2] > xy[:, 0]) & (xy[:, 3] > xy[:, 1])]  # boxes left with an area once clipped
    counts = np.bincount(idx // a, minlength=n)

    def nms(rows: I64) -> I64:
        frame, cls = rows // a, flat[rows].argmax(axis=1)
        out: I64 = rows[_nms(np.clip(xy_all[rows], 0.0, 1.0), frame * k + cls, best[rows], nms_iou)]
        return out

    # A box's fate in greedy NMS depends only on the boxes processed before it, so a frame's first candidates
    # (in NMS order: score, then anchor) settle its first boxes: a frame whose `prefix` first candidates leave
    # max_det boxes is done; only the others need the rest of their pre_nms_top_k candidates.
    prefix = min(2 * max_det, top_k)
    if (counts > prefix).any():
        kept = nms(idx[_first_per_frame(idx, best, a, counts, prefix)])
        short = (np.bincount(kept // a, minlength=n) < max_det) & (counts > prefix)
        if short.any():
            rest = idx[short[idx // a]]
            rest = rest[_first_per_frame(rest, best, a, np.where(short, counts, 0), top_k)]
            kept = np.concatenate([kept[~short[kept // a]], nms(rest)])
    else:
        kept = nms(idx)
    kept = kept[np.argsort((kept // a) * 2.0 - best[kept], kind="stable")]  # by frame, best first
    per_frame = np.bincount(kept // a, minlength=n)
    kept = kept[_ragged_arange(per_frame) < max_det]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.minimum(per_frame, max_det), out=offsets[1:])
    d = flat[kept].astype(np.float64)
    total = d.sum(axis=1, keepdims=True)
    probs = np.divide(d, total, out=np.full_like(d, 1.0 / k), where=total > 0)
    return _make(np.clip(xy_all[kept], 0.0, 1.0).astype(np.float64), best[kept].astype(np.float64),
                 d.argmax(axis=1).astype(np.int64), offsets, probs)


def _first_per_frame(rows: I64, best: F32, a: int, counts: I64, top: int) -> Bool:
    """Mask over ``rows`` (anchor indices, frame by frame; ``counts``: how many per frame) of each frame's ``top``
    first in NMS order: highest ``best`` score first, the lower anchor first among equal scores."""
    out = np.ones(rows.shape[0], bool)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for f in np.flatnonzero(counts > top).tolist():  # only the frames with too many, on their own candidates
        lo, hi = int(starts[f]), int(starts[f + 1])
        values = best[rows[lo:hi]]
        cut = np.partition(values, values.shape[0] - top)[values.shape[0] - top]  # the top-th best score
        mine = out[lo:hi]  # a view
        mine[values < cut] = False
        above = int((values > cut).sum())
        mine[np.flatnonzero(values == cut)[top - above :]] = False  # ties at the cut: the first anchors stay
    return out


def _nms(xy: Any, group: I64, score: Any, iou: float) -> Bool:
    """Which boxes greedy NMS keeps. ``xy: (m, 4)`` (float32 or float64; the IoU is computed in that precision),
    ``group: (m,)`` ints >= 0, ``score: (m,)`` -> ``(m,)`` bool.

    Only pairs whose x-ranges overlap enough can reach an IoU above ``iou``: with the boxes of each group sorted by
    x1, a box's candidates are the boxes after it up to the first that starts too far right (a sweep, as in
    broad-phase collision checks), so the pairs examined grow with the overlaps, not with the square of m.
    """
    m = group.shape[0]
    keep = np.ones(m, bool)
    if m < 2:
        return keep
    lo, hi = float(min(xy[:, 0].min(), xy[:, 2].min())), float(max(xy[:, 0].max(), xy[:, 2].max()))
    span = hi - lo + 1.0  # keys of different groups are this far apart, so they never interleave
    base = group * span - lo
    rank = np.empty(m, np.int64)
    top = max(float(score.max()), 0.0) + 1.0
    rank[np.argsort(group * top - score, kind="stable")] = np.arange(m)  # lower = better within its group
    order = np.argsort(base + xy[:, 0], kind="stable")
    x = xy[order]
    starts = base[order] + x[:, 0]
    # IoU > iou needs an x-overlap above iou * the box's width, so later boxes starting at or past
    # x2 - iou * width cannot qualify (a hair of slack for rounding)
    ends = starts + np.maximum(x[:, 2] - x[:, 0], 0.0) * (1.0 - iou) + 1e-6 * span
    count = np.maximum(np.searchsorted(starts, ends, side="left") - np.arange(m) - 1, 0)
    src = np.repeat(np.arange(m), count)
    dst = src + 1 + _ragged_arange(count)
    x1, y1, x2, y2 = (np.ascontiguousarray(x[:, c]) for c in range(4))
    # the same bound in y (an overlap above iou * the height of either box) leaves few pairs for the IoU itself
    h = np.minimum(y2[src], y2[dst]) - np.maximum(y1[src], y1[dst])
    near = h > iou * np.maximum(y2[src] - y1[src], y2[dst] - y1[dst])
    src, dst, h = src[near], dst[near], h[near]
    area = (x2 - x1) * (y2 - y1)
    w = np.minimum(x2[src], x2[dst]) - np.maximum(x1[src], x1[dst])
    inter = np.maximum(w, 0) * h
    union = area[src] + area[dst] - inter
    hit = inter > iou * union  # IoU > iou, without dividing (and 0 / 0 never hits)
    a, b = order[src[hit]], order[dst[hit]]
    first = rank[a] < rank[b]
    sup, victim = np.where(first, a, b), np.where(first, b, a)  # the better box suppresses the other
    # a box is kept when no kept box suppresses it; its state is final once its suppressors' are
    while sup.size:
        new = np.ones(m, bool)
        new[victim[keep[sup]]] = False
        if np.array_equal(new, keep):
            break
        keep = new
    return keep
