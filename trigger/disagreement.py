"""Disagreement scores: the model against the human on the same frame, or against a challenger.

When the human's action is known (shadow mode: the driver braked, the operator re-sorted the
part), disagreement with it is the strongest error signal a device has. A challenger model run in
shadow beside the active one gives a weaker, always-available signal.

Both scores return ``(n,)`` float64 in ``[0, 1]`` and NaN where the other side is unknown.
``top_k``: the model only disagrees when the other side's class is outside its ``top_k`` classes.
``weighted``: scale the 0/1 disagreement by confidence, so confident mistakes rank first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trigger._checks import F64, I64, as_float, as_labels, as_probs, describe, positive_int

__all__ = ["challenger_disagreement", "human_disagreement"]


def human_disagreement(probs: Any, human: Any, *, top_k: int = 1, weighted: bool = False) -> F64:
    """Does the human's action fall outside the model's top-k classes?

    ``probs: (n, k)``; ``human: (n,)`` int class indices, ``-1`` = unknown -> ``(n,)``:
    1.0 when the human's class is not among the model's ``top_k`` (ties count as agreement), else
    0.0; NaN where ``human == -1``. ``weighted=True`` multiplies by the model's top-1 probability:
    a confident model that the human overrules scores near 1, a hesitant one near ``1/k``.
    """
    p = as_probs(probs)
    h = as_labels(human, "human", n=p.shape[0])
    top_k = positive_int(top_k, "top_k")
    if h.size and h.max() >= p.shape[1]:
        raise ValueError(f"human must be class indices below k={p.shape[1]}; received {int(h.max())}")
    return _human(p, h, top_k, weighted)


def challenger_disagreement(probs: Any, challenger_probs: Any, *, top_k: int = 1, weighted: bool = False) -> F64:
    """Does the challenger's top-1 class fall outside the model's top-k classes?

    ``probs: (n, k)``, ``challenger_probs: (n, k)`` -> ``(n,)``: 1.0 or 0.0, NaN for rows of
    ``challenger_probs`` that hold NaN (no challenger output for that frame). ``weighted=True``
    multiplies by the mean of both models' top-1 probabilities: two confident models that
    contradict each other score near 1.
    """
    p = as_probs(probs)
    q = as_float(challenger_probs, "challenger_probs", ndim=2, finite=False)
    if q.shape != p.shape:
        raise ValueError(f"challenger_probs must have the shape of probs {p.shape}; received {describe(q)}")
    known = np.isfinite(q).all(axis=1)
    as_probs(q[known], "challenger_probs")
    return _challenger(p, q, known, positive_int(top_k, "top_k"), weighted)


# ---------------------------------------------------------------------------------------------
# unchecked kernels
# ---------------------------------------------------------------------------------------------


def _outside_top_k(p: F64, cls: I64, top_k: int) -> F64:
    """1.0 where class ``cls[i]`` ranks at or below ``top_k`` in ``p[i]`` (strictly more probable
    classes >= top_k), else 0.0. ``cls`` must be valid indices."""
    pc = p[np.arange(p.shape[0]), cls]
    rank = (p > pc[:, None]).sum(axis=1)
    out: F64 = (rank >= top_k).astype(np.float64)
    return out


def _human(p: F64, h: I64, top_k: int, weighted: bool) -> F64:
    known = h >= 0
    out = _outside_top_k(p, np.where(known, h, 0), top_k)
    if weighted:
        out *= p.max(axis=1)
    out[~known] = np.nan
    return out


def _challenger(p: F64, q: F64, known: Any, top_k: int, weighted: bool) -> F64:
    qq = np.where(known[:, None], q, 0.0)
    out = _outside_top_k(p, qq.argmax(axis=1), top_k)
    if weighted:
        out *= 0.5 * (p.max(axis=1) + qq.max(axis=1))
    out[~known] = np.nan
    return out
