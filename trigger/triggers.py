"""The trigger registry: every trigger a spec can name, with its parameters, direction and inputs.

Triggers are looked up by name (baal's heuristic registry); :data:`TRIGGERS` maps each name to a
:class:`TriggerDef`. A trigger turns a batch into one value per frame (``(n,)`` float64, NaN where
it cannot say); a spec leaf then fires on a fixed threshold or a calibrated target rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trigger import box_scores as _bs
from trigger import learned as _learned
from trigger import scores as _s
from trigger._checks import F32, F64, I64
from trigger.boxes import Boxes
from trigger.disagreement import _challenger, _human

if TYPE_CHECKING:
    from trigger.novelty import NoveltyBank

__all__ = ["TRIGGERS", "Inputs", "Param", "TriggerDef"]


@dataclass
class Inputs:
    """One validated batch as the triggers see it; shared intermediate results are cached here.

    A classifier's batch has ``logits`` and ``probs``; a detector's has ``boxes`` instead (and no logits), with
    the optional challenger's and human's boxes and, for video, ``previous``: each frame's predecessor in its
    stream (an unknown frame where there is none) and ``gap``, the seconds between them (NaN: unknown).
    """

    logits: F64 | None = None  # (n, k)
    probs: F64 | None = None  # (n, k), at the spec's temperature
    embeddings: F32 | None = None  # (n, d)
    human: I64 | None = None  # (n,), -1 = unknown
    challenger_probs: F64 | None = None  # (n, k), NaN rows = no challenger output
    samples: F64 | None = None  # (m, n, k)
    bank: NoveltyBank | None = None
    boxes: Boxes | None = None  # n frames
    challenger_boxes: Boxes | None = None
    human_boxes: Boxes | None = None
    previous: Boxes | None = None
    gap: F64 | None = None  # (n,)
    operating_threshold: float = 0.5  # the detector's DetectorSpec.operating_threshold
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return "classify" if self.logits is not None else "detect"

    @property
    def n(self) -> int:
        if self.logits is not None:
            return int(self.logits.shape[0])
        assert self.boxes is not None
        return self.boxes.n

    @property
    def k(self) -> int:
        if self.logits is not None:
            return int(self.logits.shape[1])
        return (self.boxes.k if self.boxes is not None else None) or 0


@dataclass(frozen=True)
class Param:
    """A trigger parameter a spec leaf may set."""

    name: str
    kind: type  # int, float or bool
    default: Any
    low: float | None = None
    high: float | None = None
    optional: bool = False  # None is allowed (and is the default when ``default`` is None)
    doc: str = ""


# compute(inputs, rows, params) -> values for ``rows`` (all frames when rows is None)
Compute = Callable[[Inputs, "I64 | None", Mapping[str, Any]], F64]


@dataclass(frozen=True)
class TriggerDef:
    """What a trigger needs and how to read its value."""

    name: str
    doc: str
    direction: str  # the interesting side: "above" (high = worth a human) or "below"
    compute: Compute
    params: tuple[Param, ...] = ()
    needs: tuple[str, ...] = ()  # FrameBatch fields without which the trigger cannot run
    uses: tuple[str, ...] = ()  # optional FrameBatch fields it reads (NaN where absent)
    default_threshold: float | None = None  # used when a leaf gives no above/below/target_rate
    weight: float = 0.35  # priority weight in [0, 1]
    bounds: Callable[[Inputs, Mapping[str, Any]], tuple[float, float]] = lambda i, p: (-math.inf, math.inf)
    costly: bool = False  # computed only for frames that still need it
    stateful: bool = False  # consumes state per frame (evaluated on every frame that passes filters)
    task: str | None = None  # "classify" (reads logits), "detect" (reads boxes) or None (either)


def _rows(a: F64, rows: I64 | None) -> F64:
    return a if rows is None else a[rows]


def _cached(inputs: Inputs, key: str, make: Callable[[], F64]) -> F64:
    out: F64 | None = inputs.cache.get(key)
    if out is None:
        out = make()
        inputs.cache[key] = out
    return out


def _probs(i: Inputs) -> F64:
    assert i.probs is not None  # a classifier trigger runs on a classifier's batch (checked when it is read)
    return i.probs


def _least_confidence(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    return _rows(_cached(i, "least_confidence", lambda: _s._least_confidence(_probs(i))), rows)


def _margin(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    return _rows(_cached(i, "margin", lambda: _s._margin(_probs(i))), rows)


def _entropy(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    h = _cached(i, "entropy", lambda: _s._entropy(_probs(i)))
    if p.get("normalize"):
        h = h / math.log(i.k) if i.k > 1 else np.zeros_like(h)
    return _rows(h, rows)


def _energy(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    t = float(p.get("temperature", 1.0))
    assert i.logits is not None
    logits = i.logits
    return _rows(_cached(i, f"energy@{t}", lambda: _s._energy(logits, t)), rows)


def _bald(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    assert i.samples is not None
    return _rows(_cached(i, "bald", lambda: _s._bald(i.samples)), rows)  # type: ignore[arg-type]


def _variation_ratio(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    assert i.samples is not None
    return _rows(_cached(i, "variation_ratio", lambda: _s._variation_ratio(i.samples)), rows)  # type: ignore[arg-type]


def _human_disagreement(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    if i.human is None:
        return np.full(i.n if rows is None else len(rows), np.nan)
    probs = _rows(_probs(i), rows)
    human = i.human if rows is None else i.human[rows]
    return _human(probs, human, int(p.get("top_k", 1)), bool(p.get("weighted", False)))


def _challenger_disagreement(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    if i.challenger_probs is None:
        return np.full(i.n if rows is None else len(rows), np.nan)
    probs = _rows(_probs(i), rows)
    q = i.challenger_probs if rows is None else i.challenger_probs[rows]
    known = np.isfinite(q).all(axis=1)
    return _challenger(probs, q, known, int(p.get("top_k", 1)), bool(p.get("weighted", False)))


def _novelty(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    assert i.embeddings is not None and i.bank is not None
    q = i.embeddings if rows is None else i.embeddings[rows]
    n_probe = p.get("n_probe")
    probe = i.bank.default_probe() if n_probe is None else min(int(n_probe), max(i.bank.n_lists, 1))
    return i.bank._distance(q, int(p.get("k", 5)), probe, bool(p.get("exact", False)))


def _random(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    rng: np.random.Generator = p["_rng"]  # the evaluator hands each random leaf its own generator
    return rng.random(i.n if rows is None else len(rows))


def _learned_features(i: Inputs, rows: I64 | None) -> tuple[F64, F64]:
    """The rows' probabilities and their :func:`trigger.learned.error_features`."""
    probs = _rows(_probs(i), rows)
    human = None if i.human is None else _rows(i.human, rows)  # type: ignore[arg-type]
    ch = None if i.challenger_probs is None else _rows(i.challenger_probs, rows)
    return probs, _learned.error_features(probs, human, ch)


def _logistic(x: F64, p: Mapping[str, Any], features: tuple[str, ...]) -> F64:
    weights = [float(p.get(f"w_{f}", 0.0)) for f in features]
    return _learned.error_probability(x, weights, float(p.get("bias", 0.0)))


def _learned_error(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    return _logistic(_learned_features(i, rows)[1], p, _learned.FEATURES)


def _learned_error_knn(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    assert i.embeddings is not None and i.bank is not None
    probs, x = _learned_features(i, rows)
    _, idx = i.bank.search(i.embeddings if rows is None else i.embeddings[rows], k=int(p.get("k", 10)),
                           exact=bool(p.get("exact", False)))
    x = np.column_stack([x, _learned.neighbour_features(probs, i.bank.labels[idx])])
    return _logistic(x, p, _learned.BANK_FEATURES)


def _weights(features: tuple[str, ...], model: str = "logistic") -> tuple[Param, ...]:
    return (*(Param(f"w_{f}", float, 0.0, low=-100.0, high=100.0, doc=f"weight of feature {f}") for f in features),
            Param("bias", float, 0.0, low=-100.0, high=100.0, doc=f"the {model} model's intercept"))


_LEARNED_PARAMS = _weights(_learned.FEATURES)
_LEARNED_KNN_PARAMS = (*_weights(_learned.BANK_FEATURES),
                       Param("k", int, 10, low=1, high=1000, doc="nearest bank entries whose labels are read"),
                       Param("exact", bool, False, doc="scan the whole bank"))

_TOP_K = Param("top_k", int, 1, low=1, doc="disagree only when the other class is outside the model's top k")
_WEIGHTED = Param("weighted", bool, False, doc="scale 0/1 disagreement by confidence (confident mistakes first)")


def _log_k(i: Inputs, p: Mapping[str, Any]) -> tuple[float, float]:
    return 0.0, math.log(i.k) if i.k > 1 else 0.0


def _members(i: Inputs) -> int:
    return 1 if i.samples is None else int(i.samples.shape[0])

# -- detectors: per-box triggers (trigger.box_scores) ------------------------------------------------------------


def _box_floor(i: Inputs, p: Mapping[str, Any], default: float | None = None) -> float:
    f = p.get("floor")
    if f is not None:
        return float(f)
    return i.operating_threshold if default is None else default


def _model_boxes(i: Inputs) -> Boxes:
    assert i.boxes is not None  # a detector trigger runs on a detector's batch (checked when it is read)
    return i.boxes


def _box_uncertainty(measure: str, reduce: str) -> Compute:
    def compute(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
        floor, norm = _box_floor(i, p), bool(p.get("normalize", False))
        b = _model_boxes(i)
        per_box = _cached(i, f"per-box:{measure}:{norm}", lambda: _bs._per_box(b, measure, norm))
        return _rows(_cached(i, f"box:{measure}:{reduce}:{floor}:{norm}",
                             lambda: _bs._uncertainty(b, measure, reduce, floor, norm, per_box)), rows)
    return compute


def _box_ambiguous(share: bool) -> Compute:
    def compute(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
        t = p.get("threshold")
        t = i.operating_threshold if t is None else float(t)
        band = float(p.get("band", 0.1))
        floor = _box_floor(i, p, max(t - band, 0.0))
        return _rows(_cached(i, f"ambiguous:{share}:{t}:{band}:{floor}",
                             lambda: _bs._ambiguous(_model_boxes(i), t - band, t + band, floor, share)), rows)
    return compute


def _box_compare(other: str) -> Compute:
    def compute(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
        theirs: Boxes | None = getattr(i, other)
        if theirs is None:
            return np.full(i.n if rows is None else len(rows), np.nan)
        iou, floor, classes = float(p.get("iou", 0.5)), _box_floor(i, p), bool(p.get("classes", True))
        if p.get("count"):  # how many boxes differ; NaN where unknown
            def differing() -> F64:
                c = _bs._compare(_model_boxes(i), theirs, iou, floor, classes)
                return np.where(np.isnan(c.score), np.nan, (c.missed + c.extra + c.flips).astype(np.float64))
            return _rows(_cached(i, f"{other}:{iou}:{floor}:{classes}:count", differing), rows)
        return _rows(_cached(i, f"{other}:{iou}:{floor}:{classes}",
                             lambda: _bs._compare(_model_boxes(i), theirs, iou, floor, classes).score), rows)
    return compute


def _box_error_features(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    """The rows' :func:`trigger.learned.box_error_features` at the leaf's floor, computed once per batch."""
    floor = _box_floor(i, p)
    x = _cached(i, f"learned-box:{floor}", lambda: _learned.box_error_features(
        _model_boxes(i), i.human_boxes, i.challenger_boxes, floor=floor))
    return _rows(x, rows)


def _learned_box_error(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    return _logistic(_box_error_features(i, rows, p), p, _learned.BOX_FEATURES)


def _poisson(x: F64, p: Mapping[str, Any], features: tuple[str, ...]) -> F64:
    weights = [float(p.get(f"w_{f}", 0.0)) for f in features]
    return _learned.expected_count(x, weights, float(p.get("bias", 0.0)))


def _learned_box_error_count(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    return _poisson(_learned.with_pairs(_box_error_features(i, rows, p)), p, _learned.BOX_COUNT_FEATURES)


def _learned_box_error_hist(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    """The box features with their products (shared with the other box leaves' cache), then the score bins."""
    floor = _box_floor(i, p)
    bins = _rows(_cached(i, f"box-bins:{floor}", lambda: _learned.box_score_bins(_model_boxes(i), floor=floor)), rows)
    return _poisson(np.hstack([_learned.with_pairs(_box_error_features(i, rows, p)), bins]), p,
                    _learned.BOX_HIST_FEATURES)


def _previous(i: Inputs, p: Mapping[str, Any]) -> Boxes | None:
    if i.previous is None or i.gap is None:
        return None
    gap = p.get("max_gap")
    return _bs._limit_gap(i.previous, i.gap, None if gap is None else float(gap))


def _box_flicker(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    prev = _previous(i, p)
    if prev is None:
        return np.full(i.n if rows is None else len(rows), np.nan)
    iou, floor, classes = float(p.get("iou", 0.5)), _box_floor(i, p), bool(p.get("classes", True))
    return _rows(_cached(i, f"flicker:{iou}:{floor}:{classes}:{p.get('max_gap')}",
                         lambda: _bs._compare(_model_boxes(i), prev, iou, floor, classes).score), rows)


def _box_instability(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    prev = _previous(i, p)
    if prev is None:
        return np.full(i.n if rows is None else len(rows), np.nan)
    floor = _box_floor(i, p)
    return _rows(_cached(i, f"instability:{floor}:{p.get('max_gap')}",
                         lambda: _bs._instability(_model_boxes(i), prev, floor)), rows)


_FLOOR = Param("floor", float, None, low=0.0, high=1.0, optional=True,
               doc="leave out boxes scoring under this (default: the detector's operating threshold)")
_IOU = Param("iou", float, 0.5, low=0.01, high=1.0, doc="IoU at which two boxes are the same object")
_CLASSES = Param("classes", bool, True, doc="a box matched with a box of another class counts as an error")
_MAX_GAP = Param("max_gap", float, None, low=1e-6, optional=True,
                 doc="seconds: a previous frame older than this is no predecessor (needs FrameBatch.timestamps)")
_MEASURES = {
    "entropy": ("the entropy of each box's class distribution (nats; 0..1 with normalize)", True),
    "margin": ("1 - (top-1 - top-2) of each box's class distribution (high when two classes compete)", False),
    "least_confidence": ("1 - the top class probability of each box (0..1 with normalize)", True),
    "low_score": ("1 - each box's score (Lightly's objectness least confidence with 'mean')", False),
}
_REDUCE = {"max": "the largest of", "mean": "the mean of", "sum": "the sum (grows with the box count) of"}


def _uncertainty_bounds(measure: str, reduce: str) -> Callable[[Inputs, Mapping[str, Any]], tuple[float, float]]:
    def bounds(i: Inputs, p: Mapping[str, Any]) -> tuple[float, float]:
        if reduce == "sum":
            return 0.0, math.inf
        if measure == "entropy" and not p.get("normalize"):
            return _log_k(i, p)
        if measure == "least_confidence" and not p.get("normalize") and i.k > 0:
            return 0.0, 1.0 - 1.0 / i.k
        return 0.0, 1.0
    return bounds


def _box_uncertainty_defs() -> list[TriggerDef]:
    out = []
    for measure, (what, normalizable) in _MEASURES.items():
        for reduce, how in _REDUCE.items():
            params = (_FLOOR, Param("normalize", bool, False, doc="scale to [0, 1]")) if normalizable else (_FLOOR,)
            out.append(TriggerDef(
                f"box_{measure}_{reduce}", f"{how} {what}, over boxes scoring >= floor (0 for a frame without one).",
                "above", _box_uncertainty(measure, reduce), params=params,
                needs=("boxes",) if measure == "low_score" else ("boxes", "box_probs"),
                bounds=_uncertainty_bounds(measure, reduce), task="detect",
            ))
    return out


def _box_defs() -> list[TriggerDef]:
    band = (
        Param("threshold", float, None, low=0.0, high=1.0, optional=True,
              doc="the band's centre (default: the detector's operating threshold)"),
        Param("band", float, 0.1, low=0.0, high=0.5, doc="half-width of the band of ambiguous scores"),
        Param("floor", float, None, low=0.0, high=1.0, optional=True,
              doc="share of the boxes scoring at least this (default: the band's lower edge)"),
    )
    compare = (_IOU, _FLOOR, _CLASSES)
    count = Param("count", bool, False, doc="score how many boxes differ (missed + extra + class flips) instead of "
                  "1 - F1: frames rank by how many errors they hold (bench_error_capture_detect.py)")

    def compare_bounds(i: Inputs, p: Mapping[str, Any]) -> tuple[float, float]:
        return (0.0, math.inf) if p.get("count") else (0.0, 1.0)
    return [
        *_box_uncertainty_defs(),
        TriggerDef("box_ambiguous_share", "share of the boxes whose score is within band of the operating threshold.",
                   "above", _box_ambiguous(True), params=band, needs=("boxes",), bounds=lambda i, p: (0.0, 1.0),
                   task="detect"),
        TriggerDef("box_ambiguous_count", "how many boxes score within band of the operating threshold.", "above",
                   _box_ambiguous(False), params=band, needs=("boxes",), bounds=lambda i, p: (0.0, math.inf),
                   task="detect"),
        TriggerDef("box_human_disagreement", "1 - F1 of the model's boxes against the human's (NaN where unknown; "
                   "with count, how many boxes differ).", "above", _box_compare("human_boxes"),
                   params=(*compare, count), needs=("boxes",), uses=("human_boxes",), default_threshold=0.0,
                   bounds=compare_bounds, weight=0.8, task="detect"),
        TriggerDef("box_challenger_disagreement", "1 - F1 of the model's boxes against the challenger's (with count, "
                   "how many boxes differ).", "above", _box_compare("challenger_boxes"), params=(*compare, count),
                   needs=("boxes",), uses=("challenger_boxes",), default_threshold=0.0, bounds=compare_bounds,
                   weight=0.5, task="detect"),
        TriggerDef("learned_box_error", "the chance the detector misses or misplaces a box on the frame, by the "
                   "hub's logistic model over the box scores (trigger.learned.BOX_FEATURES; weights w_<feature> and "
                   "bias set by the hub; floor: the operating threshold they were fitted at).", "above",
                   _learned_box_error, params=(*_weights(_learned.BOX_FEATURES), _FLOOR), needs=("boxes",),
                   uses=("human_boxes", "challenger_boxes"), bounds=lambda i, p: (0.0, 1.0), weight=0.6,
                   task="detect"),
        TriggerDef("learned_box_error_count", "the expected number of boxes the detector misses or misplaces on the "
                   "frame, by the hub's Poisson model over the box scores and their products two by two "
                   "(trigger.learned.BOX_COUNT_FEATURES; weights w_<feature> and bias set by the hub; floor: the "
                   "operating threshold they were fitted at).", "above", _learned_box_error_count,
                   params=(*_weights(_learned.BOX_COUNT_FEATURES, "Poisson"), _FLOOR), needs=("boxes",),
                   uses=("human_boxes", "challenger_boxes"), bounds=lambda i, p: (0.0, math.inf), weight=0.6,
                   task="detect"),
        TriggerDef("learned_box_error_hist", "the expected number of boxes the detector misses or misplaces on the "
                   "frame, by the hub's Poisson model over the box scores, their products two by two and how many "
                   "boxes score in each bin around the operating threshold (trigger.learned.BOX_HIST_FEATURES; "
                   "weights w_<feature> and bias set by the hub; floor: the operating threshold they were fitted "
                   "at).", "above", _learned_box_error_hist,
                   params=(*_weights(_learned.BOX_HIST_FEATURES, "Poisson"), _FLOOR), needs=("boxes",),
                   uses=("human_boxes", "challenger_boxes"), bounds=lambda i, p: (0.0, math.inf), weight=0.6,
                   task="detect"),
        TriggerDef("box_flicker", "1 - F1 against the previous frame of the stream: boxes that appear, vanish, "
                   "jump or change class (NaN without one).", "above", _box_flicker, params=(*compare, _MAX_GAP),
                   needs=("boxes",), uses=("stream", "timestamps"), bounds=lambda i, p: (0.0, 1.0), weight=0.5,
                   task="detect"),
        TriggerDef("box_instability", "1 - score-weighted localization stability (Kao et al. 2018) against the "
                   "previous frame of the stream.", "above", _box_instability, params=(_FLOOR, _MAX_GAP),
                   needs=("boxes",), uses=("stream", "timestamps"), bounds=lambda i, p: (0.0, 1.0), weight=0.4,
                   task="detect"),
    ]


TRIGGERS: dict[str, TriggerDef] = {
    t.name: t
    for t in (
        TriggerDef(
            "least_confidence", "1 - max probability: high when the top class is weak.", "above",
            _least_confidence, bounds=lambda i, p: (0.0, 1.0 - 1.0 / i.k), task="classify",
        ),
        TriggerDef(
            "margin", "top-1 minus top-2 probability: SMALL when two classes compete (use 'below').", "below",
            _margin, bounds=lambda i, p: (0.0, 1.0), task="classify",
        ),
        TriggerDef(
            "entropy", "Shannon entropy of the prediction in nats (0..log k, or 0..1 with normalize).", "above",
            _entropy, params=(Param("normalize", bool, False, doc="divide by log k so values are in [0, 1]"),),
            bounds=lambda i, p: (0.0, 1.0) if p.get("normalize") else _log_k(i, p), task="classify",
        ),
        TriggerDef(
            "energy", "free energy -T logsumexp(logits/T): high = out of distribution (unbounded).", "above",
            _energy, params=(Param("temperature", float, 1.0, low=1e-6, doc="energy temperature T"),), task="classify",
        ),
        TriggerDef(
            "bald", "mutual information across MC/ensemble samples (needs FrameBatch.samples).", "above",
            _bald, needs=("samples",), bounds=_log_k, weight=0.4, task="classify",
        ),
        TriggerDef(
            "variation_ratio", "share of samples that vote against the modal class (needs samples).", "above",
            _variation_ratio, needs=("samples",), bounds=lambda i, p: (0.0, 1.0 - 1.0 / _members(i)), weight=0.4,
            task="classify",
        ),
        TriggerDef(
            "human_disagreement", "the human's action is outside the model's top-k (NaN where unknown).", "above",
            _human_disagreement, params=(_TOP_K, _WEIGHTED), uses=("human",), default_threshold=0.0,
            bounds=lambda i, p: (0.0, 1.0), weight=0.8, task="classify",
        ),
        TriggerDef(
            "challenger_disagreement", "the challenger's top class is outside the model's top-k.", "above",
            _challenger_disagreement, params=(_TOP_K, _WEIGHTED), uses=("challenger_logits",), default_threshold=0.0,
            bounds=lambda i, p: (0.0, 1.0), weight=0.5, task="classify",
        ),
        TriggerDef(
            "learned_error", "the chance the model is wrong, by the hub's logistic model over the scores "
            "(trigger.learned; weights w_<feature> and bias set by the hub).", "above", _learned_error,
            params=_LEARNED_PARAMS, uses=("human", "challenger_logits"), bounds=lambda i, p: (0.0, 1.0), weight=0.6,
            task="classify",
        ),
        TriggerDef(
            "learned_error_knn", "learned_error with one more feature from the model's own novelty bank: the "
            "share of the k nearest training frames labeled another class than the model's (trigger.learned).",
            "above", _learned_error_knn, params=_LEARNED_KNN_PARAMS, needs=("embeddings", "bank"),
            uses=("human", "challenger_logits"), bounds=lambda i, p: (0.0, 1.0), weight=0.6, task="classify",
            costly=True,
        ),
        TriggerDef(
            "novelty", "mean cosine distance to the k nearest novelty-bank entries (needs embeddings).", "above",
            _novelty,
            params=(
                Param("k", int, 5, low=1, high=1000, doc="neighbours averaged"),
                Param("n_probe", int, None, low=1, optional=True, doc="index lists scanned (default: the bank's)"),
                Param("exact", bool, False, doc="scan the whole bank"),
            ),
            needs=("embeddings", "bank"), bounds=lambda i, p: (0.0, 1.0), weight=0.5, costly=True,
        ),
        TriggerDef(
            "random", "a uniform draw in [0, 1): 'below': 0.01 keeps an unbiased 1% sample.", "below",
            _random, params=(Param("seed", int, 0, low=0, doc="seed of this leaf's generator"),),
            bounds=lambda i, p: (0.0, 1.0), weight=0.1, stateful=True,
        ),
        *_box_defs(),
    )
}
