"""What goes into an evaluation and what comes out: :class:`FrameBatch` in, :class:`Decision` out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trigger import scores as _s
from trigger._checks import F64, I64, Bool
from trigger.boxes import Boxes
from trigger.triggers import TRIGGERS, Inputs

__all__ = ["BASE_SCORES", "BOX_BASE_SCORES", "Decision", "FrameBatch", "Scores"]

BASE_SCORES = ("entropy", "margin", "least_confidence", "energy")
# a detector's batch: the box triggers of these names at their default parameters (the first three need
# each box's class distribution and are left out without it)
BOX_BASE_SCORES = ("box_entropy_max", "box_margin_max", "box_least_confidence_max", "box_low_score_mean")


@dataclass
class FrameBatch:
    """What the device knows about n frames: a classifier's ``logits`` or a detector's ``boxes``.

    Classifier: ``logits: (n, k)``; ``human: (n,)`` int, the human's action as a class, -1 = unknown;
    ``challenger_logits: (n, k)`` from a shadow challenger (rows of NaN = no output for that frame);
    ``samples: (m, n, k)`` MC-dropout/ensemble probabilities for BALD and variation ratio.

    Detector (no logits): ``boxes``: :class:`trigger.boxes.Boxes` of n frames with their scores, classes and
    class distributions (``trigger.nms.decode_dense`` makes them); ``challenger_boxes`` and ``human_boxes``
    (Boxes of n frames; a frame marked unknown in ``Boxes.known`` has no answer, unlike an empty one);
    ``stream: (n,)`` ints or strings naming each frame's video stream, frames of a stream in capture order
    (flicker compares each frame with the one before it); ``timestamps: (n,)`` capture times in seconds;
    ``operating_threshold``: the score at which the detector reports a box (its manifest's
    ``DetectorSpec.operating_threshold``, default 0.5), which the box triggers' defaults are relative to.

    Either: ``embeddings: (n, d)`` (penultimate features, for novelty and dedup); ``tags``: one dict of
    string metadata per frame (condition, site...); ``images: (n, h, w[, c])`` uint8, hashed for
    near-duplicate checks only for frames that fire; ``hashes: (n,)`` uint64 precomputed dhashes.
    """

    logits: Any = None
    embeddings: Any = None
    human: Any = None
    challenger_logits: Any = None
    tags: Sequence[Mapping[str, str]] | None = None
    images: Any = None
    samples: Any = None
    hashes: Any = None
    boxes: Boxes | None = None
    challenger_boxes: Boxes | None = None
    human_boxes: Boxes | None = None
    stream: Any = None
    timestamps: Any = None
    operating_threshold: float | None = None

    @property
    def task(self) -> str:
        """``"detect"`` for a detector's batch (boxes, no logits), else ``"classify"``."""
        return "detect" if self.logits is None and self.boxes is not None else "classify"

    def __len__(self) -> int:
        if self.logits is None and isinstance(self.boxes, Boxes):
            return self.boxes.n
        return int(np.shape(self.logits)[0])


@dataclass
class Decision:
    """Per frame: ``keep`` ``(n,)`` bool; ``priority`` ``(n,)`` in [0, 1] (0 = nothing fired; the
    spool evicts the lowest first); ``fired``: the labels of the triggers that made the frame
    qualify; ``values`` and ``thresholds``: label -> the value that fired and the threshold it
    passed; ``scores``: a read-only mapping, computed on first access, name -> ``(n,)``: the base
    scores for every frame (:class:`Scores`), and the spec's triggers by label (NaN for frames the
    filters dropped and where a costly trigger was not needed; a kept frame always has every value).
    ``predicted`` ``(n,)`` is the model's class (a detector's: its best box's, -1 without a box);
    ``duplicate`` and ``over_budget`` ``(n,)`` mark frames that qualified but were suppressed.
    ``expired``: the spec was past its expiry and did nothing.
    """

    keep: Bool
    priority: F64
    fired: list[list[str]]
    values: list[dict[str, float]]
    thresholds: list[dict[str, float]] = field(default_factory=list)
    scores: Mapping[str, F64] = field(default_factory=dict)
    predicted: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    duplicate: Bool = field(default_factory=lambda: np.zeros(0, bool))
    over_budget: Bool = field(default_factory=lambda: np.zeros(0, bool))
    expired: bool = False

    def __len__(self) -> int:
        return int(self.keep.shape[0])

    @property
    def qualified(self) -> Bool:
        """Frames the rule fired on, kept or not."""
        return self.priority > 0


class Scores(Mapping[str, F64]):
    """``Decision.scores``: name -> ``(n,)`` values, computed on first access.

    The base scores cover every frame: for a classifier, entropy in nats, margin, least_confidence and
    energy at T=1 (:data:`BASE_SCORES`); for a detector, :data:`BOX_BASE_SCORES` at their default parameters.
    The spec's triggers are listed by label (NaN where a costly trigger was not needed, never for a kept
    frame). Nothing is computed for a batch whose scores nobody reads.
    """

    def __init__(self, inputs: Inputs, values: Mapping[str, F64]) -> None:
        self._inputs = inputs
        self._values = dict(values)
        if inputs.task == "classify":
            self._base: tuple[str, ...] = BASE_SCORES
        else:
            probs = inputs.boxes is not None and (inputs.boxes.probs is not None or inputs.boxes.m == 0)
            self._base = BOX_BASE_SCORES if probs else BOX_BASE_SCORES[3:]
        self._keys = list(self._base) + [k for k in self._values if k not in self._base]

    def __getitem__(self, key: str) -> F64:
        if key in self._base and self._inputs.task == "detect":
            tdef = TRIGGERS[key]
            return tdef.compute(self._inputs, None, {p.name: p.default for p in tdef.params if p.default is not None})
        if key in self._base:
            cache = self._inputs.cache
            cache_key = "energy@1.0" if key == "energy" else key
            out: F64 | None = cache.get(cache_key)
            if out is None:
                p = self._inputs.probs
                assert p is not None and self._inputs.logits is not None
                if key == "entropy":
                    out = _s._entropy(p)
                elif key == "margin":
                    out = _s._margin(p)
                elif key == "least_confidence":
                    out = _s._least_confidence(p)
                else:
                    out = _s._energy(self._inputs.logits)
                cache[cache_key] = out
            return out
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Scores({', '.join(self._keys)})"


def predicted(inputs: Inputs) -> I64:
    """The model's class per frame (cached on ``inputs``): a classifier's top class; for a detector, the class
    of the frame's best-scoring box, -1 for a frame without one."""
    out: I64 | None = inputs.cache.get("predicted")
    if out is None:
        if inputs.probs is not None:
            out = inputs.probs.argmax(axis=1)
        else:
            assert inputs.boxes is not None
            out = _top_box_label(inputs.boxes)
        inputs.cache["predicted"] = out
    return out


def empty_decision(inputs: Inputs, values: Mapping[str, F64] | None = None, *, expired: bool = False) -> Decision:
    """A decision that keeps nothing (nothing fired, or the campaign is over)."""
    n = inputs.n
    return Decision(
        keep=np.zeros(n, bool), priority=np.zeros(n), fired=[[] for _ in range(n)], values=[{} for _ in range(n)],
        thresholds=[{} for _ in range(n)], scores=Scores(inputs, values or {}),
        predicted=predicted(inputs), duplicate=np.zeros(n, bool), over_budget=np.zeros(n, bool), expired=expired,
    )


def _top_box_label(b: Boxes) -> I64:
    out = np.full(b.n, -1, np.int64)
    if b.m:
        order = np.argsort(b.frame_index * 2.0 - b.scores, kind="stable")  # by frame, best first
        has = b.counts > 0
        out[has] = b.labels[order[b.offsets[:-1][has]]]
    return out
