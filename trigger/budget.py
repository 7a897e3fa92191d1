"""Upload budgets: token buckets per trigger, per predicted class and for the whole campaign.

A device must never flood its uplink or the labeling queue, however interesting the stream gets.
A frame that several triggers want counts once: it takes one token from the global bucket, one
from its class's bucket, and one from a single trigger's bucket (none when one of its triggers
has no bucket of its own; otherwise the bucket with the most tokens left).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trigger._checks import describe

__all__ = ["Budget", "TokenBucket"]

Clock = Callable[[], float]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; each admitted frame takes one.

    Over any span of ``t`` seconds it admits at most ``burst + rate_per_s * t`` frames.
    ``rate_per_s = 0`` makes a lifetime cap of ``burst`` frames. The bucket starts full. A clock
    that goes backwards (a restored state from another clock) refills nothing rather than failing.
    """

    def __init__(self, rate_per_s: float, burst: float, *, clock: Clock = time.monotonic) -> None:
        rate = _number(rate_per_s, "rate_per_s")
        if rate < 0:
            raise ValueError(f"rate_per_s must be >= 0; received {rate_per_s!r}")
        size = _number(burst, "burst")
        if size < 1:
            raise ValueError(f"burst must be >= 1 (a bucket must hold at least one frame); received {burst!r}")
        self.rate_per_s = rate
        self.burst = size
        self._clock = clock
        self._tokens = size
        self._updated: float | None = None

    def __repr__(self) -> str:
        return f"TokenBucket(rate_per_s={self.rate_per_s}, burst={self.burst}, tokens={self._tokens:.3g})"

    def available(self, now: float | None = None) -> float:
        """Tokens in the bucket at ``now`` (default: the clock)."""
        self._refill(self._clock() if now is None else now)
        return self._tokens

    def try_take(self, n: float = 1.0, *, now: float | None = None) -> bool:
        """Take ``n`` tokens if the bucket holds them; return whether it did."""
        if self.available(now) >= n:
            self._tokens -= n
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: tokens left and the clock reading they were counted at."""
        return {"tokens": self._tokens, "updated": self._updated}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (tokens capped at this bucket's burst)."""
        try:
            tokens = float(state["tokens"])
            updated = None if state["updated"] is None else float(state["updated"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a TokenBucket state: {exc!r}") from exc
        if not math.isfinite(tokens) or (updated is not None and not math.isfinite(updated)):
            raise ValueError(f"not a TokenBucket state: non-finite tokens or time in {dict(state)!r:.80}")
        self._tokens = min(max(tokens, 0.0), self.burst)
        self._updated = updated

    def _refill(self, now: float) -> None:
        if self._updated is not None and now > self._updated:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_s)
        if self._updated is None or now > self._updated:
            self._updated = now


class Budget:
    """The campaign's budgets together; :meth:`try_acquire` admits a frame or refuses it, atomically.

    ``global_bucket`` caps every frame; ``per_trigger`` maps trigger labels to buckets;
    ``per_class`` maps predicted classes to buckets (quotas). Buckets not given do not limit.
    """

    def __init__(
        self,
        *,
        global_bucket: TokenBucket | None = None,
        per_trigger: Mapping[str, TokenBucket] | None = None,
        per_class: Mapping[int, TokenBucket] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.global_bucket = global_bucket
        self.per_trigger: dict[str, TokenBucket] = dict(per_trigger or {})
        self.per_class: dict[int, TokenBucket] = dict(per_class or {})
        self._clock = clock
        self.admitted = 0
        self.refused = 0
        self.charged: dict[str, int] = {}
        self.last_trigger: str | None = None

    def try_acquire(self, triggers: Sequence[str], cls: int | None = None, *, now: float | None = None) -> bool:
        """Admit one frame wanted by ``triggers`` (labels) and predicted as ``cls``, or refuse it.

        Admitted: one token from the global bucket, from ``cls``'s bucket, and from at most one
        trigger's bucket (recorded in :attr:`last_trigger`; None when a trigger without a bucket
        wanted the frame). Refused: nothing is taken.
        """
        if not triggers:
            raise ValueError("try_acquire needs the labels of the triggers that want the frame; received none")
        t = self._clock() if now is None else now
        self.last_trigger = None
        if self.global_bucket is not None and self.global_bucket.available(t) < 1.0:
            return self._refuse()
        class_bucket = self.per_class.get(cls) if cls is not None else None
        if class_bucket is not None and class_bucket.available(t) < 1.0:
            return self._refuse()
        charge: str | None = None
        if all(name in self.per_trigger for name in triggers):
            best = max(triggers, key=lambda name: self.per_trigger[name].available(t))
            if self.per_trigger[best].available(t) < 1.0:
                return self._refuse()
            charge = best
        for bucket in (
            self.global_bucket,
            class_bucket,
            self.per_trigger[charge] if charge is not None else None,
        ):
            if bucket is not None:
                taken = bucket.try_take(1.0, now=t)
                assert taken, "a bucket checked above ran dry before it was charged"
        self.admitted += 1
        if charge is not None:
            self.charged[charge] = self.charged.get(charge, 0) + 1
        self.last_trigger = charge
        return True

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state of every bucket and the counters."""
        return {
            "global": None if self.global_bucket is None else self.global_bucket.state_dict(),
            "per_trigger": {name: b.state_dict() for name, b in self.per_trigger.items()},
            "per_class": {str(c): b.state_dict() for c, b in self.per_class.items()},
            "admitted": self.admitted,
            "refused": self.refused,
            "charged": dict(self.charged),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore buckets that exist in both this budget and ``state``; others keep their state."""
        if not isinstance(state, Mapping):
            raise ValueError(f"not a Budget state: expected an object; received {describe(state)}")
        if self.global_bucket is not None and state.get("global") is not None:
            self.global_bucket.load_state_dict(state["global"])
        for name, sub in dict(state.get("per_trigger") or {}).items():
            if name in self.per_trigger:
                self.per_trigger[name].load_state_dict(sub)
        for key, sub in dict(state.get("per_class") or {}).items():
            try:
                cls = int(key)
            except ValueError as exc:
                raise ValueError(f"not a Budget state: per_class key {key!r} is not an integer") from exc
            if cls in self.per_class:
                self.per_class[cls].load_state_dict(sub)
        self.admitted = int(state.get("admitted", self.admitted))
        self.refused = int(state.get("refused", self.refused))
        self.charged = {str(k): int(v) for k, v in dict(state.get("charged") or {}).items()}

    def _refuse(self) -> bool:
        self.refused += 1
        return False


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number; received {describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite; received {value!r}")
    return v
