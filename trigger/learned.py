"""A learned trigger: the chance that the deployed classifier is wrong on a frame, from the scores the device
already computes, by a logistic model the hub fits on labeled cases and ships in the campaign spec.

The features (:data:`FEATURES`, each in [0, 1]) are computed the same way on the device (from the frame's
probabilities, the human's action and the challenger's probabilities) and on the hub (from a stored case's
payload), by :func:`error_features`:

- ``least_confidence``: (1 - max p) / (1 - 1/k); ``margin``: top-1 minus top-2 probability; ``entropy``:
  Shannon entropy / log k;
- ``human``: the human's action is not the model's top class (0 where unknown), ``human_known``: 1 where a
  human action is known; ``challenger``, ``challenger_known``: the same for the challenger's top class.

The trigger ``learned_error`` (:data:`trigger.triggers.TRIGGERS`) returns ``sigmoid(bias + sum_f w_f x_f)``,
with one spec parameter per weight (``w_<feature>``) and ``bias``: numpy only, on the device. A leaf usually
fires at a ``target_rate``, so the device calibrates its threshold as for any other score.

``learned_error_knn`` adds one feature from the model's own novelty bank (its training set's embeddings, with
their labels), :data:`BANK_FEATURES`: ``neighbours_other``, the share of the frame's ``k`` nearest bank entries
with a known label whose label is not the model's top class (0 where none has a known label), by
:func:`neighbour_features`. Where the human's action is unknown it is the strongest single feature measured
(`benchmarks/bench_error_capture.py`): a frame that looks like training frames of another class is a likely
error even when the model is sure.

For a detector, ``learned_box_error`` reads :data:`BOX_FEATURES` (each in [0, 1]) from the frame's boxes by
:func:`box_error_features`, with ``floor`` the detector's operating threshold (the boxes it reports score at least
that): ``low_score``: 1 - the lowest reported box's score; ``near_floor``: how many boxes score within
:data:`NEAR_FLOOR_BAND` of the floor, either side; ``reported``: how many boxes are reported, over
:data:`BOX_SCALE`; ``entropy_sum``: the normalised class entropies of the reported boxes, summed, over
:data:`BOX_SCALE` (0 without class distributions; a sum, since a frame's errors grow with its unsure objects:
``box_entropy_sum`` captured the most errors of the single scores where the human's action is unknown);
``human``: how many boxes differ from the human's (missed + extra + class flips, at IoU 0.5, one to one; 0 where
unknown) and ``human_known``; ``challenger``, ``challenger_known``: the same against the challenger's reported
boxes. The counts of near_floor, human and challenger enter as ``1 - 2**-c`` (0, 0.5, 0.75, ...); every feature
is clipped to [0, 1]. The hub computes the same features from a stored case's boxes, since the device uploads
every decoded box with its score and class distribution. (Measured on the detection demo's world, linear
reported and entropy_sum features captured more errors than squashed ones where the human's action is unknown:
0.677 of the oracle at 5% against 0.516, `benchmarks/bench_error_capture_detect.py`.)

``learned_box_error_count`` (what the hub fits for a detector) reads the same features and their products two by
two (:data:`BOX_COUNT_FEATURES`, by :func:`with_pairs`) and returns the expected number of box errors on the frame,
``exp(bias + sum_f w_f x_f)`` (:func:`expected_count`), by the hub's Poisson regression on how many boxes each
labeled frame got wrong. A fleet's upload budget is best spent on the frames with the most errors, which is what a
count model ranks by and a yes/no model does not; the products let the weight of one feature depend on another
(the human's count where the human is known, the scores where not). Measured on the detection demo's world at a
5% budget: 0.854-0.905 of the oracle's capture over three seeds against 0.804-0.847 for the logistic
``learned_box_error`` (`benchmarks/bench_error_capture_detect.py`).

``learned_box_error_hist`` (what the hub fits for a detector now) reads those and :data:`SCORE_BINS`
(:func:`box_hist_features`): how many boxes score in each bin around the floor, by :func:`box_score_bins`. The
reported boxes count by fifths of [floor, 1] (a low-scoring reported box is the likelier a false one); under the
floor only isolated boxes count, those overlapping no reported box at IoU :data:`ISOLATED_IOU` (a faint box alone
is the likelier an object the model missed; one beside a reported box is mostly its duplicate), by quarters of the
floor. Errors add up box by box, and these counts let the fit weigh each box by its score. Measured on the
detection demo's world where the human's action is unknown (the frames where only the model's scores speak), at
5%, over five seeds, 0.726-0.843 of the oracle against 0.673-0.829 without the bins (+0.014 to +0.079 on every
seed), with the capture over all frames level (-0.009 to +0.002; `benchmarks/bench_error_capture_detect.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trigger import box_scores as _bs
from trigger import scores as _s
from trigger._checks import F64, I64
from trigger.boxes import Boxes, _best_iou, _select, _unit
from trigger.disagreement import _outside_top_k

__all__ = ["BANK_FEATURES", "BOX_COUNT_FEATURES", "BOX_FEATURES", "BOX_HIST_FEATURES", "FEATURES", "SCORE_BINS",
           "box_error_features", "box_hist_features", "box_score_bins", "error_features", "error_probability",
           "expected_count", "neighbour_features", "with_pairs"]

FEATURES = ("least_confidence", "margin", "entropy", "human", "human_known", "challenger", "challenger_known")
BANK_FEATURES = (*FEATURES, "neighbours_other")
BOX_FEATURES = ("low_score", "near_floor", "reported", "entropy_sum", "human", "human_known", "challenger",
                "challenger_known")
BOX_PAIRS = tuple(f"{a}__{b}" for i, a in enumerate(BOX_FEATURES) for b in BOX_FEATURES[i + 1:])
BOX_COUNT_FEATURES = (*BOX_FEATURES, *BOX_PAIRS)  # learned_box_error_count's: the features, then their products
SCORE_BINS = ("under_25", "under_50", "under_75", "over_0", "over_20", "over_40", "over_60", "over_80")
BOX_HIST_FEATURES = (*BOX_COUNT_FEATURES, *SCORE_BINS)  # learned_box_error_hist's: those, then the score histogram
ISOLATED_IOU = 0.3  # a box under the floor overlapping no reported box this much may be an object the model missed
NEAR_FLOOR_BAND = 0.2  # box_ambiguous_count's band that captured the most errors alone (bench_error_capture_detect)
BOX_SCALE = 8.0  # reported and entropy_sum grow linearly up to this many boxes' worth, then stay at 1
MATCH_IOU = 0.5


def error_features(probs: Any, human: Any = None, challenger_probs: Any = None) -> F64:
    """``probs (n, k)`` rows summing to 1; ``human (n,)`` class or -1 (unknown) or None; ``challenger_probs
    (n, k)`` with NaN rows where there is no challenger output, or None -> ``(n, len(FEATURES))`` in [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, k >= 2); received shape {p.shape}")
    n = p.shape[0]
    out = np.zeros((n, len(FEATURES)))
    out[:, 0] = _s._least_confidence(p, normalize=True)
    out[:, 1] = _s._margin(p)
    out[:, 2] = _s._entropy(p, normalize=True)
    if human is not None:
        h: I64 = np.asarray(human, dtype=np.int64)
        if h.shape != (n,) or (h >= p.shape[1]).any():
            raise ValueError(f"human must have shape ({n},) with classes below {p.shape[1]} or -1; received "
                             f"shape {h.shape}")
        known = h >= 0
        out[:, 3] = np.where(known, _outside_top_k(p, np.where(known, h, 0), 1), 0.0)
        out[:, 4] = known
    if challenger_probs is not None:
        q = np.asarray(challenger_probs, dtype=np.float64)
        if q.shape != p.shape:
            raise ValueError(f"challenger_probs must have the shape of probs {p.shape}; received {q.shape}")
        seen: Any = np.isfinite(q).all(axis=1)
        top = np.where(seen[:, None], q, 0.0).argmax(axis=1)
        out[:, 5] = np.where(seen, _outside_top_k(p, top, 1), 0.0)
        out[:, 6] = seen
    return np.clip(out, 0.0, 1.0)


def box_error_features(boxes: Boxes, human: Boxes | None = None, challenger: Boxes | None = None, *,
                       floor: float) -> F64:
    """A detector's ``boxes`` of n frames (every decoded box), the human's and the challenger's boxes of the same
    frames (None, or unknown frames, where there are none) and the operating threshold ``floor`` -> ``(n,
    len(BOX_FEATURES))`` in [0, 1] (see the module docstring)."""
    if not isinstance(boxes, Boxes):
        raise TypeError(f"boxes must be trigger.boxes.Boxes; received {type(boxes).__name__}")
    n = boxes.n
    for name, other in (("human", human), ("challenger", challenger)):
        if other is not None and (not isinstance(other, Boxes) or other.n != n):
            raise ValueError(f"{name} must be Boxes of the same {n} frames; received "
                             f"{type(other).__name__}{'' if not isinstance(other, Boxes) else f' of {other.n}'}")
    out = np.zeros((n, len(BOX_FEATURES)))
    reported = _select(boxes, boxes.scores >= floor)
    frame = reported.frame_index
    low = np.zeros(n)
    np.maximum.at(low, frame, 1.0 - reported.scores)
    out[:, 0] = low
    near = np.abs(boxes.scores - floor) <= NEAR_FLOOR_BAND
    out[:, 1] = _squash(np.bincount(boxes.frame_index[near], minlength=n))
    out[:, 2] = reported.counts / BOX_SCALE
    if reported.probs is not None and reported.m:
        out[:, 3] = np.bincount(frame, weights=_s._entropy(reported.probs, normalize=True), minlength=n) / BOX_SCALE
    for col, other, other_floor in ((4, human, 0.0), (6, challenger, floor)):
        if other is None:
            continue
        theirs = _select(other, other.scores >= other_floor)
        c = _bs._compare(reported, theirs, MATCH_IOU, 0.0, True)
        known = boxes.known_mask & other.known_mask
        out[:, col] = np.where(known, _squash(c.missed + c.extra + c.flips), 0.0)
        out[:, col + 1] = known
    if not boxes.known_mask.all():  # a frame the model gave no sound output for: nothing to read
        out[~boxes.known_mask] = 0.0
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def box_score_bins(boxes: Boxes, *, floor: float) -> F64:
    """A detector's ``boxes`` of n frames (every decoded box) and its operating threshold ``floor`` -> ``(n,
    len(SCORE_BINS))`` in [0, 1]: how many boxes score in each bin, each count entering as ``1 - 2**-c``.

    Under the floor (``under_25``, ``under_50``, ``under_75``: scores in [0.25, 0.5), [0.5, 0.75) and [0.75, 1) of
    the floor) only isolated boxes count: those overlapping no reported box of their frame at IoU
    :data:`ISOLATED_IOU` or more (a candidate for an object the model missed, not a duplicate of one it found).
    At or over it (``over_0`` ... ``over_80``): the reported boxes, by fifths of [floor, 1] (a box the model
    reports is the likelier a false one the lower it scores)."""
    if not isinstance(boxes, Boxes):
        raise TypeError(f"boxes must be trigger.boxes.Boxes; received {type(boxes).__name__}")
    f = _unit(floor, "floor")
    n = boxes.n
    s = boxes.scores
    reported = s >= f
    isolated = np.ones(boxes.m, bool)
    if (~reported).any() and reported.any():
        isolated[~reported] = _best_iou(_select(boxes, ~reported), _select(boxes, reported)) < ISOLATED_IOU
    edges = [0.25 * f, 0.5 * f, 0.75 * f, *(f + (1.0 - f) * q for q in (0.0, 0.2, 0.4, 0.6, 0.8)), np.inf]
    out = np.zeros((n, len(SCORE_BINS)))
    for col, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        keep = (s >= lo) & (s < hi) & (isolated | reported)
        out[:, col] = _squash(np.bincount(boxes.frame_index[keep], minlength=n))
    out[~boxes.known_mask] = 0.0
    return out


def box_hist_features(boxes: Boxes, human: Boxes | None = None, challenger: Boxes | None = None, *,
                      floor: float) -> F64:
    """:data:`BOX_HIST_FEATURES` of n frames: :func:`box_error_features` with their products (:func:`with_pairs`),
    then :func:`box_score_bins` -> ``(n, len(BOX_HIST_FEATURES))``."""
    return np.hstack([with_pairs(box_error_features(boxes, human, challenger, floor=floor)),
                      box_score_bins(boxes, floor=floor)])


def _squash(count: Any) -> F64:
    out: F64 = 1.0 - np.exp2(-np.asarray(count, dtype=np.float64))
    return out


def neighbour_features(probs: Any, neighbour_labels: Any) -> F64:
    """``probs (n, k)``, ``neighbour_labels (n, m)``: the labels of each frame's m nearest bank entries (-1 =
    unknown) -> ``(n,)`` in [0, 1]: the share of the known ones that are not the model's top class."""
    p = np.asarray(probs, dtype=np.float64)
    lab = np.asarray(neighbour_labels, dtype=np.int64)
    if p.ndim != 2 or lab.ndim != 2 or lab.shape[0] != p.shape[0]:
        raise ValueError(f"probs (n, k) and neighbour_labels (n, m) must agree on n; received {p.shape} and "
                         f"{lab.shape}")
    known = lab >= 0
    other = known & (lab != p.argmax(axis=1)[:, None])
    count = known.sum(axis=1)
    out: F64 = np.where(count > 0, other.sum(axis=1) / np.maximum(count, 1), 0.0)
    return out


def error_probability(features: Any, weights: Any, bias: float) -> F64:
    """``features (n, F)``, ``weights (F,)`` -> ``(n,)`` sigmoid(bias + features @ weights), computed stably."""
    x = np.asarray(features, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if x.ndim != 2 or w.shape != (x.shape[1],):
        raise ValueError(f"features (n, F) and weights (F,) must agree; received {x.shape} and {w.shape}")
    z = bias + x @ w
    out: F64 = np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
    return out


def with_pairs(features: Any) -> F64:
    """``features (n, F)`` -> ``(n, F + F (F - 1) / 2)``: the features, then the product of each pair ``i < j`` in
    that order (the order of :data:`BOX_PAIRS` for :data:`BOX_FEATURES`)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, F); received shape {x.shape}")
    i, j = np.triu_indices(x.shape[1], k=1)
    out: F64 = np.hstack([x, x[:, i] * x[:, j]])
    return out


def expected_count(features: Any, weights: Any, bias: float) -> F64:
    """``features (n, F)``, ``weights (F,)`` -> ``(n,)`` exp(bias + features @ weights): a Poisson model's expected
    count (the exponent clipped to [-50, 50], so that no weight overflows it)."""
    x = np.asarray(features, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if x.ndim != 2 or w.shape != (x.shape[1],):
        raise ValueError(f"features (n, F) and weights (F,) must agree; received {x.shape} and {w.shape}")
    out: F64 = np.exp(np.clip(bias + x @ w, -50.0, 50.0))
    return out
