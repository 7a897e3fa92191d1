"""What goes into an evaluation and what comes out: :class:`FrameBatch` in, :class:`Decision` out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trigger import scores as _s
from trigger._checks import F64, I64, Bool
from trigger.triggers import Inputs

__all__ = ["BASE_SCORES", "Decision", "FrameBatch", "Scores"]

BASE_SCORES = ("entropy", "margin", "least_confidence", "energy")


@dataclass
class FrameBatch:
    """What the device knows about n frames. Only ``logits`` is required.

    ``logits: (n, k)``; ``embeddings: (n, d)`` (penultimate features, for novelty and dedup);
    ``human: (n,)`` int, the human's action as a class, -1 = unknown; ``challenger_logits: (n, k)``
    from a shadow challenger (rows of NaN = no output for that frame); ``tags``: one dict of
    string metadata per frame (condition, site...); ``images: (n, h, w[, c])`` uint8, hashed for
    near-duplicate checks only for frames that fire; ``samples: (m, n, k)`` MC-dropout/ensemble
    probabilities for BALD and variation ratio; ``hashes: (n,)`` uint64 precomputed dhashes.
    """

    logits: Any
    embeddings: Any = None
    human: Any = None
    challenger_logits: Any = None
    tags: Sequence[Mapping[str, str]] | None = None
    images: Any = None
    samples: Any = None
    hashes: Any = None

    def __len__(self) -> int:
        return int(np.shape(self.logits)[0])


@dataclass
class Decision:
    """Per frame: ``keep`` ``(n,)`` bool; ``priority`` ``(n,)`` in [0, 1] (0 = nothing fired; the
    spool evicts the lowest first); ``fired``: the labels of the triggers that made the frame
    qualify; ``values`` and ``thresholds``: label -> the value that fired and the threshold it
    passed; ``scores``: a read-only mapping, computed on first access, name -> ``(n,)``: the base
    scores entropy, margin, least_confidence and energy for every frame, and the spec's triggers by
    label (NaN for frames the filters dropped and where a costly trigger was not needed; a kept
    frame always has every value).
    ``predicted`` ``(n,)`` is the model's class; ``duplicate`` and ``over_budget`` ``(n,)`` mark
    frames that qualified but were suppressed. ``expired``: the spec was past its expiry and did
    nothing.
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

    The base scores (entropy in nats, margin, least_confidence, energy at T=1) cover every frame;
    the spec's triggers are listed by label (NaN where a costly trigger was not needed, never for
    a kept frame). Nothing is computed for a batch whose scores nobody reads.
    """

    def __init__(self, inputs: Inputs, values: Mapping[str, F64]) -> None:
        self._inputs = inputs
        self._values = dict(values)
        self._keys = list(BASE_SCORES) + [k for k in self._values if k not in BASE_SCORES]

    def __getitem__(self, key: str) -> F64:
        cache = self._inputs.cache
        if key in BASE_SCORES:
            cache_key = "energy@1.0" if key == "energy" else key
            out: F64 | None = cache.get(cache_key)
            if out is None:
                p = self._inputs.probs
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
    """The model's class per frame (cached on ``inputs``)."""
    out: I64 | None = inputs.cache.get("predicted")
    if out is None:
        out = inputs.probs.argmax(axis=1)
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
