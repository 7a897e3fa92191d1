"""Streaming rate calibration: a threshold that keeps a score firing on a target fraction of frames.

"Upload 2% of frames" should be a setting, not a guess at an entropy value that is right for one
model, one camera and one season. :class:`RateCalibrator` keeps the last ``window`` values of a
score and, every ``refresh`` frames, sets the threshold to the quantile that the target rate asks
for, corrected by how far the firing rate over the window has drifted from the target (an
integral correction, so a score that drifts steadily does not fire steadily too often or too
rarely). Decisions are made frame by frame with the threshold as it stood before that frame, and
refreshes happen at fixed frame counts, so feeding a stream in one batch or one frame at a time
gives exactly the same decisions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trigger._checks import F64, Bool, as_float, positive_int

__all__ = ["RateCalibrator"]

REFRESH_DIV = 32  # the threshold is re-estimated every window // 32 frames
KP = 1.0
KI = 3.0


class RateCalibrator:
    """Fires on about ``target_rate`` of the frames with a finite value, on a drifting stream.

    ``direction="above"`` fires on high values (entropy, novelty), ``"below"`` on low ones
    (margin). ``window``: how many recent values the threshold is estimated from (default
    ``max(2000, 50 / target_rate)``, so the window holds about 50 firings or more). ``refresh``:
    frames between re-estimates (default
    ``window // 32``, at least 8). ``warmup``: values needed before the first estimate (default
    ``min(window, max(32, 4 / target_rate))``); until then the calibrator fires on
    ``initial_threshold``, or not at all when it is None. NaN values never fire and are not counted.
    """

    def __init__(
        self,
        target_rate: float,
        *,
        window: int | None = None,
        refresh: int | None = None,
        warmup: int | None = None,
        initial_threshold: float | None = None,
        direction: str = "above",
    ) -> None:
        numeric = isinstance(target_rate, (int, float)) and not isinstance(target_rate, bool)
        rate = float(target_rate) if numeric else -1.0
        if not 0.0 < rate < 1.0:
            raise ValueError(f"target_rate must be a fraction in (0, 1); received {target_rate!r}")
        if direction not in ("above", "below"):
            raise ValueError(f"direction must be 'above' or 'below'; received {direction!r}")
        self.target_rate = rate
        self.direction = direction
        self.window = (
            positive_int(window, "window", minimum=8) if window is not None else max(2000, math.ceil(50.0 / rate))
        )
        self.refresh = positive_int(refresh, "refresh") if refresh is not None else max(8, self.window // REFRESH_DIV)
        default_warmup = min(self.window, max(32, math.ceil(4.0 / rate)))
        self.warmup = min(self.window, positive_int(warmup, "warmup")) if warmup is not None else default_warmup
        if initial_threshold is not None and not math.isfinite(float(initial_threshold)):
            raise ValueError(f"initial_threshold must be finite or None; received {initial_threshold!r}")
        self.initial_threshold = None if initial_threshold is None else float(initial_threshold)
        self._values = np.zeros(self.window, np.float64)
        self._fired = np.zeros(self.window, np.bool_)
        self._judged = np.zeros(self.window, np.bool_)  # decided by a data-driven threshold
        self._integral = 0.0
        self._filled = 0
        self._pos = 0
        self._since = 0
        self._seen = 0
        self._threshold = self._cold_threshold()
        self._extreme = self._threshold

    # -- public ---------------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        """The current threshold (``+inf``/``-inf`` while warming up without an initial one)."""
        return self._threshold

    @property
    def extreme(self) -> float:
        """The most extreme value in the window at the last refresh (max for ``above``, min for
        ``below``): how far past the threshold a value can usefully be. Used to scale priority."""
        return self._extreme

    @property
    def seen(self) -> int:
        """Finite values seen since creation."""
        return self._seen

    @property
    def warm(self) -> bool:
        """Whether the threshold comes from data yet."""
        return self._seen >= self.warmup

    def firing_rate(self) -> float:
        """Fraction of the calibrated values in the window that fired (NaN when there are none)."""
        judged = self._judged[: self._filled]
        count = int(np.count_nonzero(judged))
        return float(np.count_nonzero(self._fired[: self._filled] & judged)) / count if count else math.nan

    def update(self, values: Any) -> Bool:
        """Decide and learn. ``values: (n,)`` in stream order -> ``(n,)`` bool: fired."""
        v = as_float(values, "values", ndim=1, finite=False)
        return self._update(v)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (values in stream order); restore with :meth:`load_state_dict`."""
        order = self._chronological()
        return {
            "target_rate": self.target_rate,
            "direction": self.direction,
            "values": [float(x) for x in self._values[order]],
            "fired": [bool(x) for x in self._fired[order]],
            "judged": [bool(x) for x in self._judged[order]],
            "since_refresh": self._since,
            "integral": self._integral,
            "seen": self._seen,
            "threshold": _encode(self._threshold),
            "extreme": _encode(self._extreme),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; values beyond this calibrator's window are dropped (oldest first).

        A state saved under another ``target_rate`` or ``direction`` keeps its history but its
        threshold is re-estimated at once for this calibrator's settings.
        """
        try:
            values = np.array([float(x) for x in state["values"]], dtype=np.float64)
            fired = np.array([bool(x) for x in state["fired"]], dtype=np.bool_)
            judged = np.array([bool(x) for x in state["judged"]], dtype=np.bool_)
            since = int(state["since_refresh"])
            seen = int(state["seen"])
            integral = float(state["integral"])
            threshold = _decode(state["threshold"])
            extreme = _decode(state["extreme"])
            same = state["target_rate"] == self.target_rate and state["direction"] == self.direction
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a RateCalibrator state: {exc!r}") from exc
        consistent = values.shape == fired.shape == judged.shape and seen >= len(values)
        if not consistent or not np.isfinite(values).all():
            raise ValueError("not a RateCalibrator state: lengths differ, values not finite or 'seen' too small")
        values, fired, judged = values[-self.window :], fired[-self.window :], judged[-self.window :]
        self._filled = len(values)
        self._values[: self._filled] = values
        self._fired[: self._filled] = fired
        self._judged[: self._filled] = judged
        self._pos = self._filled % self.window
        self._seen = seen
        self._since = max(0, since)
        self._integral = min(max(integral, -1.4), 1.4) if math.isfinite(integral) else 0.0
        if same:
            self._threshold = threshold if threshold is not None else self._cold_threshold()
            self._extreme = extreme if extreme is not None else self._threshold
        elif self.warm:
            self._recompute()
        else:
            self._threshold = self._extreme = self._cold_threshold()

    # -- internals ------------------------------------------------------------------------------

    def _update(self, v: F64, used: F64 | None = None) -> Bool:
        """Unchecked :meth:`update`; writes the threshold each value was compared with into ``used``."""
        if v.shape[0] == 1 and self._seen >= self.warmup and self._since + 1 < self.refresh:
            return self._update_one(v, used)  # the per-frame streaming case, without array overhead
        fired = np.zeros(v.shape[0], np.bool_)
        finite = np.isfinite(v)
        all_finite = bool(finite.all())
        idx = None if all_finite else np.flatnonzero(finite)
        vals = v if all_finite else v[idx]
        out = fired if all_finite else np.zeros(vals.shape[0], np.bool_)
        thr = None if used is None else (used if all_finite else np.empty(vals.shape[0]))
        if used is not None and not all_finite:
            used[:] = self._threshold
        i, total = 0, vals.shape[0]
        while i < total:
            if self._seen < self.warmup:
                step = min(total - i, self.warmup - self._seen)
            else:
                step = min(total - i, self.refresh - self._since)
            seg = vals[i : i + step]
            hit = seg > self._threshold if self.direction == "above" else seg < self._threshold
            out[i : i + step] = hit
            if thr is not None:
                thr[i : i + step] = self._threshold
            was_warm = self._seen >= self.warmup
            self._push(seg, hit, was_warm)
            i += step
            self._seen += step
            if not was_warm:
                if self._seen >= self.warmup:
                    self._recompute()
            else:
                self._since += step
                if self._since >= self.refresh:
                    self._recompute()
        if not all_finite:
            fired[idx] = out
            if used is not None and thr is not None:
                used[idx] = thr
        return fired

    def _update_one(self, v: F64, used: F64 | None) -> Bool:
        x = float(v[0])
        if used is not None:
            used[0] = self._threshold
        if not math.isfinite(x):
            return np.zeros(1, np.bool_)
        hit = x > self._threshold if self.direction == "above" else x < self._threshold
        pos = self._pos
        self._values[pos] = x
        self._fired[pos] = hit
        self._judged[pos] = True
        self._pos = (pos + 1) % self.window
        if self._filled < self.window:
            self._filled += 1
        self._seen += 1
        self._since += 1
        return np.array([hit])

    def _push(self, seg: F64, hit: Bool, judged: bool) -> None:
        n, w = seg.shape[0], self.window
        if n >= w:
            self._values[:] = seg[-w:]
            self._fired[:] = hit[-w:]
            self._judged[:] = judged
            self._pos, self._filled = 0, w
            return
        end = self._pos + n
        if end <= w:
            self._values[self._pos : end] = seg
            self._fired[self._pos : end] = hit
            self._judged[self._pos : end] = judged
        else:
            cut = w - self._pos
            self._values[self._pos :] = seg[:cut]
            self._fired[self._pos :] = hit[:cut]
            self._judged[self._pos :] = judged
            self._values[: n - cut] = seg[cut:]
            self._fired[: n - cut] = hit[cut:]
            self._judged[: n - cut] = judged
        self._pos = end % w
        self._filled = min(w, self._filled + n)

    def _recompute(self) -> None:
        self._since = 0
        window = self._values[: self._filled]
        t = self.target_rate
        judged = int(np.count_nonzero(self._judged[: self._filled]))
        rate = t
        if judged * t >= 4.0:  # enough decided frames for the realised rate to mean something
            realised = float(np.count_nonzero(self._fired[: self._filled] & self._judged[: self._filled])) / judged
            # PI correction on the log of the rate: ask for more where the window fired too little
            error = (t - realised) / t
            self._integral = min(max(self._integral + KI * error * self.refresh / self.window, -1.4), 1.4)
            rate = min(max(t * math.exp(self._integral + KP * error), 0.25 * t), min(1.0, 4.0 * t))
        n = window.shape[0]
        pos = (1.0 - rate if self.direction == "above" else rate) * (n - 1)  # numpy's "linear" quantile
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        edge = n - 1 if self.direction == "above" else 0
        part = np.partition(window, sorted({lo, hi, edge}))
        self._threshold = float(part[lo] + (part[hi] - part[lo]) * (pos - lo))
        self._extreme = float(part[edge])

    def _cold_threshold(self) -> float:
        if self.initial_threshold is not None:
            return self.initial_threshold
        return math.inf if self.direction == "above" else -math.inf

    def _chronological(self) -> Any:
        if self._filled < self.window:
            return np.arange(self._filled)
        return (np.arange(self.window) + self._pos) % self.window


def _encode(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _decode(x: Any) -> float | None:
    return None if x is None else float(x)
