"""The uplink against the real hub in-process: exactly-once delivery through outages, refusals, caps and waits.

Faults are injected between the two (tests/support/faults.py); a case the hub must refuse is one the real
hub refuses (a model it does not know, another device's case)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet.edge.pacing import Backoff
from fleet.edge.recorder import Capture, Recorder, new_case_id
from fleet.edge.spool import Spool
from fleet.edge.uplink import Uplink
from fleet.protocol import BatchReceipt, Case, CaseReceipt, Classification
from tests.edge.conftest import DEVICE, Keys, client
from tests.support.faults import replaced
from tests.support.inproc import InProcHub, inproc_hub

CASE_PATHS = r"^/v1/cases(/batch)?$"


def _with_model(hub: InProcHub) -> None:
    hub.enroll(DEVICE)
    hub.publish("v1", seed=1)


@pytest.fixture
def hub(tmp_path: Path, keys: Keys) -> Iterator[InProcHub]:
    """The real hub with ``dev-1`` enrolled and model v1 (3 classes) active."""
    with inproc_hub(tmp_path, keys.pair, seed=_with_model, seed_key="edge-uplink") as h:
        yield h


@pytest.fixture(params=[1, 16], ids=["single", "batch16"])
def batch(request: pytest.FixtureRequest) -> int:
    """Cases per upload request: every exactly-once test runs on the single and on the batch path."""
    return int(request.param)


def capture(priority: float = 0.5, seed: int = 0, **fields: object) -> Capture:
    rng = np.random.default_rng(seed)
    return Capture(
        image=rng.integers(0, 256, (16, 16), dtype=np.uint8),
        fields=dict(case_id=new_case_id(), device_id=DEVICE, captured_at=time.time(), model_version="v1",
                    prediction=Classification(0, [0.7, 0.2, 0.1]), priority=priority) | fields,
    )


def fill(spool: Spool, n: int, *, refused: dict[int, dict[str, object]] | None = None) -> list[str]:
    """``n`` cases in the spool, priorities 0.0, 0.1, ...; ``refused``: index -> fields that make the hub refuse
    that case (a model it does not know: 422; another device's case: 403)."""
    rec = Recorder(spool)
    ids = []
    for i in range(n):
        c = capture(priority=(i % 10) / 10, seed=i, **(refused or {}).get(i, {}))
        assert rec.record(c)
        ids.append(c.fields["case_id"])
    return ids


UNKNOWN_MODEL = {"model_version": "v-unknown"}  # the hub answers 422: unknown model version
OTHER_DEVICE = {"device_id": "dev-2"}  # the hub answers 403: another device's case


def stored(hub: InProcHub) -> set[str]:
    return set(hub.cases())


def test_uploads_everything_and_acks(tmp_path: Path, hub: InProcHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 12)
    expected_bytes = sum(x.nbytes + 400 for x in spool.peek(12))
    up = Uplink(spool, client(hub), batch_max_cases=batch)
    while up.step() == 0:
        pass
    assert stored(hub) == set(ids) and len(hub.case_posts()) == 12
    assert spool.check().items == 0 and spool.stats().acked == 12
    assert up.stats.uploaded == 12
    assert hub.batch_sizes() == ([] if batch == 1 else [12])
    assert up.stats.bytes_sent == expected_bytes
    # the highest priority went first
    cases = hub.cases()
    prios = [cases[c].priority for c in hub.case_posts()]
    assert prios == sorted(prios, reverse=True)


@pytest.mark.parametrize("fault", ["connect", "503", "timeout-after-store"])
def test_hub_unreachable_for_a_while_then_back_loses_nothing(tmp_path: Path, hub: InProcHub, fault: str,
                                                             batch: int) -> None:
    """The acceptance test: an outage, cases keep arriving during it, then every case lands exactly once."""
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    outage_until = time.monotonic() + 1.0

    def during(request: httpx.Request) -> bool:
        return time.monotonic() < outage_until

    kind = {"connect": "refuse", "503": "503", "timeout-after-store": "lose"}[fault]
    hub.faults.add(None, CASE_PATHS if fault == "timeout-after-store" else "", kind, times=None, when=during)
    up = Uplink(spool, client(hub), backoff=Backoff(base_s=0.02, cap_s=0.2, rng=random.Random(0)), idle_s=0.05,
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
    assert stored(hub) == set(ids)  # zero cases lost
    assert spool.check().items == 0
    posts = hub.case_posts()
    if fault == "timeout-after-store":
        # the hub stored cases whose answer was lost, so the same case ids came again: absorbed by case id
        assert up.stats.retries > 0 and len(posts) > len(ids) and up.stats.duplicates >= 1
        assert {r.status for r in hub.case_receipts()} <= {"created", "already"}
    else:
        assert up.stats.retries > 0
        assert sorted(posts) == sorted(ids)  # each case accepted exactly once
    if batch > 1:
        assert up.stats.batches > 0 and max(hub.batch_sizes()) > 1  # the backlog after the outage went in batches


def test_permanent_refusal_drops_the_case_and_goes_on(tmp_path: Path, hub: InProcHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 3, refused={2: UNKNOWN_MODEL})  # the highest priority: the first to go
    up = Uplink(spool, client(hub), batch_max_cases=batch)
    while up.step() == 0:
        pass
    assert stored(hub) == set(ids) - {ids[2]}
    assert spool.stats().dropped == 1 and up.stats.dropped == 1 and up.stats.uploaded == 2
    assert spool.check().items == 0
    assert hub.batch_sizes() == ([] if batch == 1 else [3])  # refused alone, inside the batch
    if batch > 1:
        [refusal] = [r for r in hub.case_receipts() if r.status == "rejected"]
        assert refusal.error_status == 422 and "unknown model version" in (refusal.error or "")
    else:
        assert hub.tap.find("POST", "/v1/cases", status=422)


def test_revoked_token_pauses_without_dropping(tmp_path: Path, hub: InProcHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    fill(spool, 2)
    up = Uplink(spool, client(hub, token="revoked"), unauthorized_pause_s=30.0, batch_max_cases=batch)
    assert up.step() == 30.0
    assert up.stats.state == "unauthorized" and spool.stats().items == 2


def test_bytes_per_minute_budget_holds_back_the_uplink(tmp_path: Path, hub: InProcHub, batch: int) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    fill(spool, 5)
    size = spool.peek(1)[0].nbytes + 400
    up = Uplink(spool, client(hub), bytes_per_minute=int(size * 2.5), batch_max_cases=batch)
    steps = 0
    while up.step() == 0:
        steps += 1
    assert steps == (2 if batch == 1 else 1)  # two single uploads, or one batch of two
    assert up.step() > 0  # the third would exceed the budget this minute
    assert len(stored(hub)) == 2 and up.budget.used() <= up.budget.limit


# ---------------------------------------------------------------------------------------------
# the batch path: per-case outcomes, caps, and hubs that cannot take a batch
# ---------------------------------------------------------------------------------------------


def busy_item(case_id: str) -> object:
    """An ``edit`` rule: the hub's batch answer with ``case_id``'s outcome turned into 503 (busy), once.

    The real hub never answers one item busy (its per-item refusals are all 4xx), but the contract allows
    it; the case is stored all the same, so its retry comes back ``already``."""
    def edit(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        receipt = BatchReceipt.from_json(response.content)
        results = [CaseReceipt(r.case_id, "rejected", error_status=503, error="busy") if r.case_id == case_id else r
                   for r in receipt.results]
        return replaced(response, content=BatchReceipt(results).to_json().encode())

    return edit


def test_each_case_in_a_batch_is_acked_dropped_or_kept_by_its_own_answer(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 6, refused={4: UNKNOWN_MODEL})
    order = [x.case_id for x in spool.peek(6)]  # priorities 0.5 .. 0.0: ids reversed
    bad, busy, known = order[1], order[3], order[4]
    assert bad == ids[4]
    item = spool.peek(6)[4]  # the hub already has this one (it came by another path before)
    r = hub.post_case(Case.from_json(item.case_json), item.image)
    assert r.status_code == 201, r.text
    hub.faults.add("POST", "^/v1/cases/batch$", "edit", edit=busy_item(busy))  # type: ignore[arg-type]
    up = Uplink(spool, client(hub), backoff=Backoff(base_s=0.5, cap_s=1.0, rng=random.Random(0)))
    delay = up.step()
    assert delay > 0 and up.stats.state == "backoff" and up.stats.retries == 1  # one back-off for the request
    assert [x.case_id for x in spool.peek(10)] == [busy]  # only the busy case is kept
    assert up.stats.dropped == 1 and up.stats.uploaded == 4 and up.stats.duplicates == 1
    assert known in stored(hub)
    assert up.step() == 0 and up.step() > 0 and spool.stats().items == 0
    # the busy case was stored by the hub after all: its second sending is absorbed as a duplicate
    assert stored(hub) == set(ids) - {bad} and up.stats.uploaded == 5 and up.stats.duplicates == 2


def test_an_item_refused_as_unauthorized_is_kept_like_a_single_upload(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 3, refused={2: OTHER_DEVICE})  # not this device's case: 403 for that item alone
    up = Uplink(spool, client(hub), unauthorized_pause_s=30.0)
    assert up.step() == 30.0 and up.stats.state == "unauthorized"
    assert [x.case_id for x in spool.peek(10)] == [ids[2]] and stored(hub) == set(ids) - {ids[2]}
    [refusal] = [r for r in hub.case_receipts() if r.status == "rejected"]
    assert refusal.error_status == 403


def test_batches_stay_under_the_byte_cap(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 7)
    size = max(x.nbytes for x in spool.peek(7)) + 400
    up = Uplink(spool, client(hub), batch_max_bytes=int(size * 3.5))
    while up.step() == 0:
        pass
    sizes = hub.batch_sizes()
    assert stored(hub) == set(ids) and sizes[:2] == [3, 3] and sum(sizes) <= 7


def test_a_hub_refusing_a_whole_batch_gets_smaller_ones(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 20)
    hub.settings.max_batch_cases = 5  # the hub answers 413 to a batch of more
    up = Uplink(spool, client(hub), batch_max_cases=16)
    while up.step() == 0:
        pass
    assert stored(hub) == set(ids) and sorted(hub.case_posts()) == sorted(ids)
    assert max(hub.batch_sizes()) <= 5 and up.stats.dropped == 0
    assert hub.tap.find("POST", "/v1/cases/batch", status=413)  # it did refuse the first, whole


@pytest.mark.parametrize("status", [429, 503])
def test_a_hub_asking_to_wait_is_waited_for(tmp_path: Path, hub: InProcHub, status: int) -> None:
    """429 (over a quota) or 503 with Retry-After: the uplink waits at least that long, keeps every case."""
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 3)
    hub.faults.add("POST", CASE_PATHS, str(status), retry_after=7, json={"detail": "over the fleet's upload cap"})
    up = Uplink(spool, client(hub), backoff=Backoff(base_s=0.01, cap_s=0.05, rng=random.Random(0)))
    wait = up.step()
    assert wait >= 7.0 and spool.stats().items == 3 and up.stats.dropped == 0
    while up.step() == 0:
        pass
    assert stored(hub) == set(ids)


def test_an_unreadable_batch_answer_keeps_every_case(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    ids = fill(spool, 4)
    # stored, but the answer says nothing usable
    hub.faults.add("POST", "^/v1/cases/batch$", "edit",
                   edit=lambda request, response: replaced(response, content=json.dumps({"results": []}).encode()))
    up = Uplink(spool, client(hub), backoff=Backoff(base_s=0.01, cap_s=0.01, rng=random.Random(0)))
    assert up.step() > 0 and spool.stats().items == 4 and up.stats.retries == 1
    while up.step() == 0:
        pass
    assert stored(hub) == set(ids) and up.stats.duplicates == 4 and spool.stats().items == 0


def test_inference_thread_never_waits_on_a_hanging_hub(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    gate = threading.Event()
    hub.faults.add(None, "", "slow", times=None, gate=gate, delay_s=5)
    up = Uplink(spool, client(hub), idle_s=0.01)
    up.start()
    rec = Recorder(spool, on_stored=up.wake)
    t0 = time.perf_counter()
    for i in range(20):
        rec.record(capture(seed=i))
    assert time.perf_counter() - t0 < 2.0  # the producer did not block on the network
    gate.set()
    assert up.drain(10.0)
    up.stop()
    assert len(stored(hub)) == 20


def test_a_partial_batch_lingers_for_company_then_goes_in_one_request(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    now = [100.0]
    up = Uplink(spool, client(hub), batch_max_cases=8, linger_s=0.5, clock=lambda: now[0])
    first = fill(spool, 2)
    assert up.step() == pytest.approx(0.5) and up.stats.state == "lingering" and not hub.requests()
    now[0] += 0.3
    later = fill(spool, 3)
    assert up.step() == pytest.approx(0.2) and not hub.requests()  # the wait counts from the first sight
    now[0] += 0.2
    assert up.step() == 0
    assert hub.batch_sizes() == [5] and stored(hub) == set(first + later) and spool.stats().items == 0
    assert up.step() == up.idle_s and up.stats.state == "idle"


def test_a_full_batch_does_not_linger(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    up = Uplink(spool, client(hub), batch_max_cases=4, linger_s=30.0, clock=lambda: 0.0)
    fill(spool, 6)
    assert up.step() == 0 and hub.batch_sizes() == [4]  # full: out at once
    assert up.step() == pytest.approx(30.0) and hub.batch_sizes() == [4]  # the remaining two wait


def test_drain_and_stop_cut_a_linger_short(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    up = Uplink(spool, client(hub), batch_max_cases=16, linger_s=60.0)
    up.start()
    rec = Recorder(spool, on_stored=up.wake)
    for i in range(3):
        rec.record(capture(seed=i))
    time.sleep(0.3)
    assert not stored(hub) and up.stats.state == "lingering"
    t0 = time.monotonic()
    assert up.drain(10.0)
    assert time.monotonic() - t0 < 5.0 and len(stored(hub)) == 3 and hub.batch_sizes() == [3]
    rec.record(capture(seed=9))  # after a drain, lingering resumes
    time.sleep(0.3)
    assert len(stored(hub)) == 3
    t0 = time.monotonic()
    up.stop()
    assert time.monotonic() - t0 < 5.0


def test_single_uploads_never_linger(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 22)
    up = Uplink(spool, client(hub), batch_max_cases=1, linger_s=30.0)
    fill(spool, 1)
    assert up.step() == 0 and len(stored(hub)) == 1


@pytest.mark.parametrize("batch", [1, 16], ids=["single", "batch16"])
def test_the_fleets_upload_cap_holds_the_uplink_back_and_loses_nothing(tmp_path: Path, keys: Keys,
                                                                        batch: int) -> None:
    """The hub's fleet-wide cap (fleet.hub.quota: 60/min, burst 4) answers 429 with Retry-After; the uplink
    waits that long and keeps the refused cases; cases captured meanwhile into a full spool evict the least
    valuable, counted: every case is stored once or counted evicted, nothing else."""
    now = [1_800_000_000.0]
    with inproc_hub(tmp_path, keys.pair, seed=_with_model, seed_key="edge-uplink-cap", clock=lambda: now[0],
                    fleet_upload_rate_per_min=60.0, fleet_upload_burst=4.0) as hub:
        spool = Spool(tmp_path / "s.db", max_bytes=8 * 1100)  # room for about 8 cases of ~1 kB
        ids = fill(spool, 6)
        up = Uplink(spool, client(hub), batch_max_cases=batch,
                    backoff=Backoff(base_s=0.01, cap_s=0.05, rng=random.Random(0)))
        waits: list[float] = []
        rec = Recorder(spool)
        for _ in range(200):
            wait = up.step()
            if wait > 0:
                waits.append(wait)
                now[0] += wait  # the hub's buckets refill with the time the uplink waited
                if len(waits) == 1:  # throttled: the fleet goes on capturing into the full spool
                    for i in range(10):
                        c = capture(priority=0.05 * i, seed=100 + i)
                        rec.record(c)
                        ids.append(str(c.fields["case_id"]))
            if spool.stats().items == 0:
                break
        held = stored(hub)
        stats = spool.stats()
        assert waits and min(waits) >= 1.0  # Retry-After honoured (at least a second: 1/s refill)
        assert up.stats.retries >= 1 and up.stats.dropped == 0 and stats.items == 0
        assert stats.evicted > 0 and held <= set(ids) and len(held) + stats.evicted == len(ids)
        assert len(hub.cases()) == len(held)  # none twice
        status = 429 if batch == 1 else 200
        assert hub.tap.find("POST", "/v1/cases" + ("" if batch == 1 else "/batch"), status=status)
