"""The push throttle (pure): keep as much work queued as annotators get through in a horizon, no more."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet.errors import InvalidInput


@dataclass(frozen=True)
class Throttle:
    """Keep ``horizon_s`` seconds of annotator work queued, measured over the last ``window_s``."""

    horizon_s: float = 900.0
    window_s: float = 600.0
    min_depth: int = 20
    max_depth: int = 2000
    max_batch: int = 1000

    def __post_init__(self) -> None:
        if self.horizon_s <= 0 or self.window_s <= 0:
            raise InvalidInput(f"horizon_s and window_s must be positive; received {self.horizon_s}, {self.window_s}")
        if not 0 <= self.min_depth <= self.max_depth:
            raise InvalidInput(f"need 0 <= min_depth <= max_depth; received {self.min_depth}, {self.max_depth}")
        if self.max_batch < 1:
            raise InvalidInput(f"max_batch must be at least 1; received {self.max_batch}")


def throughput(times: np.ndarray[Any, Any], *, now: float, window_s: float) -> float:
    """Annotations per second over the last ``window_s`` seconds. times: (n,) unix seconds of completions."""
    t = np.asarray(times, dtype=np.float64)
    if window_s <= 0:
        raise InvalidInput(f"window_s must be positive; received {window_s}")
    return float(np.count_nonzero((t > now - window_s) & (t <= now))) / window_s


def target_depth(rate: float, *, horizon_s: float, min_depth: int, max_depth: int) -> int:
    """Queue depth (in annotations) that keeps ``horizon_s`` of work ahead of annotators finishing ``rate``/s."""
    if not math.isfinite(rate) or rate < 0:
        raise InvalidInput(f"rate must be a finite, non-negative number; received {rate!r}")
    return int(min(max(math.ceil(rate * horizon_s), min_depth), max_depth))


def push_budget(open_slots: int, target: int, *, expected_overlap: float = 1.0, max_batch: int = 1000) -> int:
    """How many tasks to add: the shortfall in annotations, divided by the annotations a task needs."""
    if expected_overlap < 1:
        raise InvalidInput(f"expected_overlap must be at least 1; received {expected_overlap}")
    shortfall = max(target - open_slots, 0)
    return int(min(math.floor(shortfall / expected_overlap), max_batch))
