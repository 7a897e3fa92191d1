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
from tests.edge.fakehub import FakeHub


def capture(priority: float = 0.5, seed: int = 0) -> Capture:
    rng = np.random.default_rng(seed)
    return Capture(
        image=rng.integers(0, 256, (16, 16), dtype=np.uint8),
        fields=dict(case_id=new_case_id(), device_id="dev-1", captured_at=time.time(), model_version="v1",
                    predicted_class=0, probs=[0.7, 0.2, 0.1], priority=priority),
    )


def fill(spool: Spool, n: int) -> list[str]:
    rec = Recorder(spool)
    ids = []
    for i in range(n):
        c = capture(priority=(i % 10) / 10, seed=i)
        assert rec.record(c)
        ids.append(c.fields["case_id"])
    return ids


def test_uploads_everything_and_acks(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 12)
    up = Uplink(spool, hub.client())
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids) and len(hub.case_posts) == 12
    assert spool.check().items == 0 and spool.stats().acked == 12
    assert up.stats.uploaded == 12
    # the highest priority went first
    prios = [hub.cases[c][0].priority for c in hub.case_posts]
    assert prios == sorted(prios, reverse=True)


@pytest.mark.parametrize("fault", ["connect", "503", "timeout-after-store"])
def test_hub_unreachable_for_a_while_then_back_loses_nothing(tmp_path: Path, hub: FakeHub, fault: str) -> None:
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
            if time.monotonic() < outage_until and request.url.path == "/v1/cases":
                raise httpx.ReadTimeout("response lost", request=request)
            return resp

        hub.handle = store_then_time_out  # type: ignore[method-assign]
    else:
        hub.fail = fail
    up = Uplink(spool, hub.client(), backoff=Backoff(base_s=0.02, cap_s=0.2, rng=random.Random(0)), idle_s=0.05)
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


def test_permanent_refusal_drops_the_case_and_goes_on(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 3)
    first = spool.peek(1)[0].case_id
    hub.fail = lambda r: 422 if first.encode() in r.content else None
    up = Uplink(spool, hub.client())
    while up.step() == 0:
        pass
    assert set(hub.cases) == set(ids) - {first}
    assert spool.stats().dropped == 1 and up.stats.dropped == 1


def test_revoked_token_pauses_without_dropping(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    fill(spool, 2)
    up = Uplink(spool, hub.client(token="revoked"), unauthorized_pause_s=30.0)
    assert up.step() == 30.0
    assert up.stats.state == "unauthorized" and spool.stats().items == 2


def test_bytes_per_minute_budget_holds_back_the_uplink(tmp_path: Path, hub: FakeHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    fill(spool, 5)
    size = spool.peek(1)[0].nbytes + 400
    up = Uplink(spool, hub.client(), bytes_per_minute=int(size * 2.5))
    assert up.step() == 0 and up.step() == 0
    assert up.step() > 0  # the third would exceed the budget this minute
    assert len(hub.cases) == 2 and up.budget.used() <= up.budget.limit


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
