from __future__ import annotations

import random

import pytest

from fleet.edge.pacing import Backoff, ByteBudget
from fleet.errors import InvalidInput


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_exponentially_with_full_jitter_and_caps() -> None:
    b = Backoff(base_s=0.5, cap_s=8.0, rng=random.Random(0))
    ceilings = []
    for _ in range(8):
        ceiling = b.ceiling()
        delay = b.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.ceiling() == 0.5 and b.failures == 0
    for _ in range(2000):  # no overflow after a very long outage
        b.next_delay()
    assert b.ceiling() == 8.0


def test_backoff_jitter_spreads_delays() -> None:
    delays = []
    for seed in range(200):
        b = Backoff(base_s=1.0, cap_s=100.0, rng=random.Random(seed))
        for _ in range(3):
            b.next_delay()
        delays.append(b.next_delay())  # ceiling 8
    assert min(delays) < 1.0 and max(delays) > 7.0  # spread over [0, 8], not synchronised


def test_backoff_validates() -> None:
    with pytest.raises(InvalidInput, match="base must be > 0"):
        Backoff(base_s=0)
    with pytest.raises(InvalidInput, match="cap must be >= base"):
        Backoff(base_s=2, cap_s=1)


def test_byte_budget_never_exceeds_the_limit_in_any_minute() -> None:
    clock = FakeClock()
    budget = ByteBudget(10_000, clock=clock)
    rng = random.Random(1)
    sends: list[tuple[float, int]] = []
    while clock.now < 1000.0 + 600:
        size = rng.randint(200, 3000)
        wait = budget.wait_time(size)
        if wait > 0:
            clock.now += wait
            continue
        budget.consume(size)
        sends.append((clock.now, size))
        clock.now += rng.uniform(0, 0.5)
    for t0, _ in sends:
        in_window = sum(b for t, b in sends if t0 <= t < t0 + 60.0 - 1e-9)
        assert in_window <= 10_000
    total = sum(b for _, b in sends)
    assert total >= 10_000 * 9  # and it does use the budget: ~10 minutes' worth


def test_byte_budget_lets_an_oversized_payload_through_alone() -> None:
    clock = FakeClock()
    budget = ByteBudget(1000, clock=clock)
    assert budget.wait_time(5000) == 0.0
    budget.consume(5000)
    assert budget.wait_time(10) == pytest.approx(60.0)
    clock.now += 60.0
    assert budget.wait_time(10) == 0.0
    assert ByteBudget(0).wait_time(10**9) == 0.0
    with pytest.raises(InvalidInput, match="bytes_per_minute must be an integer >= 0; received -1"):
        ByteBudget(-1)
