"""The one retry policy every client shares: which faults to retry, how long to wait, when to give up.

Only :class:`~fleet.errors.RetryableError` is retried (a network fault, 408, 425, 429, 5xx). The n-th wait
is drawn with full jitter from ``[0, min(cap, base * 2**n)]`` (AWS architecture blog, "Exponential
Backoff And Jitter"), so a fleet that lost the hub together does not come back together; when the peer
said ``Retry-After``, the wait is at least that (and may exceed the cap: the peer knows its own load).
Blocking calls retry through ``tenacity``; the uplink, which must interleave waits with a stop event and
a byte budget, asks :meth:`RetryPolicy.delay` for the same waits (:class:`fleet.edge.pacing.Backoff`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fleet.errors import InvalidInput, RetryableError, ServerBusy

__all__ = ["NO_RETRY", "RetryPolicy", "retrying"]


log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, giving up before a wait would pass ``deadline_s`` since the first try."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 8.0
    deadline_s: float = 90.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise InvalidInput(f"attempts must be an integer >= 1; received {self.attempts!r}")
        if not self.base_s >= 0 or not self.cap_s >= self.base_s:
            raise InvalidInput(f"need 0 <= base_s <= cap_s; received base_s={self.base_s!r}, cap_s={self.cap_s!r}")
        if not self.deadline_s >= 0:
            raise InvalidInput(f"deadline_s must be >= 0; received {self.deadline_s!r}")

    def ceiling(self, failures: int) -> float:
        """The upper bound of the wait after ``failures`` consecutive failures: ``min(cap, base * 2**failures)``."""
        return min(self.cap_s, self.base_s * 2.0 ** min(max(failures, 0), 62))  # no float overflow

    def delay(self, failures: int, *, retry_after: float | None = None) -> float:
        """The wait before the next try, after ``failures`` consecutive failures (jittered; at least
        ``retry_after`` when the peer said so)."""
        wait = self.rng.uniform(0.0, self.ceiling(failures))
        return max(wait, retry_after) if retry_after is not None else wait

    def call(self, what: str, fn: Callable[[], T], *, sleep: Callable[[float], None] = time.sleep) -> T:
        """Call ``fn``; on a retryable fault wait and try again within the policy, then raise the last fault."""
        import tenacity

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = exc.retry_after if isinstance(exc, ServerBusy) else None
            return self.delay(state.attempt_number - 1, retry_after=after)

        def too_late(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= self.attempts:
                return True
            return (state.seconds_since_start or 0.0) + (state.upcoming_sleep or 0.0) > self.deadline_s

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, state.upcoming_sleep)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetryableError), wait=wait, stop=too_late,
            before_sleep=before_sleep, sleep=sleep, reraise=True)
        return retrying(fn)


NO_RETRY = RetryPolicy(attempts=1)


def retrying(policy: RetryPolicy | None, what: str, fn: Callable[[], T], *, idempotent: bool = True,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``policy.call`` for an idempotent call; a single try for one that creates something (a lost answer
    does not say whether it happened: the caller checks before trying again)."""
    chosen = (policy or RetryPolicy()) if idempotent else NO_RETRY
    return chosen.call(what, fn, sleep=sleep)
