"""Input checks shared by the trigger modules: shapes, dtypes and finiteness, with clear messages."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Bool = npt.NDArray[np.bool_]


def describe(value: Any) -> str:
    """A short description of what was received: shape and dtype for arrays, type otherwise."""
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r:.60}"


def as_float(value: Any, what: str, *, ndim: int, finite: bool = True, dtype: Any = np.float64) -> Any:
    """``value`` as a float array with exactly ``ndim`` dimensions (no copy when already right)."""
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array; received {describe(value)}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions; received {describe(arr)}")
    if finite and not np.isfinite(arr).all():
        raise ValueError(f"{what} must be finite; received {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def as_probs(value: Any, what: str = "probs", *, ndim: int = 2) -> F64:
    """``value`` as float64 probabilities whose last axis sums to 1 (tolerance 1e-3)."""
    arr: F64 = as_float(value, what, ndim=ndim)
    if arr.shape[-1] < 1:
        raise ValueError(f"{what} must have at least one class; received {describe(arr)}")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise ValueError(
            f"{what} must be probabilities in [0, 1]; received values in [{arr.min():.4g}, {arr.max():.4g}]"
        )
    sums = arr.sum(axis=-1)
    if sums.size and np.abs(sums - 1.0).max() > 1e-3:
        worst = float(sums.flat[int(np.abs(sums - 1.0).argmax())])
        raise ValueError(f"{what} must sum to 1 along the last axis (classes); received a row summing to {worst:.4g}")
    return arr


def as_labels(value: Any, what: str, *, n: int, allow_unknown: bool = True) -> I64:
    """``value`` as an int64 vector of length ``n``; -1 means unknown when ``allow_unknown``."""
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},); received {describe(arr)}")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.isfinite(arr).all() and np.array_equal(arr, np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{what} must be integer class indices; received {describe(arr)}")
    out = arr.astype(np.int64, copy=False)
    low = -1 if allow_unknown else 0
    if out.size and int(out.min()) < low:
        raise ValueError(f"{what} must be >= {low}; received {int(out.min())}")
    return out


def positive(value: Any, what: str) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number > 0; received {describe(value)}")
    v = float(value)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a finite number > 0; received {value!r}")
    return v


def positive_int(value: Any, what: str, *, minimum: int = 1) -> int:
    """An int >= ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer >= {minimum}; received {describe(value)}")
    if int(value) < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}; received {value!r}")
    return int(value)
