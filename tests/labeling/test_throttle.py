"""Throttle math: the queue depth follows annotator throughput, and the push never floods."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.errors import InvalidInput
from labeling.throttle import Throttle, push_budget, target_depth, throughput


def test_throughput_counts_completions_inside_the_window_only() -> None:
    now = 1000.0
    times = np.array([100.0, 500.0, 950.0, 990.0, 1000.0, 1001.0])
    assert throughput(times, now=now, window_s=100.0) == pytest.approx(3 / 100)
    assert throughput(np.array([]), now=now, window_s=60.0) == 0.0
    with pytest.raises(InvalidInput):
        throughput(times, now=now, window_s=0.0)


def test_target_depth_grows_with_throughput_and_is_clamped() -> None:
    depths = [target_depth(r, horizon_s=600, min_depth=20, max_depth=500) for r in (0.0, 0.05, 0.2, 0.5, 5.0)]
    assert depths == [20, 30, 120, 300, 500]
    with pytest.raises(InvalidInput):
        target_depth(float("nan"), horizon_s=600, min_depth=0, max_depth=10)


def test_budget_fills_the_shortfall_in_tasks_not_annotations() -> None:
    assert push_budget(0, 100) == 100
    assert push_budget(80, 100) == 20
    assert push_budget(120, 100) == 0
    assert push_budget(0, 100, expected_overlap=2.0) == 50
    assert push_budget(0, 5000, max_batch=500) == 500
    with pytest.raises(InvalidInput):
        push_budget(0, 10, expected_overlap=0.5)


@given(
    slots=st.integers(0, 10_000), rate=st.floats(0, 10), horizon=st.floats(1, 10_000),
    overlap=st.floats(1, 5), max_batch=st.integers(1, 2000),
)
def test_a_push_never_takes_the_queue_past_its_target(slots: int, rate: float, horizon: float, overlap: float,
                                                      max_batch: int) -> None:
    target = target_depth(rate, horizon_s=horizon, min_depth=10, max_depth=5000)
    budget = push_budget(slots, target, expected_overlap=overlap, max_batch=max_batch)
    assert 0 <= budget <= max_batch
    assert slots + budget * overlap <= max(target, slots) + 1e-9


def test_throttle_settings_are_validated() -> None:
    with pytest.raises(InvalidInput):
        Throttle(min_depth=50, max_depth=10)
    with pytest.raises(InvalidInput):
        Throttle(horizon_s=0)
