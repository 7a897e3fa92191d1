"""Admitting the frames a rule fired on: a priority each, then near-duplicate checks and budgets, best first."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trigger._checks import F64, I64, U64, Bool
from trigger.budget import Budget, TokenBucket
from trigger.calibrate import RateCalibrator
from trigger.dedup import NearDuplicateFilter, dhash
from trigger.frames import predicted
from trigger.spec_types import BudgetSpec, Leaf
from trigger.triggers import Inputs

MIN_PRIORITY = 1e-6  # the priority of a frame that qualified through weight-0 triggers only


def priority(
    leaves: Sequence[Leaf], reported: Mapping[str, Bool], values: Mapping[str, F64],
    thresholds: Mapping[str, F64 | float], calibrators: Mapping[str, RateCalibrator], inputs: Inputs,
) -> F64:
    """``(n,)`` in [0, 1]: each leaf that fired on a frame (``reported``: label -> ``(n,)`` mask)
    adds ``weight * (0.5 + 0.5 * strength)`` as an independent chance, where strength is how far
    past its threshold the value is. 0 where nothing fired, at least :data:`MIN_PRIORITY` where
    something did. ``values``/``thresholds``: label -> ``(n,)`` (a threshold may be one float)."""
    n = inputs.n
    keep_prob = np.ones(n)
    any_fired = False
    for leaf in leaves:
        mask = reported.get(leaf.label)
        if mask is None or not mask.any():
            continue
        any_fired = True
        rows = np.flatnonzero(mask)
        v = values[leaf.label][rows]
        thr = thresholds[leaf.label]
        strength = _strength(leaf, v, thr[rows] if isinstance(thr, np.ndarray) else thr, inputs,
                             calibrators.get(leaf.label))
        keep_prob[rows] *= 1.0 - leaf.weight * (0.5 + 0.5 * strength)
    if not any_fired:
        return np.zeros(n)
    out: F64 = 1.0 - keep_prob
    np.clip(out, 0.0, 1.0, out=out)
    # a frame that qualified ranks above every frame that did not, even through weight-0 triggers
    qualified = np.zeros(n, bool)
    for mask in reported.values():
        qualified |= mask
    out[qualified] = np.maximum(out[qualified], MIN_PRIORITY)
    return out


def admit(
    candidates: I64, priority: F64, fired: list[list[str]], inputs: Inputs, extra: Mapping[str, Any], now: float,
    *, dedup: NearDuplicateFilter | None, budget: Budget | None,
) -> tuple[Bool, Bool, Bool]:
    """Walk ``candidates`` from the highest priority down; a frame is kept unless it nearly
    duplicates a frame kept before (here or in an earlier batch) or its budgets are spent.

    ``extra``: the batch's ``images`` and ``hashes`` (hashed only for the candidates). Returns
    ``(keep, duplicate, over_budget)``, each ``(n,)`` bool; kept frames join the dedup memory.
    """
    n = inputs.n
    keep = np.zeros(n, bool)
    duplicate = np.zeros(n, bool)
    over = np.zeros(n, bool)
    order = candidates[np.argsort(-priority[candidates], kind="stable")]
    hashes: U64 | None = None
    if dedup is not None and dedup.max_hamming is not None:
        if extra["hashes"] is not None:
            hashes = np.asarray(extra["hashes"]).astype(np.uint64)
        elif extra["images"] is not None:
            hashes = np.zeros(n, np.uint64)
            hashes[order] = dhash(np.asarray(extra["images"])[order], size=dedup.hash_size)
    classes = predicted(inputs)
    for i in order.tolist():
        h = None if hashes is None else hashes[i : i + 1]
        e = None
        if dedup is not None and dedup.embedding_threshold is not None and inputs.embeddings is not None:
            e = inputs.embeddings[i : i + 1]
        if dedup is not None and dedup.is_duplicate(hashes=h, embeddings=e)[0]:
            duplicate[i] = True
            continue
        if budget is not None and not budget.try_acquire(fired[i], int(classes[i]), now=now):
            over[i] = True
            continue
        keep[i] = True
        if dedup is not None:
            dedup.add(hashes=h, embeddings=e)
    return keep, duplicate, over


def make_budget(spec: BudgetSpec, clock: Callable[[], float]) -> Budget:
    """The token buckets a spec's ``budgets`` describe, on ``clock``."""

    def bucket(rate: float, burst: float) -> TokenBucket:
        return TokenBucket(rate, burst, clock=clock)

    glob = spec.global_bucket
    return Budget(
        global_bucket=None if glob is None else bucket(glob.rate_per_s, glob.burst),
        per_trigger={k: bucket(v.rate_per_s, v.burst) for k, v in spec.per_trigger.items()},
        per_class={k: bucket(v.rate_per_s, v.burst) for k, v in spec.per_class.items()},
        clock=clock,
    )


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _strength(leaf: Leaf, v: F64, thr: F64 | float, inputs: Inputs, cal: RateCalibrator | None) -> F64:
    """How far past its threshold each value is, in [0, 1]; an unbounded side is measured against
    the most extreme value the leaf's calibrator has seen."""
    lo, hi = leaf.definition.bounds(inputs, leaf.params)
    if leaf.direction == "above":
        excess, edge = v - thr, hi
        if not math.isfinite(edge) and cal is not None:
            edge = cal.extreme
        span = edge - thr
    else:
        excess, edge = thr - v, lo
        if not math.isfinite(edge) and cal is not None:
            edge = cal.extreme
        span = thr - edge
    excess = np.maximum(excess, 0.0)
    ok = np.isfinite(span) & (span > 0)
    if ok.all():
        out: F64 = np.minimum(excess / span, 1.0)
        return out
    out = np.where(ok, np.minimum(excess / np.where(ok, span, 1.0), 1.0), 1.0 - np.exp(-excess))
    return out
