"""The one retry policy: only retryable faults, full-jitter waits, Retry-After honoured, a bounded number of tries."""

from __future__ import annotations

import random

import pytest

from fleet.errors import Conflict, InvalidInput, ServerBusy, TransportError
from fleet.retry import NO_RETRY, RetryPolicy, retrying


def flaky(failures: list[Exception], result: str = "ok"):  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


def test_retryable_faults_are_retried_until_they_pass() -> None:
    fn, calls = flaky([TransportError("down"), ServerBusy("503")])
    sleeps: list[float] = []
    assert RetryPolicy().call("x", fn, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("fault", [InvalidInput("422"), Conflict("409")])
def test_permanent_faults_are_never_retried(fault: Exception) -> None:
    fn, calls = flaky([fault])
    sleeps: list[float] = []
    with pytest.raises(type(fault)):
        RetryPolicy().call("x", fn, sleep=sleeps.append)
    assert len(calls) == 1 and not sleeps


def test_the_last_fault_is_raised_after_the_last_attempt() -> None:
    fn, calls = flaky([ServerBusy(f"busy {i}") for i in range(10)])
    with pytest.raises(ServerBusy, match="busy 3"):
        RetryPolicy(attempts=4).call("x", fn, sleep=lambda _: None)
    assert len(calls) == 4


def test_waits_are_jittered_below_a_doubling_ceiling_and_honour_retry_after() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=4.0, rng=random.Random(1))
    assert [policy.ceiling(n) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    for n in range(6):
        assert 0.0 <= policy.delay(n) <= policy.ceiling(n)
    assert policy.delay(0, retry_after=9.0) == 9.0  # the peer knows its load: longer than the cap
    fn, _ = flaky([ServerBusy("429", retry_after=3.0)])
    sleeps: list[float] = []
    RetryPolicy(base_s=0.1, cap_s=0.2).call("x", fn, sleep=sleeps.append)
    assert sleeps == [3.0]
    assert policy.ceiling(10_000) == 4.0  # a long outage never overflows


def test_a_deadline_stops_retries_that_would_wait_past_it() -> None:
    fn, calls = flaky([ServerBusy("busy", retry_after=60.0) for _ in range(5)])
    with pytest.raises(ServerBusy):
        RetryPolicy(deadline_s=30.0).call("x", fn, sleep=lambda _: None)
    assert len(calls) == 1


def test_calls_that_create_something_are_tried_once() -> None:
    fn, calls = flaky([TransportError("lost answer")])
    with pytest.raises(TransportError):
        retrying(RetryPolicy(), "create", fn, idempotent=False, sleep=lambda _: None)
    assert len(calls) == 1 and NO_RETRY.attempts == 1


@pytest.mark.parametrize("bad", [{"attempts": 0}, {"base_s": -1.0}, {"base_s": 2.0, "cap_s": 1.0},
                                 {"deadline_s": -1.0}])
def test_a_bad_policy_is_refused_with_what_was_received(bad: dict[str, float]) -> None:
    with pytest.raises(InvalidInput, match="received"):
        RetryPolicy(**bad)  # type: ignore[arg-type]
