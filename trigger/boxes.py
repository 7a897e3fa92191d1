"""A detector's boxes for a batch of frames (:class:`Boxes`), their IoU, and greedy matching between two box sets.

Layout (CSR, as ragged tensors are usually stored): the m boxes of n frames are concatenated, frame by frame,
into ``boxes (m, 4)`` (x1, y1, x2, y2, normalised to [0, 1] on a device, though any units work), ``scores (m,)``
in [0, 1], ``labels (m,)`` class indices and, optionally, ``probs (m, k)``: each box's class distribution.
``offsets (n + 1,)`` cuts them into frames: frame f's boxes are rows ``offsets[f]:offsets[f + 1]``. A frame
with no box costs nothing and nothing is padded, so every kernel below works on all frames of a batch at once.
``known (n,)`` tells a frame whose box set is unknown (a challenger that gave no output, a frame nobody
labeled) from one where there is nothing to find; every score is NaN for an unknown frame, never 0.

Matching is greedy over the candidate pairs of each frame (pairs whose IoU reaches the threshold), best
pair first: the best remaining pair is matched, both of its boxes leave, and so on. It runs for every
frame at once as rounds of mutually-best pairs (a pair that is the best of both of its boxes is in the
greedy matching), so no Python loop runs per frame or per box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trigger._checks import F64, I64, Bool, as_float, as_probs, describe

__all__ = ["Boxes", "box_iou", "match_boxes"]


@dataclass(frozen=True, eq=False)
class Boxes:
    """The boxes of n frames, concatenated (see the module docstring). Checked when built.

    ``boxes: (m, 4)`` finite, ``x1 <= x2`` and ``y1 <= y2``; ``scores: (m,)`` in [0, 1]; ``labels: (m,)``
    ints >= 0; ``offsets: (n + 1,)`` from 0, non-decreasing, ending at m; ``probs: (m, k)`` rows summing to 1
    (optional; ``labels < k``); ``known: (n,)`` bool (optional; default: every frame is known).
    Build one from per-frame lists with :meth:`from_frames`.
    """

    boxes: Any
    scores: Any
    labels: Any
    offsets: Any
    probs: Any = None
    known: Any = None
    _frame: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        offsets = _offsets(self.offsets)
        m = int(offsets[-1])
        boxes: F64 = as_float(self.boxes, "Boxes.boxes", ndim=2)
        if boxes.shape != (m, 4):
            raise ValueError(f"Boxes.boxes must have shape ({m}, 4) (offsets end at {m}); received {describe(boxes)}")
        if m and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
            bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
            raise ValueError(f"Boxes.boxes must be x1, y1, x2, y2 with x1 <= x2 and y1 <= y2; received row {bad}: "
                             f"{boxes[bad].tolist()}")
        scores: F64 = as_float(self.scores, "Boxes.scores", ndim=1)
        if scores.shape != (m,):
            raise ValueError(f"Boxes.scores must have shape ({m},); received {describe(scores)}")
        if m and (scores.min() < 0.0 or scores.max() > 1.0):
            raise ValueError(f"Boxes.scores must be in [0, 1]; received values in [{scores.min():.4g}, "
                             f"{scores.max():.4g}]")
        labels = _labels(self.labels, m)
        probs = None
        if self.probs is not None:
            probs = as_probs(self.probs, "Boxes.probs")
            if probs.shape[0] != m:
                raise ValueError(f"Boxes.probs must have shape ({m}, k); received {describe(probs)}")
            if m and int(labels.max()) >= probs.shape[1]:
                raise ValueError(f"Boxes.labels must be below k={probs.shape[1]} (the columns of probs); "
                                 f"received {int(labels.max())}")
        known = None
        if self.known is not None:
            known = np.asarray(self.known)
            if known.dtype != np.bool_ or known.shape != (offsets.shape[0] - 1,):
                raise ValueError(f"Boxes.known must be a bool array of shape ({offsets.shape[0] - 1},); "
                                 f"received {describe(known)}")
        for name, value in (("boxes", boxes), ("scores", scores), ("labels", labels), ("offsets", offsets),
                            ("probs", probs), ("known", known)):
            object.__setattr__(self, name, value)

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_frames(cls, boxes: Sequence[Any], *, scores: Sequence[Any] | None = None,
                    labels: Sequence[Any] | None = None, probs: Sequence[Any] | None = None,
                    known: Any = None) -> Boxes:
        """From one entry per frame: ``boxes[f]: (q_f, 4)``, ``scores[f]: (q_f,)`` (default 1: a human's
        boxes), ``labels[f]: (q_f,)`` (default 0: a one-class detector), ``probs[f]: (q_f, k)``."""
        if isinstance(boxes, np.ndarray) or not isinstance(boxes, Sequence):
            raise ValueError(f"Boxes.from_frames expects a list with one (q, 4) array per frame; "
                             f"received {describe(boxes)}")
        n = len(boxes)
        for name, seq in (("scores", scores), ("labels", labels), ("probs", probs)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"Boxes.from_frames: {name} must have one entry per frame ({n}); "
                                 f"received {describe(seq)}")
        parts = [np.asarray(b, np.float64).reshape(-1, 4) if np.size(b) == 0 else np.asarray(b, np.float64)
                 for b in boxes]
        counts = [p.shape[0] if p.ndim == 2 and p.shape[1] == 4 else -1 for p in parts]
        if any(c < 0 for c in counts):
            f = counts.index(-1)
            raise ValueError(f"Boxes.from_frames: boxes[{f}] must have shape (q, 4); received {describe(parts[f])}")
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        m = int(offsets[-1])

        def cat(seq: Sequence[Any] | None, default: Any, dtype: Any) -> Any:
            if seq is None:
                return np.full(m, default, dtype)
            return np.concatenate([np.asarray(s, dtype).reshape(-1) for s in seq]) if n else np.zeros(0, dtype)

        probs_all = None
        if probs is not None:
            ks = {np.shape(p)[-1] for p in probs if np.ndim(p) == 2}
            if len(ks) > 1:
                raise ValueError(f"Boxes.from_frames: probs must have the same classes in every frame; "
                                 f"received rows of {sorted(ks)} classes")
            if ks:  # else no frame says how many classes there are (no box anywhere): leave probs out
                k = ks.pop()
                probs_all = np.concatenate([np.asarray(p, np.float64).reshape(-1, k) for p in probs])
        return cls(np.concatenate(parts) if n else np.zeros((0, 4)), cat(scores, 1.0, np.float64),
                   cat(labels, 0, np.int64), offsets, probs_all, known)

    @classmethod
    def empty(cls, n: int, *, known: Any = None) -> Boxes:
        """n frames without a box."""
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), np.zeros(n + 1, np.int64), known=known)

    @classmethod
    def concat(cls, parts: Sequence[Boxes]) -> Boxes:
        """The frames of ``parts`` one after the other (probs are kept only when every part has them)."""
        if not parts:
            return cls.empty(0)
        with_probs = all(p.probs is not None for p in parts)
        if with_probs and len({p.probs.shape[1] for p in parts}) > 1:
            raise ValueError(f"Boxes.concat: parts have probs over different class counts "
                             f"{sorted({p.probs.shape[1] for p in parts})}")
        starts = np.cumsum([0] + [p.m for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
        known = None
        if any(p.known is not None for p in parts):
            known = np.concatenate([p.known_mask for p in parts])
        return _make(np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                     np.concatenate([p.labels for p in parts]), offsets.astype(np.int64),
                     np.concatenate([p.probs for p in parts]) if with_probs else None, known)

    # -- reading ----------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Frames."""
        return int(self.offsets.shape[0] - 1)

    @property
    def m(self) -> int:
        """Boxes, over all frames."""
        return int(self.offsets[-1])

    @property
    def k(self) -> int | None:
        """Classes of the per-box distributions (None without ``probs``)."""
        return None if self.probs is None else int(self.probs.shape[1])

    @property
    def counts(self) -> I64:
        """``(n,)`` boxes per frame."""
        out: I64 = np.diff(self.offsets)
        return out

    @property
    def frame_index(self) -> I64:
        """``(m,)`` the frame of each box."""
        if self._frame is None:
            object.__setattr__(self, "_frame", np.repeat(np.arange(self.n, dtype=np.int64), self.counts))
        out: I64 = self._frame
        return out

    @property
    def known_mask(self) -> Bool:
        """``(n,)`` True where the frame's box set is known (possibly empty)."""
        return np.ones(self.n, bool) if self.known is None else self.known

    def rows(self, f: int) -> slice:
        """The rows of frame ``f`` in the concatenated arrays."""
        return slice(int(self.offsets[f]), int(self.offsets[f + 1]))

    def take(self, frames: Any) -> Boxes:
        """The frames ``frames: (p,)`` (repeats allowed; -1 gives an unknown frame without boxes)."""
        idx = np.asarray(frames, np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < -1 or idx.max() >= self.n)):
            raise ValueError(f"Boxes.take expects frame indices in [-1, {self.n}); received {describe(idx)}")
        return _take(self, idx)

    def __len__(self) -> int:
        return self.n


def box_iou(a: Any, b: Any) -> F64:
    """Intersection over union of every box of ``a: (p, 4)`` with every box of ``b: (q, 4)`` -> ``(p, q)``.

    Boxes are x1, y1, x2, y2 with x1 <= x2 and y1 <= y2. Symmetric (``box_iou(a, b) == box_iou(b, a).T``),
    in [0, 1]; 0 for two boxes whose union has no area.
    """
    x = _corners(a, "a")
    y = _corners(b, "b")
    return _iou_matrix(x, y)


def match_boxes(a: Boxes, b: Boxes, *, iou: float = 0.5, classes: bool = False) -> tuple[I64, I64]:
    """Greedy one-to-one matching of ``a``'s boxes with ``b``'s, frame by frame.

    Two boxes of the same frame may match when their IoU is at least ``iou``; the pair with the highest IoU
    is matched first (with ``classes=True``, every same-class pair before any pair of different classes).
    Returns ``(match_a (a.m,), match_b (b.m,))``: the row in the other set each box matched, or -1.
    """
    _same_frames(a, b, "b")
    thr = _unit(iou, "iou", low_open=True)
    if not isinstance(classes, bool):
        raise ValueError(f"classes must be true or false; received {describe(classes)}")
    ia, ib, ov = _frame_pairs(a, b)
    key = _match_key(ov, a.labels[ia] == b.labels[ib] if classes else None)
    keep = ov >= thr
    return _greedy_match(ia[keep], ib[keep], key[keep], a.m, b.m)


# ---------------------------------------------------------------------------------------------
# unchecked kernels (the triggers call these on inputs already validated)
# ---------------------------------------------------------------------------------------------


def _make(boxes: F64, scores: F64, labels: I64, offsets: I64, probs: F64 | None = None,
          known: Bool | None = None) -> Boxes:
    """A :class:`Boxes` from arrays already known to be right (no checks, no copies)."""
    out = object.__new__(Boxes)
    for name, value in (("boxes", boxes), ("scores", scores), ("labels", labels), ("offsets", offsets),
                        ("probs", probs), ("known", known), ("_frame", None)):
        object.__setattr__(out, name, value)
    return out


def _take(b: Boxes, idx: I64) -> Boxes:
    """Frames ``idx`` of ``b`` (-1 = an unknown frame without boxes)."""
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    counts = np.where(valid, b.counts[safe], 0)
    offsets = np.zeros(idx.shape[0] + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows = np.repeat(b.offsets[safe], counts) + _ragged_arange(counts)
    known = valid & b.known_mask[safe]
    return _make(b.boxes[rows], b.scores[rows], b.labels[rows], offsets,
                 None if b.probs is None else b.probs[rows], None if known.all() else known)


def _select(b: Boxes, keep: Bool) -> Boxes:
    """The boxes of ``b`` where ``keep: (m,)``, in the same frames."""
    if keep.all():
        return b
    counts = np.bincount(b.frame_index[keep], minlength=b.n)
    offsets = np.zeros(b.n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return _make(b.boxes[keep], b.scores[keep], b.labels[keep], offsets,
                 None if b.probs is None else b.probs[keep], b.known)


def _ragged_arange(counts: I64) -> I64:
    """``concatenate([arange(c) for c in counts])``, without a loop. ``counts: (p,)`` >= 0."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    out: I64 = np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)
    return out


def _iou_pairs(a: F64, b: F64) -> F64:
    """IoU of ``a[i]`` with ``b[i]``. ``a, b: (p, 4)`` -> ``(p,)``."""
    w = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    h = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    out: F64 = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def _iou_matrix(a: F64, b: F64) -> F64:
    """IoU of every box of ``a: (p, 4)`` with every box of ``b: (q, 4)`` -> ``(p, q)``."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: F64 = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def _frame_pairs(a: Boxes, b: Boxes) -> tuple[I64, I64, F64]:
    """Every pair (row of ``a``, row of ``b``) in the same frame, and its IoU: ``(ia, ib, iou)``, each ``(e,)``."""
    per_box = b.counts[a.frame_index]  # partners of each box of a
    ia = np.repeat(np.arange(a.m, dtype=np.int64), per_box)
    ib = np.repeat(b.offsets[:-1][a.frame_index], per_box) + _ragged_arange(per_box)
    return ia, ib, _iou_pairs(a.boxes[ia], b.boxes[ib])


def _match_key(iou: F64, same_class: Bool | None) -> F64:
    """The order pairs are matched in: IoU, with every same-class pair first when ``same_class`` is given."""
    return iou if same_class is None else iou + 2.0 * same_class


def _greedy_match(ia: I64, ib: I64, key: F64, na: int, nb: int) -> tuple[I64, I64]:
    """Greedy matching of the candidate pairs ``(ia[e], ib[e])``, highest ``key`` first (ties: lower ia, then
    lower ib). Returns ``(match_a (na,), match_b (nb,))``, -1 where unmatched.

    Each round matches every pair that is the best remaining pair of both of its boxes; under a strict
    order such a pair belongs to the greedy matching, and the best remaining pair always is one, so the
    rounds reproduce the sequential greedy result exactly.
    """
    match_a = np.full(na, -1, np.int64)
    match_b = np.full(nb, -1, np.int64)
    if ia.size == 0:
        return match_a, match_b
    order = np.lexsort((ib, ia, -key))
    ia, ib = ia[order], ib[order]  # rank = position in this order
    none = ia.size  # above every rank
    rank: I64 = np.arange(none, dtype=np.int64)
    while ia.size:
        best_a = np.full(na, none, np.int64)
        best_b = np.full(nb, none, np.int64)
        np.minimum.at(best_a, ia, rank)
        np.minimum.at(best_b, ib, rank)
        win = (best_a[ia] == rank) & (best_b[ib] == rank)
        match_a[ia[win]] = ib[win]
        match_b[ib[win]] = ia[win]
        alive = (match_a[ia] < 0) & (match_b[ib] < 0)
        ia, ib, rank = ia[alive], ib[alive], rank[alive]
    return match_a, match_b


def _best_iou(a: Boxes, b: Boxes) -> F64:
    """``(a.m,)``: each box of ``a``'s highest IoU with a box of ``b`` in the same frame (0 when there is none)."""
    ia, _, ov = _frame_pairs(a, b)
    out = np.zeros(a.m)
    np.maximum.at(out, ia, ov)
    return out


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def _offsets(value: Any) -> I64:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] < 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"Boxes.offsets must be a 1-D integer array of length n + 1; received {describe(arr)}")
    out = arr.astype(np.int64, copy=False)
    if out[0] != 0 or (np.diff(out) < 0).any():
        raise ValueError(f"Boxes.offsets must start at 0 and never decrease; received {out[:8].tolist()}"
                         f"{'...' if out.size > 8 else ''}")
    return out


def _labels(value: Any, m: int) -> I64:
    arr = np.asarray(value)
    if arr.shape != (m,):
        raise ValueError(f"Boxes.labels must have shape ({m},); received {describe(arr)}")
    whole = arr.dtype.kind == "f" and bool(np.isfinite(arr).all()) and np.array_equal(arr, np.round(arr))
    if m and arr.dtype.kind not in "iu" and not whole:
        raise ValueError(f"Boxes.labels must be integer class indices; received {describe(arr)}")
    out = arr.astype(np.int64, copy=False)
    if m and int(out.min()) < 0:
        raise ValueError(f"Boxes.labels must be >= 0; received {int(out.min())}")
    return out


def _corners(value: Any, what: str) -> F64:
    arr: F64 = as_float(value, what, ndim=2)
    if arr.shape[1] != 4:
        raise ValueError(f"{what} must have shape (p, 4) (x1, y1, x2, y2); received {describe(arr)}")
    if arr.size and ((arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any()):
        raise ValueError(f"{what} must be x1, y1, x2, y2 with x1 <= x2 and y1 <= y2; received a box that is not")
    return arr


def _same_frames(a: Boxes, b: Any, what: str) -> None:
    if not isinstance(a, Boxes):
        raise ValueError(f"expected Boxes; received {describe(a)}")
    if not isinstance(b, Boxes):
        raise ValueError(f"{what} must be Boxes; received {describe(b)}")
    if b.n != a.n:
        raise ValueError(f"{what} must describe the same {a.n} frames; received Boxes of {b.n} frames")


def _unit(value: Any, what: str, *, low_open: bool = False) -> float:
    """A number in [0, 1] (``(0, 1]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number in [0, 1]; received {describe(value)}")
    v = float(value)
    if not (0.0 <= v <= 1.0) or (low_open and v == 0.0):
        raise ValueError(f"{what} must be a number in {'(0, 1]' if low_open else '[0, 1]'}; received {value!r}")
    return v
