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

from trigger import scores as _s
from trigger._checks import F32, F64, I64
from trigger.disagreement import _challenger, _human

if TYPE_CHECKING:
    from trigger.novelty import NoveltyBank

__all__ = ["TRIGGERS", "Inputs", "Param", "TriggerDef"]


@dataclass
class Inputs:
    """One validated batch as the triggers see it; shared intermediate results are cached here."""

    logits: F64  # (n, k)
    probs: F64  # (n, k), at the spec's temperature
    embeddings: F32 | None = None  # (n, d)
    human: I64 | None = None  # (n,), -1 = unknown
    challenger_probs: F64 | None = None  # (n, k), NaN rows = no challenger output
    samples: F64 | None = None  # (m, n, k)
    bank: NoveltyBank | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.logits.shape[0])

    @property
    def k(self) -> int:
        return int(self.logits.shape[1])


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


def _rows(a: F64, rows: I64 | None) -> F64:
    return a if rows is None else a[rows]


def _cached(inputs: Inputs, key: str, make: Callable[[], F64]) -> F64:
    out: F64 | None = inputs.cache.get(key)
    if out is None:
        out = make()
        inputs.cache[key] = out
    return out


def _least_confidence(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    return _rows(_cached(i, "least_confidence", lambda: _s._least_confidence(i.probs)), rows)


def _margin(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    return _rows(_cached(i, "margin", lambda: _s._margin(i.probs)), rows)


def _entropy(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    h = _cached(i, "entropy", lambda: _s._entropy(i.probs))
    if p.get("normalize"):
        h = h / math.log(i.k) if i.k > 1 else np.zeros_like(h)
    return _rows(h, rows)


def _energy(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    t = float(p.get("temperature", 1.0))
    return _rows(_cached(i, f"energy@{t}", lambda: _s._energy(i.logits, t)), rows)


def _bald(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    assert i.samples is not None
    return _rows(_cached(i, "bald", lambda: _s._bald(i.samples)), rows)  # type: ignore[arg-type]


def _variation_ratio(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    assert i.samples is not None
    return _rows(_cached(i, "variation_ratio", lambda: _s._variation_ratio(i.samples)), rows)  # type: ignore[arg-type]


def _human_disagreement(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    if i.human is None:
        return np.full(i.n if rows is None else len(rows), np.nan)
    probs = i.probs if rows is None else i.probs[rows]
    human = i.human if rows is None else i.human[rows]
    return _human(probs, human, int(p.get("top_k", 1)), bool(p.get("weighted", False)))


def _challenger_disagreement(i: Inputs, rows: I64 | None, p: Mapping[str, Any]) -> F64:
    if i.challenger_probs is None:
        return np.full(i.n if rows is None else len(rows), np.nan)
    probs = i.probs if rows is None else i.probs[rows]
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


_TOP_K = Param("top_k", int, 1, low=1, doc="disagree only when the other class is outside the model's top k")
_WEIGHTED = Param("weighted", bool, False, doc="scale 0/1 disagreement by confidence (confident mistakes first)")


def _log_k(i: Inputs, p: Mapping[str, Any]) -> tuple[float, float]:
    return 0.0, math.log(i.k) if i.k > 1 else 0.0


def _members(i: Inputs) -> int:
    return 1 if i.samples is None else int(i.samples.shape[0])


TRIGGERS: dict[str, TriggerDef] = {
    t.name: t
    for t in (
        TriggerDef(
            "least_confidence", "1 - max probability: high when the top class is weak.", "above",
            _least_confidence, bounds=lambda i, p: (0.0, 1.0 - 1.0 / i.k),
        ),
        TriggerDef(
            "margin", "top-1 minus top-2 probability: SMALL when two classes compete (use 'below').", "below",
            _margin, bounds=lambda i, p: (0.0, 1.0),
        ),
        TriggerDef(
            "entropy", "Shannon entropy of the prediction in nats (0..log k, or 0..1 with normalize).", "above",
            _entropy, params=(Param("normalize", bool, False, doc="divide by log k so values are in [0, 1]"),),
            bounds=lambda i, p: (0.0, 1.0) if p.get("normalize") else _log_k(i, p),
        ),
        TriggerDef(
            "energy", "free energy -T logsumexp(logits/T): high = out of distribution (unbounded).", "above",
            _energy, params=(Param("temperature", float, 1.0, low=1e-6, doc="energy temperature T"),),
        ),
        TriggerDef(
            "bald", "mutual information across MC/ensemble samples (needs FrameBatch.samples).", "above",
            _bald, needs=("samples",), bounds=_log_k, weight=0.4,
        ),
        TriggerDef(
            "variation_ratio", "share of samples that vote against the modal class (needs samples).", "above",
            _variation_ratio, needs=("samples",), bounds=lambda i, p: (0.0, 1.0 - 1.0 / _members(i)), weight=0.4,
        ),
        TriggerDef(
            "human_disagreement", "the human's action is outside the model's top-k (NaN where unknown).", "above",
            _human_disagreement, params=(_TOP_K, _WEIGHTED), uses=("human",), default_threshold=0.0,
            bounds=lambda i, p: (0.0, 1.0), weight=0.8,
        ),
        TriggerDef(
            "challenger_disagreement", "the challenger's top class is outside the model's top-k.", "above",
            _challenger_disagreement, params=(_TOP_K, _WEIGHTED), uses=("challenger_logits",), default_threshold=0.0,
            bounds=lambda i, p: (0.0, 1.0), weight=0.5,
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
    )
}
