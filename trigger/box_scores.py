"""Per-box triggers: image scores from per-box uncertainty, ambiguous boxes, box-set disagreement and flicker.

Every function takes :class:`trigger.boxes.Boxes` for n frames and returns ``(n,)`` float64 (or, for the
comparisons, a :class:`BoxComparison` of ``(n,)`` arrays); higher means "more worth a human" throughout.

A frame where the model finds nothing has no box to be unsure about, so the uncertainty scores give it 0,
as Lightly's do; that is exactly the frame where the model may have missed everything. The comparisons
are what catch it: against the human's boxes, a challenger's, or the previous frame of the same video
stream, a frame with no box where the other side has some scores 1 (every object missed), never 0.

Published definitions each score reproduces (tests/trigger/test_box_scores.py recomputes them by hand):

* :func:`box_uncertainty` with ``reduce="max"`` and ``normalize=True`` is Lightly's detection scorer
  (``lightly/active_learning/scorers/detection.py``, ``ScorerObjectDetection``: ``uncertainty_entropy``,
  ``uncertainty_least_confidence`` and ``uncertainty_margin`` of each box's class probabilities, normalised to
  [0, 1] and reduced over the boxes with ``max``, 0 for a frame without boxes); ``measure="low_score"`` with
  ``reduce="mean"`` is its ``objectness_least_confidence`` (1 - the mean box score) and 1 - the mean that
  KubeEdge Sedna's ``ThresholdFilter`` compares (``sedna/algorithms/hard_example_mining``). Per box,
  normalised entropy is 1 - Sedna's ``CrossEntropyFilter`` confidence ``1 + sum p log p / log k``.
* :func:`ambiguous_boxes` with a band from 0 to ``t`` and ``floor=0`` is Sedna's ``IBTFilter`` hard coefficient
  (the share of boxes scoring at most ``threshold_box``).
* :func:`box_disagreement` is 1 - F1 with a true positive as in the PASCAL VOC criterion (Everingham et al.,
  2010: a same-class pair with IoU >= 0.5, each box used once); a class flip is a false positive and a false
  negative, as there.
* :func:`localization_stability` is Kao et al. 2018, "Localization-Aware Active Learning for Object
  Detection" (ACCV), section 3.2: ``S_B(B_j) = mean_n max IoU(B_j, boxes of noisy copy n)`` and the image's
  ``S_I = sum_j P(B_j) S_B(B_j) / sum_j P(B_j)``. :func:`box_instability` uses the previous frame of the stream
  as the perturbed copy, in both directions (so a box that vanishes counts as well as one that appears).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from trigger import scores as _s
from trigger._checks import F64, I64, Bool, describe
from trigger._history import as_streams, as_timestamps, previous_frames
from trigger.boxes import Boxes, _best_iou, _frame_pairs, _greedy_match, _make, _match_key, _same_frames, _select, _unit

__all__ = [
    "MEASURES", "REDUCTIONS", "BoxComparison", "ambiguous_boxes", "box_disagreement", "box_flicker",
    "box_instability", "box_uncertainty", "localization_stability",
]

MEASURES = ("entropy", "margin", "least_confidence", "low_score")
REDUCTIONS = ("max", "mean", "sum")


class BoxComparison(NamedTuple):
    """Two box sets compared frame by frame (``boxes`` against ``other``), each field ``(n,)``.

    ``score``: 1 - F1 in [0, 1] (0: the same objects; 1: nothing in common, including one side empty and the
    other not), NaN where either side is unknown; ``matched``: pairs of the same class with IoU >= the threshold;
    ``flips``: pairs that overlap as much but disagree on the class; ``missed``: boxes of ``other`` that nothing
    matched; ``extra``: boxes of ``boxes`` that matched nothing. For flicker, ``other`` is the previous frame:
    ``extra`` boxes appeared, ``missed`` ones vanished, and a box that jumped (IoU below the threshold) is both.
    """

    score: F64
    matched: I64
    flips: I64
    missed: I64
    extra: I64


def box_uncertainty(boxes: Boxes, *, measure: str = "entropy", reduce: str = "max", floor: float = 0.0,
                    normalize: bool = False) -> F64:
    """One uncertainty per box, reduced over each frame's boxes scoring at least ``floor`` -> ``(n,)``.

    ``measure``: ``"entropy"`` of the box's class distribution (nats, or / log k with ``normalize``);
    ``"margin"``: 1 - (top-1 - top-2 probability); ``"least_confidence"``: 1 - top-1 probability (/ (1 - 1/k)
    with ``normalize``); ``"low_score"``: 1 - the box's score (needs no distribution). ``reduce``: ``"max"``
    (the least sure box), ``"mean"`` or ``"sum"`` (grows with the number of unsure boxes). 0 for a frame
    with no box at or above ``floor``; NaN for an unknown frame.
    """
    b = _boxes(boxes)
    measure = _one_of(measure, MEASURES, "measure")
    reduce = _one_of(reduce, REDUCTIONS, "reduce")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be true or false; received {describe(normalize)}")
    if measure != "low_score" and b.probs is None and b.m:
        raise ValueError(f"box_uncertainty(measure={measure!r}) needs each box's class distribution (Boxes.probs); "
                         f"received Boxes without probs")
    return _uncertainty(b, measure, reduce, _unit(floor, "floor"), normalize)


def ambiguous_boxes(boxes: Boxes, *, threshold: float = 0.5, band: float = 0.1, floor: float | None = None,
                    share: bool = True) -> F64:
    """Boxes scoring within ``band`` of the operating ``threshold`` (``[threshold - band, threshold + band]``).

    ``share=True``: their share of the frame's boxes scoring at least ``floor`` (default: the band's lower
    edge, so the share is of the boxes the model at least half-believes in), 0 for a frame with none;
    ``share=False``: their count. ``(n,)``; NaN for an unknown frame.
    """
    b = _boxes(boxes)
    t = _unit(threshold, "threshold")
    w = _unit(band, "band")
    lo, hi = t - w, t + w
    f = lo if floor is None else _unit(floor, "floor")
    if not isinstance(share, bool):
        raise ValueError(f"share must be true or false; received {describe(share)}")
    return _ambiguous(b, lo, hi, f, share)


def box_disagreement(boxes: Boxes, other: Boxes, *, iou: float = 0.5, floor: float = 0.0,
                     classes: bool = True) -> BoxComparison:
    """Compare the model's ``boxes`` with ``other`` (a challenger's, or the human's) frame by frame.

    Boxes of both sides scoring under ``floor`` are left out (a human's boxes score 1). Pairs are matched
    greedily by IoU (at least ``iou``), same-class pairs first; ``classes=False`` ignores the classes (no
    flips). See :class:`BoxComparison`.
    """
    b = _boxes(boxes)
    _same_frames(b, other, "other")
    return _compare(b, other, _unit(iou, "iou", low_open=True), _unit(floor, "floor"), _flag(classes, "classes"))


def box_flicker(boxes: Boxes, stream: Any, *, timestamps: Any = None, iou: float = 0.5, floor: float = 0.0,
                classes: bool = True, max_gap: float | None = None) -> BoxComparison:
    """Each frame against the frame before it in its stream (``stream: (n,)`` ids; frames in capture order).

    A box that appears, vanishes, jumps (IoU with its best match below ``iou``) or changes class between two
    consecutive frames is unstable, with no human needed. NaN for the first frame of each stream and, with
    ``timestamps: (n,)`` seconds, where the frame before is later (out of order) or, with ``max_gap``, older
    than ``max_gap`` seconds.
    The evaluator also remembers each stream's last frame between batches; this function sees one batch.
    """
    b = _boxes(boxes)
    previous = _previous(b, stream, timestamps, max_gap)
    return _compare(b, previous, _unit(iou, "iou", low_open=True), _unit(floor, "floor"), _flag(classes, "classes"))


def box_instability(boxes: Boxes, stream: Any, *, timestamps: Any = None, floor: float = 0.0,
                    max_gap: float | None = None) -> F64:
    """1 - the score-weighted localization stability between each frame and the one before it in its stream.

    Kao et al.'s stability (:func:`localization_stability`) with the previous frame as the perturbed copy,
    taken both ways: ``1 - (sum_cur s * bestIoU + sum_prev s * bestIoU) / (sum_cur s + sum_prev s)`` over boxes
    scoring at least ``floor``. 0 when every box sits where it was, 1 when nothing overlaps (a frame that
    lost all its boxes included); 0 when neither frame has a box. NaN as for :func:`box_flicker`.
    """
    b = _boxes(boxes)
    return _instability(b, _previous(b, stream, timestamps, max_gap), _unit(floor, "floor"))


def localization_stability(reference: Boxes, perturbed: Sequence[Boxes], *, floor: float = 0.0) -> F64:
    """Kao et al. 2018's image localization stability ``S_I``. ``reference``: the boxes on the clean frames;
    ``perturbed``: the boxes on N noisy copies of the same frames -> ``(n,)`` in [0, 1].

    Per reference box, ``S_B`` is the mean over the copies of its highest IoU with a box of that copy (0 when
    the copy has none); ``S_I`` is the mean of ``S_B`` weighted by the reference boxes' scores. Only boxes
    scoring at least ``floor`` count. NaN for a frame without reference boxes (the paper scores none) or
    unknown in any set. High = stable; detections that move under noise are the informative ones.
    """
    ref = _boxes(reference, "reference")
    if isinstance(perturbed, Boxes) or not isinstance(perturbed, Sequence) or not perturbed:
        raise ValueError(f"perturbed must be a non-empty list of Boxes (one per noisy copy); "
                         f"received {describe(perturbed)}")
    for i, p in enumerate(perturbed):
        _same_frames(ref, p, f"perturbed[{i}]")
    return _stability(ref, list(perturbed), _unit(floor, "floor"))


# ---------------------------------------------------------------------------------------------
# unchecked kernels (the triggers call these on inputs already validated)
# ---------------------------------------------------------------------------------------------


def _per_box(b: Boxes, measure: str, normalize: bool) -> F64:
    """``(m,)`` the uncertainty of each box (see :func:`box_uncertainty`)."""
    if measure == "low_score":
        out: F64 = 1.0 - b.scores
        return out
    if b.probs is None:  # only when there is no box at all (checked by the callers)
        return np.zeros(b.m)
    if measure == "entropy":
        return _s._entropy(b.probs, normalize=normalize)
    if measure == "least_confidence":
        return _s._least_confidence(b.probs, normalize=normalize)
    out = 1.0 - _s._margin(b.probs)
    return out


def _reduce(values: F64, frame: I64, keep: Bool, n: int, how: str) -> F64:
    """Reduce ``values: (m,)`` (>= 0) over the boxes of each frame where ``keep`` -> ``(n,)``, 0 where none."""
    f = frame[keep]
    v = values[keep]
    if how == "max":
        top: F64 = np.zeros(n)
        np.maximum.at(top, f, v)
        return top
    total = _frame_sum(f, v, n)
    if how == "sum":
        return total
    count = np.bincount(f, minlength=n)
    mean: F64 = np.divide(total, count, out=np.zeros(n), where=count > 0)
    return mean


def _uncertainty(b: Boxes, measure: str, reduce: str, floor: float, normalize: bool, per_box: F64 | None = None) -> F64:
    """:func:`box_uncertainty`; ``per_box``: :func:`_per_box` already computed (the evaluator shares it)."""
    values = _per_box(b, measure, normalize) if per_box is None else per_box
    out = _reduce(values, b.frame_index, b.scores >= floor, b.n, reduce)
    return _unknown_nan(out, b.known)


def _ambiguous(b: Boxes, lo: float, hi: float, floor: float, share: bool) -> F64:
    s = b.scores
    counted = s >= floor
    amb = counted & (s >= lo) & (s <= hi)
    hits = np.bincount(b.frame_index[amb], minlength=b.n).astype(np.float64)
    if share:
        total = np.bincount(b.frame_index[counted], minlength=b.n)
        hits = np.divide(hits, total, out=np.zeros(b.n), where=total > 0)
    return _unknown_nan(hits, b.known)


def _compare(a: Boxes, b: Boxes, iou: float, floor: float, classes: bool) -> BoxComparison:
    a = _select(a, a.scores >= floor)
    b = _select(b, b.scores >= floor)
    n = a.n
    ia, ib, ov = _frame_pairs(a, b)
    ok = ov >= iou
    ia, ib, ov = ia[ok], ib[ok], ov[ok]
    same = a.labels[ia] == b.labels[ib] if classes else None
    match_a, _ = _greedy_match(ia, ib, _match_key(ov, same), a.m, b.m)
    paired = np.flatnonzero(match_a >= 0)
    pair_frame = a.frame_index[paired]
    flip = a.labels[paired] != b.labels[match_a[paired]] if classes else np.zeros(paired.size, bool)
    matched = np.bincount(pair_frame[~flip], minlength=n)
    flips = np.bincount(pair_frame[flip], minlength=n)
    na, nb = a.counts, b.counts
    total = na + nb
    score: F64 = 1.0 - np.divide(2.0 * matched, total, out=np.ones(n), where=total > 0)
    known = a.known_mask & b.known_mask
    if not known.all():
        score[~known] = np.nan
        na, nb, matched, flips = (np.where(known, x, 0) for x in (na, nb, matched, flips))
    return BoxComparison(score, matched, flips, nb - matched - flips, na - matched - flips)


def _instability(cur: Boxes, prev: Boxes, floor: float) -> F64:
    c = _select(cur, cur.scores >= floor)
    p = _select(prev, prev.scores >= floor)
    n = c.n
    num = _frame_sum(c.frame_index, c.scores * _best_iou(c, p), n)
    num += _frame_sum(p.frame_index, p.scores * _best_iou(p, c), n)
    den = _frame_sum(c.frame_index, c.scores, n) + _frame_sum(p.frame_index, p.scores, n)
    out: F64 = 1.0 - np.divide(num, den, out=np.ones(n), where=den > 0)
    np.clip(out, 0.0, 1.0, out=out)
    return _unknown_nan(out, cur.known_mask & prev.known_mask)


def _stability(ref: Boxes, perturbed: list[Boxes], floor: float) -> F64:
    r = _select(ref, ref.scores >= floor)
    s_b = np.zeros(r.m)
    known = r.known_mask.copy()
    for p in perturbed:  # one pass per noisy copy (a handful), each vectorised over all frames
        s_b += _best_iou(r, _select(p, p.scores >= floor))
        known &= p.known_mask
    s_b /= len(perturbed)
    num = _frame_sum(r.frame_index, r.scores * s_b, r.n)
    den = _frame_sum(r.frame_index, r.scores, r.n)
    out: F64 = np.divide(num, den, out=np.full(r.n, np.nan), where=den > 0)
    return _unknown_nan(out, known)


def _previous(b: Boxes, stream: Any, timestamps: Any, max_gap: float | None) -> Boxes:
    """The previous frame of each frame's stream within ``b`` (checked), unknown past ``max_gap``."""
    keys = as_streams(stream, b.n)
    ts = None if timestamps is None else as_timestamps(timestamps, b.n)
    gap_limit = None if max_gap is None else _positive_or_none(max_gap)
    previous, gap = previous_frames(b, keys, ts)
    return _limit_gap(previous, gap, gap_limit)


def _limit_gap(previous: Boxes, gap: F64, max_gap: float | None) -> Boxes:
    """``previous`` with the frames older than ``max_gap`` seconds (or out of order) marked unknown."""
    stale = gap < 0 if max_gap is None else (gap < 0) | (gap > max_gap)
    if not stale.any():
        return previous
    known = previous.known_mask & ~stale
    return _make(previous.boxes, previous.scores, previous.labels, previous.offsets, previous.probs, known)


def _frame_sum(frame: I64, weights: F64, n: int) -> F64:
    """``(n,)`` float64: the sum of ``weights: (m,)`` over the boxes of each frame (``frame: (m,)``)."""
    out: F64 = np.bincount(frame, weights=weights, minlength=n).astype(np.float64, copy=False)  # int when m = 0
    return out


def _unknown_nan(out: F64, known: Bool | None) -> F64:
    if known is not None and not known.all():
        out[~known] = np.nan
    return out


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def _boxes(value: Any, what: str = "boxes") -> Boxes:
    if not isinstance(value, Boxes):
        raise ValueError(f"{what} must be trigger.Boxes (build them with Boxes.from_frames); received "
                         f"{describe(value)}")
    return value


def _one_of(value: Any, options: tuple[str, ...], what: str) -> str:
    if value not in options:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, options))}; received {value!r}")
    return str(value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false; received {describe(value)}")
    return value


def _positive_or_none(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"max_gap must be a number of seconds > 0 or None; received {describe(value)}")
    return float(value)
