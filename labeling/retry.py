"""Backoff for calls that may be repeated safely; shared by the Label Studio and hub clients."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from fleet.errors import RetryableError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: up to ``attempts`` tries, giving up once ``deadline_s`` would pass."""

    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    deadline_s: float = 90.0

    def delays(self) -> Iterator[float]:
        for i in range(max(self.attempts - 1, 0)):
            yield min(self.base_delay_s * 2**i, self.max_delay_s)


NO_RETRY = RetryPolicy(attempts=1)


def with_retries(what: str, fn: Callable[[], T], policy: RetryPolicy, *,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn``; on :class:`RetryableError` wait and try again within the policy, then re-raise."""
    start = time.monotonic()
    delays = policy.delays()
    while True:
        try:
            return fn()
        except RetryableError as exc:
            delay = next(delays, None)
            if delay is None or time.monotonic() - start + delay > policy.deadline_s:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            sleep(delay)
