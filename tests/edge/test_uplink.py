from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet.edge.pacing import Backoff
from fleet.edge.recorder import Capture, Recorder, new_case_id
from fleet.edge.spool import Spool
from fleet.edge.uplink import Uplink
from fleet.protocol import Classification
from tests.edge.fakehub import FakeHub

CASE_PATHS = ("/v1/cases", "/v1/cases/batch")


@pytest.fixture(params=[1, 16], ids=["single", "batch16"])
def batch(request: pytest.FixtureRequest) -> int:
    """Cases per upload request: every exactly-once test runs on the single and on the batch path."""
    return int(request.param)


def capture(priority: float = 0.5, seed: int = 0) -> Capture:
    rng = np.random.default_rng(seed)
    return Capture(
        image=rng.integers(0, 256, (16, 16), dtype=np.uint8),
        fields=dict(case_id=new_case_id(), device_id="dev-1", captured_at=time.time(), model_version="v1",
                    prediction=Classification(0, [0.7, 0.2, 0.1]), priority=priority),
    )


def fill(spool: Spool, n: int) -> list[str]:
    rec = Recorder(spool)
    ids = []
    for i in range(n):
        c = capture(priority=(i % 10) / 10, seed=i)
        assert rec.record(c)
        ids.append(c.fields["case_id"])
    return ids


def test_uploads_everything_and_acks(tmp_path: Path, hub: FakeHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 12)
    expected_bytes = sum(x.nbytes + 400 for x in spool.peek(12))
    up = Uplink(spool, hub.client(), batch_max_cases=batch)
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids) and len(hub.case_posts) == 12
    assert spool.check().items == 0 and spool.stats().acked == 12
    assert up.stats.uploaded == 12
    assert hub.batch_sizes == ([] if batch == 1 else [12])
    assert up.stats.bytes_sent == expected_bytes
    # the highest priority went first
    prios = [hub.cases[c][0].priority for c in hub.case_posts]
    assert prios == sorted(prios, reverse=True)


@pytest.mark.parametrize("fault", ["connect", "503", "timeout-after-store"])
def test_hub_unreachable_for_a_while_then_back_loses_nothing(tmp_path: Path, hub: FakeHub, fault: str,
                                                             batch: int) -> None:
    """The acceptance test: an outage, cases keep arriving during it, then every case lands exactly once."""
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    outage_until = time.monotonic() + 1.0

    def fail(request: httpx.Request) -> Exception | int | None:
        if time.monotonic() >= outage_until:
            return None
        if fault == "connect":
            return httpx.ConnectError("connection refused", request=request)
        return 503

    if fault == "timeout-after-store":
        real = hub.handle

        def store_then_time_out(request: httpx.Request) -> httpx.Response:
            resp = real(request)
            if time.monotonic() < outage_until and request.url.path in CASE_PATHS:
                raise httpx.ReadTimeout("response lost", request=request)
            return resp

        hub.handle = store_then_time_out  # type: ignore[method-assign]
    else:
        hub.fail = fail
    up = Uplink(spool, hub.client(), backoff=Backoff(base_s=0.02, cap_s=0.2, rng=random.Random(0)), idle_s=0.05,
                batch_max_cases=batch)
    up.start()
    rec = Recorder(spool, on_stored=up.wake)
    ids = []
    for i in range(40):  # frames keep being flagged during the outage
        c = capture(seed=i)
        rec.record(c)
        ids.append(c.fields["case_id"])
        time.sleep(0.03)
    assert up.drain(10.0)
    up.stop()
    assert set(hub.cases) == set(ids)  # zero cases lost
    assert spool.check().items == 0
    if fault == "timeout-after-store":
        # the hub stored cases whose answer was lost, so the same case ids came again: absorbed by case id
        assert up.stats.retries > 0 and len(hub.case_posts) > len(ids) and up.stats.duplicates >= 1
        assert len(hub.cases) == len(ids)
    else:
        assert up.stats.retries > 0
        assert sorted(hub.case_posts) == sorted(ids)  # each case accepted exactly once
    if batch > 1:
        assert up.stats.batches > 0 and max(hub.batch_sizes) > 1  # the backlog after the outage went in batches


def test_permanent_refusal_drops_the_case_and_goes_on(tmp_path: Path, hub: FakeHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 3)
    first = spool.peek(1)[0].case_id
    hub.reject = lambda case: 422 if case.case_id == first else None
    up = Uplink(spool, hub.client(), batch_max_cases=batch)
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids) - {first}
    assert spool.stats().dropped == 1 and up.stats.dropped == 1 and up.stats.uploaded == 2
    assert spool.check().items == 0
    assert hub.batch_sizes == ([] if batch == 1 else [3])  # refused alone, inside the batch


def test_revoked_token_pauses_without_dropping(tmp_path: Path, hub: FakeHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    fill(spool, 2)
    up = Uplink(spool, hub.client(token="revoked"), unauthorized_pause_s=30.0, batch_max_cases=batch)
    assert up.step() == 30.0
    assert up.stats.state == "unauthorized" and spool.stats().items == 2


def test_bytes_per_minute_budget_holds_back_the_uplink(tmp_path: Path, hub: FakeHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    fill(spool, 5)
    size = spool.peek(1)[0].nbytes + 400
    up = Uplink(spool, hub.client(), bytes_per_minute=int(size * 2.5), batch_max_cases=batch)
    steps = 0
    while up.step() == 0:
        steps += 1
    assert steps == (2 if batch == 1 else 1)  # two single uploads, or one batch of two
    assert up.step() > 0  # the third would exceed the budget this minute
    assert len(hub.cases) == 2 and up.budget.used() <= up.budget.limit


# ---------------------------------------------------------------------------------------------
# the batch path: per-case outcomes, caps, and hubs that cannot take a batch
# ---------------------------------------------------------------------------------------------


def test_each_case_in_a_batch_is_acked_dropped_or_kept_by_its_own_answer(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 6)
    order = [x.case_id for x in spool.peek(6)]
    bad, busy = order[1], order[3]
    busy_answers = iter([503])
    hub.reject = lambda case: 422 if case.case_id == bad else next(busy_answers, None) if case.case_id == busy \
        else None
    hub.cases[order[4]] = (None, b"")  # type: ignore[assignment]  # the hub already has this one
    up = Uplink(spool, hub.client(), backoff=Backoff(base_s=0.5, cap_s=1.0, rng=random.Random(0)))
    delay = up.step()
    assert delay > 0 and up.stats.state == "backoff" and up.stats.retries == 1  # one back-off for the request
    assert [x.case_id for x in spool.peek(10)] == [busy]  # only the busy case is kept
    assert up.stats.dropped == 1 and up.stats.uploaded == 4 and up.stats.duplicates == 1
    assert up.step() == 0 and up.step() > 0 and spool.stats().items == 0
    assert set(hub.cases) == set(ids) - {bad} and up.stats.uploaded == 5


def test_an_item_refused_as_unauthorized_is_kept_like_a_single_upload(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 3)
    other = spool.peek(1)[0].case_id
    hub.reject = lambda case: 403 if case.case_id == other else None
    up = Uplink(spool, hub.client(), unauthorized_pause_s=30.0)
    assert up.step() == 30.0 and up.stats.state == "unauthorized"
    assert [x.case_id for x in spool.peek(10)] == [other] and set(hub.cases) == set(ids) - {other}


def test_batches_stay_under_the_byte_cap(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 7)
    size = max(x.nbytes for x in spool.peek(7)) + 400
    up = Uplink(spool, hub.client(), batch_max_bytes=int(size * 3.5))
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids) and hub.batch_sizes[:2] == [3, 3] and sum(hub.batch_sizes) <= 7


def test_a_hub_refusing_a_whole_batch_gets_smaller_ones(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 20)
    hub.max_batch_cases = 5
    up = Uplink(spool, hub.client(), batch_max_cases=16)
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids) and sorted(hub.case_posts) == sorted(ids)
    assert max(hub.batch_sizes) <= 5 and up.stats.dropped == 0


@pytest.mark.parametrize("status", [429, 503])
def test_a_hub_asking_to_wait_is_waited_for(tmp_path: Path, hub: FakeHub, status: int) -> None:
    """429 (over a quota) or 503 with Retry-After: the uplink waits at least that long, keeps every case."""
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 3)
    answers = [httpx.Response(status, json={"detail": "over the fleet's upload cap"}, headers={"Retry-After": "7"})]

    def handle(request: httpx.Request) -> httpx.Response:
        return answers.pop() if answers else real(request)

    real, hub.handle = hub.handle, handle  # type: ignore[method-assign]
    up = Uplink(spool, hub.client(), backoff=Backoff(base_s=0.01, cap_s=0.05, rng=random.Random(0)))
    wait = up.step()
    assert wait >= 7.0 and spool.stats().items == 3 and up.stats.dropped == 0
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids)


def test_an_unreadable_batch_answer_keeps_every_case(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 4)
    real = hub.handle
    broken = [True]

    def garble(request: httpx.Request) -> httpx.Response:
        resp = real(request)
        if broken[0] and request.url.path == "/v1/cases/batch":
            broken[0] = False
            return httpx.Response(200, json={"results": []})  # stored, but the answer says nothing usable
        return resp

    hub.handle = garble  # type: ignore[method-assign]
    up = Uplink(spool, hub.client(), backoff=Backoff(base_s=0.01, cap_s=0.01, rng=random.Random(0)))
    assert up.step() > 0 and spool.stats().items == 4 and up.stats.retries == 1
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids) and up.stats.duplicates == 4 and spool.stats().items == 0


def test_inference_thread_never_waits_on_a_hanging_hub(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    gate = threading.Event()
    real = hub.handle

    def hang(request: httpx.Request) -> httpx.Response:
        gate.wait(5)
        return real(request)

    hub.handle = hang  # type: ignore[method-assign]
    up = Uplink(spool, hub.client(), idle_s=0.01)
    up.start()
    rec = Recorder(spool, on_stored=up.wake)
    t0 = time.perf_counter()
    for i in range(20):
        rec.record(capture(seed=i))
    assert time.perf_counter() - t0 < 2.0  # the producer did not block on the network
    gate.set()
    assert up.drain(10.0)
    up.stop()
    assert len(hub.cases) == 20


def test_a_partial_batch_lingers_for_company_then_goes_in_one_request(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    now = [100.0]
    up = Uplink(spool, hub.client(), batch_max_cases=8, linger_s=0.5, clock=lambda: now[0])
    first = fill(spool, 2)
    assert up.step() == pytest.approx(0.5) and up.stats.state == "lingering" and not hub.requests
    now[0] += 0.3
    later = fill(spool, 3)
    assert up.step() == pytest.approx(0.2) and not hub.requests  # the wait counts from the first sight
    now[0] += 0.2
    assert up.step() == 0
    assert hub.batch_sizes == [5] and set(hub.cases) == set(first + later) and spool.stats().items == 0
    assert up.step() == up.idle_s and up.stats.state == "idle"


def test_a_full_batch_does_not_linger(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    up = Uplink(spool, hub.client(), batch_max_cases=4, linger_s=30.0, clock=lambda: 0.0)
    fill(spool, 6)
    assert up.step() == 0 and hub.batch_sizes == [4]  # full: out at once
    assert up.step() == pytest.approx(30.0) and hub.batch_sizes == [4]  # the remaining two wait


def test_drain_and_stop_cut_a_linger_short(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    up = Uplink(spool, hub.client(), batch_max_cases=16, linger_s=60.0)
    up.start()
    rec = Recorder(spool, on_stored=up.wake)
    for i in range(3):
        rec.record(capture(seed=i))
    time.sleep(0.3)
    assert not hub.cases and up.stats.state == "lingering"
    t0 = time.monotonic()
    assert up.drain(10.0)
    assert time.monotonic() - t0 < 5.0 and len(hub.cases) == 3 and hub.batch_sizes == [3]
    rec.record(capture(seed=9))  # after a drain, lingering resumes
    time.sleep(0.3)
    assert len(hub.cases) == 3
    t0 = time.monotonic()
    up.stop()
    assert time.monotonic() - t0 < 5.0


def test_single_uploads_never_linger(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    up = Uplink(spool, hub.client(), batch_max_cases=1, linger_s=30.0)
    fill(spool, 1)
    assert up.step() == 0 and len(hub.cases) == 1
