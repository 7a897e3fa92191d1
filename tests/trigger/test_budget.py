"""Budgets are never exceeded (property tests), a frame counts once, and state survives a restart."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trigger import Budget, TokenBucket

LABELS = ["entropy", "margin", "novelty", "human"]


def admitted_within_limit(times: list[float], rate: float, burst: float) -> bool:
    """Over every window [t_i, t_j] no more than burst + rate * (t_j - t_i) admissions."""
    times = sorted(times)
    return all(j - i + 1 <= burst + rate * (times[j] - times[i]) + 1e-9
               for i in range(len(times)) for j in range(i, len(times)))


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(0.0, 5.0),
    burst=st.integers(1, 10),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=120),
)
def test_token_bucket_never_exceeds_burst_plus_rate(rate: float, burst: int, gaps: list[float]) -> None:
    bucket = TokenBucket(rate, burst, clock=lambda: 0.0)
    now, granted = 0.0, []
    for gap in gaps:
        now += gap
        if bucket.try_take(now=now):
            granted.append(now)
    assert admitted_within_limit(granted, rate, burst)
    if rate == 0:
        assert len(granted) <= burst


frame = st.tuples(
    st.floats(0.0, 3.0),  # gap since the previous frame, seconds
    st.lists(st.sampled_from(LABELS), min_size=1, max_size=4, unique=True),  # triggers that want it
    st.integers(0, 3),  # predicted class
)


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(frame, min_size=1, max_size=150))
def test_budget_never_exceeds_any_bucket_and_charges_a_frame_once(frames) -> None:  # type: ignore[no-untyped-def]
    limits = {"global": (0.5, 5), "entropy": (0.2, 2), "novelty": (0.1, 3), "class-1": (0.05, 1)}
    budget = Budget(
        global_bucket=TokenBucket(*limits["global"]),
        per_trigger={"entropy": TokenBucket(*limits["entropy"]), "novelty": TokenBucket(*limits["novelty"])},
        per_class={1: TokenBucket(*limits["class-1"])},
    )
    now = 0.0
    log: dict[str, list[float]] = {name: [] for name in limits}
    for gap, triggers, cls in frames:
        now += gap
        before = budget.admitted
        if budget.try_acquire(triggers, cls, now=now):
            assert budget.admitted == before + 1
            log["global"].append(now)
            if cls == 1:
                log["class-1"].append(now)
            charged = budget.last_trigger
            if all(t in ("entropy", "novelty") for t in triggers):
                assert charged in triggers  # every trigger has a bucket: exactly one of them pays
                log[charged].append(now)
            else:
                assert charged is None  # a trigger without a bucket wanted it: no trigger bucket pays
    for name, (rate, burst) in limits.items():
        assert admitted_within_limit(log[name], rate, burst), name
    assert budget.admitted == len(log["global"]) and budget.admitted + budget.refused == len(frames)
    assert sum(budget.charged.values()) == len(log["entropy"]) + len(log["novelty"])


def test_a_frame_several_triggers_want_takes_one_token_overall() -> None:
    budget = Budget(global_bucket=TokenBucket(0, 3), per_trigger={"a": TokenBucket(0, 1), "b": TokenBucket(0, 1)})
    assert budget.try_acquire(["a", "b"], now=0)
    assert budget.try_acquire(["a", "b"], now=0)  # the other trigger's bucket still had a token
    assert not budget.try_acquire(["a", "b"], now=0)  # both spent
    assert budget.global_bucket is not None and budget.global_bucket.available(0) == 1  # refused: nothing taken
    assert budget.try_acquire(["c"], now=0)  # a trigger without a bucket is limited by the global one only


def test_refusal_takes_nothing_from_the_other_buckets() -> None:
    budget = Budget(global_bucket=TokenBucket(0, 5), per_class={2: TokenBucket(0, 1)})
    assert budget.try_acquire(["x"], 2, now=0)
    assert not budget.try_acquire(["x"], 2, now=0)
    assert budget.global_bucket is not None and budget.global_bucket.available(0) == 4


def test_state_survives_a_restart() -> None:
    budget = Budget(global_bucket=TokenBucket(1.0, 2), per_trigger={"a": TokenBucket(0.5, 1)})
    assert budget.try_acquire(["a"], now=100.0) and not budget.try_acquire(["a"], now=100.5)
    state = json.loads(json.dumps(budget.state_dict()))
    fresh = Budget(global_bucket=TokenBucket(1.0, 2), per_trigger={"a": TokenBucket(0.5, 1)})
    fresh.load_state_dict(state)
    assert not fresh.try_acquire(["a"], now=101.0)  # the restored bucket is still refilling
    assert fresh.try_acquire(["a"], now=102.0)
    assert fresh.admitted == 2 and fresh.refused == 2


def test_refusals() -> None:
    with pytest.raises(ValueError, match="burst must be >= 1"):
        TokenBucket(1.0, 0.5)
    with pytest.raises(ValueError, match="rate_per_s must be >= 0"):
        TokenBucket(-1.0, 1)
    with pytest.raises(ValueError, match="labels of the triggers"):
        Budget().try_acquire([])
    with pytest.raises(ValueError, match="not a TokenBucket state"):
        TokenBucket(1, 1).load_state_dict({"tokens": "many"})
