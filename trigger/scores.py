"""Uncertainty scores: pure, vectorised functions of a batch of predictions (numpy in, numpy out).

Conventions: ``logits`` and ``probs`` are ``(n, k)`` (n frames, k classes); ``samples`` are
``(m, n, k)`` probabilities from m stochastic passes (MC dropout) or ensemble members for the
same n frames. Every score returns ``(n,)`` float64. Higher means "more worth a human" for every
score except :func:`margin`, where SMALL means uncertain (it is the usual definition, so specs say
``"below"`` for it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trigger._checks import F64, as_float, as_probs, positive

__all__ = ["bald", "energy", "entropy", "least_confidence", "margin", "softmax", "variation_ratio"]

_TINY = 1e-300
_NONFINITE = ("nan", "raise")


def softmax(logits: Any, *, temperature: float = 1.0, nonfinite: str = "raise") -> F64:
    """Class probabilities from logits. ``logits: (n, k)`` -> ``(n, k)`` float64 rows summing to 1.

    ``temperature`` > 1 flattens the distribution, < 1 sharpens it. ``nonfinite``: rows holding
    NaN or inf are refused with ``"raise"``; with ``"nan"`` they come out as rows of NaN (a model
    that gave no usable output for that frame, as a shadow challenger may).
    """
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, _NONFINITE))}; received {nonfinite!r}")
    x = _logits(logits, finite=nonfinite == "raise")
    t = positive(temperature, "temperature")
    return _softmax(x, t) if nonfinite == "raise" else _softmax_or_nan(x, t)


def least_confidence(probs: Any, *, normalize: bool = False) -> F64:
    """``1 - max_c p_c``. ``probs: (n, k)`` -> ``(n,)`` in ``[0, 1 - 1/k]``; high = uncertain.

    ``normalize=True`` divides by ``1 - 1/k`` so values are in ``[0, 1]``: 1 for a uniform
    prediction, 0 for a one-hot one (and 0 when k = 1).
    """
    return _least_confidence(as_probs(probs), normalize=normalize)


def margin(probs: Any) -> F64:
    """``p(top1) - p(top2)``. ``probs: (n, k)`` -> ``(n,)`` in ``[0, 1]``; SMALL = uncertain.

    With a single class the margin is 1 (nothing to confuse it with).
    """
    return _margin(as_probs(probs))


def entropy(probs: Any, *, normalize: bool = False) -> F64:
    """Shannon entropy in nats, ``-sum_c p_c log p_c``. ``probs: (n, k)`` -> ``(n,)``.

    In ``[0, log k]``, or ``[0, 1]`` with ``normalize=True`` (divided by ``log k``; 0 when k = 1).
    """
    return _entropy(as_probs(probs), normalize=normalize)


def energy(logits: Any, *, temperature: float = 1.0) -> F64:
    """Free energy ``-T * logsumexp(logits / T)``. ``logits: (n, k)`` -> ``(n,)``.

    HIGH energy = low total evidence = likely out of distribution (Liu et al., 2020). Unbounded,
    in the units of the logits, so specs usually calibrate it with ``target_rate``.
    """
    x = _logits(logits)
    return _energy(x, positive(temperature, "temperature"))


def bald(samples: Any) -> F64:
    """Mutual information between prediction and model (BALD, Houlsby et al., 2011).

    ``samples: (m, n, k)`` probabilities from m MC-dropout passes or ensemble members ->
    ``(n,)`` in ``[0, log k]`` nats: ``H(mean_m p) - mean_m H(p)``. Zero when every member agrees,
    whatever their own uncertainty; high when confident members contradict each other.
    """
    return _bald(_samples(samples))


def variation_ratio(samples: Any) -> F64:
    """``1 - (votes for the modal class) / m`` over the members' top-1 classes.

    ``samples: (m, n, k)`` -> ``(n,)`` in ``[0, 1 - 1/m]``; 0 when all members vote alike.
    """
    return _variation_ratio(_samples(samples))


def _logits(logits: Any, *, finite: bool = True) -> F64:
    x: F64 = as_float(logits, "logits", ndim=2, finite=finite)
    if x.shape[1] < 1:
        raise ValueError(f"logits must have at least one class (shape (n, k), k >= 1); received shape {x.shape}")
    return x


def _samples(samples: Any) -> F64:
    s = as_probs(samples, "samples", ndim=3)
    if s.shape[0] < 1:
        raise ValueError(f"samples must hold at least one member (shape (m, n, k), m >= 1); received {s.shape}")
    return s


# ---------------------------------------------------------------------------------------------
# unchecked kernels (the evaluator calls these on inputs it has already validated)
# ---------------------------------------------------------------------------------------------


def _softmax(x: F64, temperature: float = 1.0) -> F64:
    z = x / temperature if temperature != 1.0 else x - 0.0
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _softmax_or_nan(x: F64, temperature: float = 1.0) -> F64:
    """:func:`_softmax` of the rows of ``x`` that are all finite; the other rows come out NaN."""
    known = np.isfinite(x).all(axis=-1)
    if known.all():
        return _softmax(x, temperature)
    out: F64 = np.full(x.shape, np.nan)
    out[known] = _softmax(x[known], temperature)
    return out


def _least_confidence(p: F64, *, normalize: bool = False) -> F64:
    out: F64 = 1.0 - p.max(axis=-1)
    np.maximum(out, 0.0, out=out)
    if normalize:
        k = p.shape[-1]
        if k < 2:
            return np.zeros_like(out)
        out /= 1.0 - 1.0 / k
        np.minimum(out, 1.0, out=out)
    return out


def _margin(p: F64) -> F64:
    k = p.shape[-1]
    if k == 1:
        return np.ones(p.shape[:-1])
    top = np.partition(p, k - 2, axis=-1)
    out: F64 = top[..., -1] - top[..., -2]
    return out


def _entropy(p: F64, *, normalize: bool = False) -> F64:
    h: F64 = -(p * np.log(np.maximum(p, _TINY))).sum(axis=-1)
    np.maximum(h, 0.0, out=h)
    if normalize:
        k = p.shape[-1]
        if k < 2:
            return np.zeros_like(h)
        h /= np.log(k)
    return h


def _energy(x: F64, temperature: float = 1.0) -> F64:
    z = x / temperature
    top = z.max(axis=-1)
    lse = top + np.log(np.exp(z - top[..., None]).sum(axis=-1))
    out: F64 = -temperature * lse
    return out


def _bald(s: F64) -> F64:
    mean = s.mean(axis=0)
    out: F64 = _entropy(mean) - _entropy(s).mean(axis=0)
    return np.maximum(out, 0.0, out=out)


def _variation_ratio(s: F64) -> F64:
    m, n, k = s.shape
    votes = s.argmax(axis=-1)  # (m, n)
    flat = (votes + np.arange(n)[None, :] * k).ravel()
    counts = np.bincount(flat, minlength=n * k).reshape(n, k)
    out: F64 = 1.0 - counts.max(axis=1) / m
    return out
