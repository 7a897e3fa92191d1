"""Retry pacing for the uplink: the shared retry policy's backoff, and a bytes-per-minute budget.

Both are small, clock-injected and deterministic under a seeded ``random.Random``, so the tests can
check the bounds exactly. The waits are :class:`fleet.retry.RetryPolicy`'s, the same as every client's;
the uplink steps through them itself because it interleaves waits with a stop event and a byte budget.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable

from fleet.errors import InvalidInput
from fleet.retry import RetryPolicy


class Backoff:
    """Exponential backoff with full jitter, counting consecutive failures (see :class:`fleet.retry.RetryPolicy`).

    The n-th consecutive failure waits ``uniform(0, min(cap_s, base_s * 2**n))`` seconds, so a fleet
    that lost the hub together does not come back together, and at least the ``Retry-After`` the hub
    asked for. ``reset()`` after a success.
    """

    def __init__(self, *, base_s: float = 0.5, cap_s: float = 60.0, rng: random.Random | None = None) -> None:
        if not base_s > 0:
            raise InvalidInput(f"backoff base must be > 0 seconds; received {base_s!r}")
        if not cap_s >= base_s:
            raise InvalidInput(f"backoff cap must be >= base ({base_s}); received {cap_s!r}")
        self.policy = RetryPolicy(base_s=float(base_s), cap_s=float(cap_s), rng=rng or random.Random())
        self.failures = 0

    @property
    def base_s(self) -> float:
        return self.policy.base_s

    @property
    def cap_s(self) -> float:
        return self.policy.cap_s

    def ceiling(self) -> float:
        """The upper bound of the next jittered delay: ``min(cap, base * 2**failures)``."""
        return self.policy.ceiling(self.failures)

    def next_delay(self, *, retry_after: float | None = None) -> float:
        """Record one more failure and return the delay to wait before the next try."""
        delay = self.policy.delay(self.failures, retry_after=retry_after)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class ByteBudget:
    """At most ``bytes_per_minute`` bytes in any 60-second window (a sliding log of recent sends).

    A payload larger than the whole budget may still go, alone, once the window is empty, so one
    oversized case cannot block the queue forever. ``bytes_per_minute=0`` means no limit.
    """

    WINDOW_S = 60.0

    def __init__(self, bytes_per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(bytes_per_minute, bool) or not isinstance(bytes_per_minute, int) or bytes_per_minute < 0:
            raise InvalidInput(f"bytes_per_minute must be an integer >= 0; received {bytes_per_minute!r}")
        self.limit = bytes_per_minute
        self._clock = clock
        self._sent: deque[tuple[float, int]] = deque()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        return self.limit == 0

    def used(self) -> int:
        """Bytes sent in the last 60 seconds."""
        with self._lock:
            self._prune(self._clock())
            return self._used

    def wait_time(self, nbytes: int) -> float:
        """Seconds until ``nbytes`` may be sent (0 if now)."""
        if self.unlimited:
            return 0.0
        with self._lock:
            now = self._clock()
            self._prune(now)
            if not self._sent or self._used + nbytes <= self.limit:
                return 0.0
            left = self._used
            for t, b in self._sent:
                left -= b
                if left + nbytes <= self.limit or left == 0:
                    return max(0.0, t + self.WINDOW_S - now)
            return 0.0  # pragma: no cover - the loop always returns once the log empties

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more may be sent now without going over the limit (no oversized exception)."""
        if self.unlimited:
            return True
        with self._lock:
            self._prune(self._clock())
            return self._used + nbytes <= self.limit

    def consume(self, nbytes: int) -> None:
        """Record ``nbytes`` as sent now."""
        if self.unlimited:
            return
        with self._lock:
            now = self._clock()
            self._prune(now)
            self._sent.append((now, nbytes))
            self._used += nbytes

    def _prune(self, now: float) -> None:
        while self._sent and self._sent[0][0] <= now - self.WINDOW_S:
            self._used -= self._sent.popleft()[1]
