"""Staged rollouts: bucketing, assignments, field metrics from heartbeat deltas, automatic rollback."""

from __future__ import annotations

import math
from typing import Any

import pytest
from sqlmodel import select

from fleet.hub import rollouts
from fleet.hub.db import read_session
from fleet.hub.heartbeats import deltas
from fleet.hub.models import Device, Rollout
from fleet.hub.rollouts import bucket
from fleet.protocol import Assignment, RolloutList
from tests.hub.conftest import HubHarness

N_DEVICES = 40


def _fleet(hub: HubHarness, n: int = N_DEVICES) -> list[str]:
    ids = [f"dev-{i:03d}" for i in range(n)]
    for d in ids:
        hub.enroll(d)
    return ids


def _assign(hub: HubHarness, device: str) -> Assignment:
    r = hub.client.get("/v1/assignment", headers=hub.devices[device])
    assert r.status_code == 200, r.text
    return Assignment.from_dict(r.json())


def _hb(hub: HubHarness, device: str, version: str, *, boot: str = "b1", compared: int = 0, disagreed: int = 0,
        health: int = 0, seen: int = 100, flagged: int = 5, challenger: str | None = None,
        shadow: tuple[int, int] = (0, 0)) -> None:
    """One heartbeat; ``shadow``: (frames compared with the challenger, of which agreed), cumulative."""
    body = {"device_id": device, "sent_at": hub.clock(), "boot_id": boot, "model_version": version,
            "challenger_version": challenger,
            "counters": {"frames_seen": seen, "flagged": flagged, "health_failures": health},
            "human_compared": compared, "human_disagreed": disagreed,
            "challenger_compared": shadow[0], "challenger_agreed": shadow[1]}
    r = hub.client.post("/v1/heartbeats", json=body, headers=hub.devices[device])
    assert r.status_code == 204, r.text


def _rollout(hub: HubHarness, version: str = "m2", stages: list[float] | None = None, **kw: Any) -> dict[str, Any]:
    r = hub.client.post("/v1/rollouts", json={"version": version, "stages": stages or [0.25, 0.5, 1.0], **kw},
                        headers=hub.trainer)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _enrolled(hub: HubHarness) -> list[str]:
    with read_session(hub.hub.engine) as s:
        return list(s.exec(select(Device.device_id)).all())


def _expected_canary(hub: HubHarness, version: str, fraction: float) -> set[str]:
    """The stage's rule, stated again: the ceil(fraction x n) enrolled devices with the lowest buckets."""
    enrolled = sorted(_enrolled(hub), key=lambda d: bucket(d, version))
    return set(enrolled[:max(1, math.ceil(fraction * len(enrolled)))])


def test_bucket_is_stable_uniform_and_per_version() -> None:
    b = [bucket(f"dev-{i}", "m2") for i in range(4000)]
    assert all(0 <= x < 1 for x in b)
    assert abs(sum(x < 0.1 for x in b) / 4000 - 0.1) < 0.02
    assert bucket("dev-1", "m2") == bucket("dev-1", "m2") != bucket("dev-1", "m3")


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75])
def test_a_stage_holds_its_share_of_a_small_fleet_exactly(hub: HubHarness, fraction: float) -> None:
    """A 50% canary on a small fleet used to be a draw per device: on four devices, none or all of them one
    time in eight. Now it is ceil(f x n) devices, the same ones for the same version on a new hub."""
    _fleet(hub, 3)  # with the harness's own device(s), a small fleet
    n = len(_enrolled(hub))
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[fraction, 1.0])
    canary = {d for d in _enrolled(hub) if _assign(hub, d).active.version == "m2"}  # type: ignore[union-attr]
    assert len(canary) == max(1, math.ceil(fraction * n)) and canary == _expected_canary(hub, "m2", fraction)
    with read_session(hub.hub.engine) as s:
        row = s.get(Rollout, ro["rollout_id"])
        assert row is not None and rollouts.canary_size(hub.hub, s, row) == len(canary)


def test_a_device_enrolled_during_a_stage_is_counted(hub: HubHarness) -> None:
    devices = _fleet(hub, 4)
    hub.register_model("m2", seed=1)
    _rollout(hub, stages=[0.5, 1.0])
    before = {d for d in _enrolled(hub) if _assign(hub, d).active.version == "m2"}  # type: ignore[union-attr]
    late = [f"late-{i}" for i in range(6)]
    for d in late:
        hub.enroll(d)
    after = {d for d in _enrolled(hub) if _assign(hub, d).active.version == "m2"}  # type: ignore[union-attr]
    assert after == _expected_canary(hub, "m2", 0.5) and len(after) == math.ceil(0.5 * len(_enrolled(hub)))
    assert len(after) > len(before) and set(devices) | set(late) <= set(_enrolled(hub))


def test_deltas_handle_counter_restarts() -> None:
    assert deltas(None, {"a": 5}) == {"a": 5}
    assert deltas({"a": 5}, {"a": 8}) == {"a": 3}
    assert deltas({"a": 5}, {"a": 2}) == {"a": 2}


def test_assignment_without_rollout_is_the_active_model(hub: HubHarness) -> None:
    a = _assign(hub, "d1")
    assert a.active is not None and a.active.version == "m1" and a.challenger is None and a.rollout_id is None


def test_staged_rollout_buckets_devices_and_completes(hub: HubHarness) -> None:
    devices = _fleet(hub)
    hub.register_model("m2", parent="m1", seed=1)
    ro = _rollout(hub)
    assert ro["state"] == "running" and ro["incumbent"] == "m1" and ro["fraction"] == 0.25
    for stage, fraction in enumerate([0.25, 0.5, 1.0]):
        got = {d: _assign(hub, d) for d in devices}
        canary = {d for d, a in got.items() if a.active and a.active.version == "m2"}
        expected = _expected_canary(hub, "m2", fraction) & set(devices)
        assert canary == expected, stage
        for d, a in got.items():
            assert a.rollout_id == ro["rollout_id"]
            if d in canary:
                assert a.challenger is not None and a.challenger.version == "m1"  # shadow incumbent
            else:
                assert a.active is not None and a.active.version == "m1" and a.challenger is None
        r = hub.client.post(f"/v1/rollouts/{ro['rollout_id']}/advance", headers=hub.trainer)
        assert r.status_code == 200, r.text
    assert r.json()["state"] == "completed"
    statuses = hub.model_statuses()
    assert statuses == {"m1": "retired", "m2": "active"}
    assert all(_assign(hub, d).active.version == "m2" for d in devices[:5])  # type: ignore[union-attr]


def test_only_one_rollout_at_a_time_and_only_of_a_candidate(hub: HubHarness) -> None:
    hub.register_model("m2", seed=1)
    hub.register_model("m3", seed=2)
    assert hub.client.post("/v1/rollouts", json={"version": "m1"}, headers=hub.trainer).status_code == 409
    assert hub.client.post("/v1/rollouts", json={"version": "zz"}, headers=hub.trainer).status_code == 404
    _rollout(hub)
    assert hub.client.post("/v1/rollouts", json={"version": "m3"}, headers=hub.trainer).status_code == 409
    for stages in ([0.5, 0.2], [0, 1], [1.5], []):
        r = hub.client.post("/v1/rollouts", json={"version": "m3", "stages": stages}, headers=hub.trainer)
        assert r.status_code == 422, stages


def test_field_disagreement_rolls_the_canary_back(hub: HubHarness) -> None:
    devices = _fleet(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[0.5, 1.0])
    canary = [d for d in devices if _assign(hub, d).active.version == "m2"]  # type: ignore[union-attr]
    rest = [d for d in devices if d not in canary]
    assert canary and rest
    for d in rest:  # incumbent: 10% disagreement
        _hb(hub, d, "m1", compared=20, disagreed=2)
    for d in canary[:2]:  # a few frames: not enough to judge yet
        _hb(hub, d, "m2", compared=10, disagreed=8)
    assert hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()["state"] == "running"
    for d in canary:  # cumulative counters: deltas are what count
        _hb(hub, d, "m2", compared=30, disagreed=15)
    status = hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()
    assert status["state"] == "rolled_back" and "disagreement" in status["reason"]
    m2 = status["metrics"]["m2"]
    # it rolled back as soon as the canary had the minimum number of compared frames
    assert 50 <= m2["human_compared"] < 30 * len(canary) and m2["disagreement"] >= 0.4
    assert status["metrics"]["m1"]["disagreement"] == pytest.approx(0.1)
    assert all(_assign(hub, d).active.version == "m1" for d in devices)  # type: ignore[union-attr]
    statuses = hub.model_statuses()
    assert statuses == {"m1": "active", "m2": "retired"}


@pytest.mark.parametrize("agreed", [20, 50])
def test_shadow_disagreement_rolls_a_canary_back_with_no_human_in_the_loop(hub_factory: Any, agreed: int) -> None:
    """No device sees a human action: the canary's only evidence is the candidate against the incumbent in shadow.
    Tested at 90% and 85%, the two may disagree on at most 25% of such frames (+ the 10% margin); 40 of 60 is far
    beyond that and rolls back, 10 of 60 is within it and does not."""
    hub = hub_factory()
    hub.register_model("m1", promote=True, metrics={"test_accuracy": 0.90})
    devices = _fleet(hub)
    hub.register_model("m2", seed=1, metrics={"test_accuracy": 0.85})
    ro = _rollout(hub, stages=[0.5, 1.0])
    canary = [d for d in devices if _assign(hub, d).active.version == "m2"]  # type: ignore[union-attr]
    assert canary and all(_assign(hub, d).challenger.version == "m1" for d in canary)  # type: ignore[union-attr]
    for d in devices:
        if d in canary:
            _hb(hub, d, "m2", challenger="m1", shadow=(60, agreed))
        else:
            _hb(hub, d, "m1")
    status = hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()
    if agreed == 50:
        assert status["state"] == "running", status["reason"]
        return
    assert status["state"] == "rolled_back", status
    reason = status["reason"]
    assert reason.startswith("shadow disagreement with the incumbent 0.667 over ")
    assert "the most the candidate's and the incumbent's test errors (0.150 + 0.100) allow (0.250)" in reason
    assert "one-sided one-proportion z-test" in reason and "no human needed" in reason
    assert status["metrics"]["m2"]["human_compared"] == 0  # no human said anything
    assert hub.model_statuses() == {"m1": "active", "m2": "retired"}
    assert all(_assign(hub, d).active.version == "m1" for d in devices)  # type: ignore[union-attr]


def test_a_healthy_canary_is_not_rolled_back(hub: HubHarness) -> None:
    devices = _fleet(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[0.5, 1.0])
    for d in devices:
        v = _assign(hub, d).active.version  # type: ignore[union-attr]
        _hb(hub, d, v, compared=40, disagreed=4 if v == "m1" else 5)
    assert hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()["state"] == "running"


def test_health_failures_roll_back(hub: HubHarness) -> None:
    devices = _fleet(hub, 20)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[1.0])
    ota = {"device_id": devices[0], "version": "m2", "outcome": "rolled_back", "reason": "NaN logits",
           "previous_version": "m1", "reported_at": hub.clock()}
    assert hub.client.post("/v1/ota-reports", json=ota, headers=hub.devices[devices[0]]).status_code == 204
    _hb(hub, devices[1], "m2", health=1)
    assert hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()["state"] == "running"
    _hb(hub, devices[2], "m2", health=1)
    status = hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()
    assert status["state"] == "rolled_back" and "health failures" in status["reason"]


def test_stage_clock_advances_the_rollout(hub: HubHarness) -> None:
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[0.1, 1.0], stage_seconds=60)
    hub.clock.advance(30)
    assert hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()["stage"] == 0
    hub.clock.advance(31)
    _assign(hub, "d1")  # any device poll moves a due rollout on
    assert hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()["stage"] == 1
    hub.clock.advance(61)
    assert hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()["state"] == "completed"


def test_manual_rollback_and_operator_rollback(hub: HubHarness) -> None:
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[1.0])
    assert _assign(hub, "d1").active.version == "m2"  # type: ignore[union-attr]
    r = hub.client.post(f"/v1/rollouts/{ro['rollout_id']}/rollback", json={"reason": "looks off"},
                        headers=hub.trainer)
    assert r.status_code == 200 and r.json()["state"] == "rolled_back" and r.json()["reason"] == "looks off"
    assert _assign(hub, "d1").active.version == "m1"  # type: ignore[union-attr]
    assert hub.client.post(f"/v1/rollouts/{ro['rollout_id']}/advance", headers=hub.trainer).status_code == 409
    assert hub.client.get("/v1/rollouts/ro-nope", headers=hub.trainer).status_code == 404


def test_heartbeat_deltas_per_boot(hub: HubHarness) -> None:
    _hb(hub, "d1", "m1", seen=100, flagged=10)
    _hb(hub, "d1", "m1", seen=150, flagged=12)
    _hb(hub, "d1", "m1", boot="b2", seen=20, flagged=1)  # the agent restarted: counters from zero
    m = hub.client.get("/v1/summary", headers=hub.trainer).json()["models"]["m1"]
    assert m["field"]["frames_seen"] == 170 and m["field"]["flagged"] == 13 and m["field"]["heartbeats"] == 3
    assert m["trigger_rate"] == pytest.approx(13 / 170)


@pytest.mark.parametrize(
    "change",
    [{"counters": {"frames_seen": -1}}, {"counters": {"bogus": 1}}, {"human_disagreed": 5, "human_compared": 1},
     {"latency_p50_ms": float("nan")}, {"boot_id": "../b"}, {"sent_at": "now"}],
)
def test_bad_heartbeats_are_refused(hub: HubHarness, change: dict[str, Any]) -> None:
    import json

    body = {"device_id": "d1", "sent_at": 1.0, "boot_id": "b1", "model_version": "m1", **change}
    r = hub.client.post("/v1/heartbeats", content=json.dumps(body), headers={**hub.devices["d1"],
                                                                           "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], str)


def test_bad_ota_reports_are_refused(hub: HubHarness) -> None:
    body = {"device_id": "d1", "version": "m1", "outcome": "exploded"}
    r = hub.client.post("/v1/ota-reports", json=body, headers=hub.devices["d1"])
    assert r.status_code == 422 and "outcome" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------
# issue 13, finding 2: field metrics one device cannot forge
# ---------------------------------------------------------------------------------------------


def _ota(hub: HubHarness, device: str, version: str, outcome: str = "refused") -> None:
    body = {"device_id": device, "version": version, "outcome": outcome, "reason": "bad signature",
            "previous_version": "m1", "reported_at": hub.clock()}
    r = hub.client.post("/v1/ota-reports", json=body, headers=hub.devices[device])
    assert r.status_code == 204, r.text


def _status(hub: HubHarness, ro: dict[str, Any]) -> dict[str, Any]:
    r = hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _split(hub: HubHarness, devices: list[str], ro: dict[str, Any]) -> tuple[list[str], list[str]]:
    canary = sorted(_expected_canary(hub, ro["version"], ro["fraction"]) & set(devices))
    return canary, [d for d in devices if d not in canary]


def test_a_device_outside_the_canary_cannot_touch_the_candidates_metrics(hub: HubHarness) -> None:
    devices = _fleet(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[0.25, 1.0])
    canary, outside = _split(hub, devices, ro)
    assert canary and outside
    forger = outside[0]
    for _ in range(3):  # three forged refusals used to roll a 10% canary back
        _ota(hub, forger, "m2")
    _hb(hub, forger, "m2", compared=1000, disagreed=1000, health=5)  # claims to run the candidate
    status = _status(hub, ro)
    assert status["state"] == "running", status["reason"]
    assert status["metrics"]["m2"]["health_failures"] == 0 and status["metrics"]["m2"]["human_compared"] == 0
    summary = hub.client.get("/v1/summary", headers=hub.trainer).json()
    assert summary["models"]["m2"]["field"]["heartbeats"] == 0  # not counted in the fleet-wide metrics either
    assert hub.devices_listed()[forger].model_version == "m2"  # its own state moves


def test_one_device_in_the_canary_cannot_roll_it_back_alone(hub: HubHarness) -> None:
    devices = _fleet(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[0.5, 1.0])
    canary, _ = _split(hub, devices, ro)
    a, b = canary[:2]
    for _ in range(3):
        _ota(hub, a, "m2")
    _hb(hub, a, "m2", health=5)
    status = _status(hub, ro)
    assert status["state"] == "running" and status["metrics"]["m2"]["health_failures"] == 8
    _ota(hub, b, "m2", "rolled_back")
    status = _status(hub, ro)
    assert status["state"] == "rolled_back"
    assert "from 2 devices" in status["reason"] and f"{a} (8)" in status["reason"] and f"{b} (1)" in status["reason"]


def test_one_devices_forged_disagreement_does_not_roll_back_but_several_devices_do(hub: HubHarness) -> None:
    devices = _fleet(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[0.5, 1.0])
    canary, rest = _split(hub, devices, ro)
    for d in rest:
        _hb(hub, d, "m1", compared=20, disagreed=2)
    _hb(hub, canary[0], "m2", compared=1000, disagreed=1000)  # the heartbeat of issue 13
    assert _status(hub, ro)["state"] == "running"
    _hb(hub, canary[1], "m2", compared=5, disagreed=5)  # a second device, but too few frames to count
    assert _status(hub, ro)["state"] == "running"
    _hb(hub, canary[2], "m2", compared=30, disagreed=20)
    status = _status(hub, ro)
    assert status["state"] == "rolled_back" and "each of 2 devices" in status["reason"]
    assert canary[0] in status["reason"] and canary[2] in status["reason"] and canary[1] not in status["reason"]


def test_the_minimum_number_of_devices_is_a_setting(hub_factory: Any) -> None:
    hub: HubHarness = hub_factory(rollback_min_devices=1)
    hub.register_model("m1", promote=True)
    devices = _fleet(hub, 10)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[1.0])
    for _ in range(3):
        _ota(hub, devices[0], "m2")
    assert _status(hub, ro)["state"] == "rolled_back"


def test_counters_that_rise_faster_than_a_device_counts_are_refused(hub_factory: Any) -> None:
    hub: HubHarness = hub_factory(heartbeat_max_rate_per_s=1000, heartbeat_rate_grace_s=10)
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    body = {"device_id": "d1", "sent_at": 1.0, "boot_id": "b1", "model_version": "m1",
            "counters": {"frames_seen": 2**53 - 1000}}
    r = hub.client.post("/v1/heartbeats", json=body, headers=hub.devices["d1"])
    assert r.status_code == 422 and "frames_seen rose by 9007199254739992" in r.json()["detail"], r.text
    _hb(hub, "d1", "m1", seen=9_000)  # within 10 s of slack at 1000/s
    r = hub.client.post("/v1/heartbeats", json={**body, "counters": {"frames_seen": 30_000}}, headers=hub.devices["d1"])
    assert r.status_code == 422  # +21000 with no time passed
    hub.clock.advance(20)
    _hb(hub, "d1", "m1", seen=30_000)  # +21000 in 20 s (+10 s of slack) is plausible
    _hb(hub, "d1", "m1", boot="b2", seen=9_000)  # a new boot counts whole, against the same clock
    r = hub.client.post("/v1/heartbeats", json={**body, "boot_id": "b3", "counters": {"frames_seen": 20_000}},
                        headers=hub.devices["d1"])
    assert r.status_code == 422  # a fresh boot id does not reset the budget
    m = hub.client.get("/v1/summary", headers=hub.trainer).json()["models"]["m1"]["field"]
    assert m["frames_seen"] == 39_000 and m["heartbeats"] == 3


# ---------------------------------------------------------------------------------------------
# issue 13, finding 8: `flywheel models promote` goes through the rollout's checks or is a recorded override
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", [False, True])
def test_a_promotion_every_device_refuses_is_undone(hub: HubHarness, override: bool) -> None:
    hub.enroll("d2")
    hub.register_model("m2", seed=1)
    r = hub.client.post("/v1/models/m2/promote", headers=hub.admin, json={"override": override, "reason": "try"})
    assert r.status_code == 200, r.text
    ro = r.json()["rollout"]
    assert ro["kind"] == ("override" if override else "promotion")
    assert r.json()["status"] == ("active" if override else "canary")
    for d in ("d1", "d2"):
        a = _assign(hub, d)
        assert a.active is not None and a.active.version == "m2"
        assert (a.challenger is None) == override  # an override runs no shadow
    _ota(hub, "d1", "m2")
    assert _status(hub, ro)["state"] == "running"  # one device of two
    _ota(hub, "d2", "m2")
    status = _status(hub, ro)
    assert status["state"] == "rolled_back" and "every device in the canary (2) refused" in status["reason"]
    statuses = hub.model_statuses()
    assert statuses == {"m1": "active", "m2": "retired"}
    assert all(_assign(hub, d).active.version == "m1" for d in ("d1", "d2"))  # type: ignore[union-attr]


def test_a_promotion_completes_after_its_hold_and_overrides_are_recorded(hub_factory: Any) -> None:
    hub: HubHarness = hub_factory(promote_hold_s=300)
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    hub.register_model("m2", seed=1)
    r = hub.client.post("/v1/models/m2/promote", headers=hub.admin)
    assert r.json()["status"] == "canary" and r.json()["rollout"]["stage_seconds"] == 300
    again = hub.client.post("/v1/models/m2/promote", headers=hub.admin)
    assert again.status_code == 409 and "already rolling out" in again.json()["detail"]
    hub.clock.advance(301)
    _assign(hub, "d1")
    statuses = hub.model_statuses()
    assert statuses == {"m1": "retired", "m2": "active"}
    hub.register_model("m3", seed=2)
    r = hub.client.post("/v1/models/m3/promote", headers=hub.admin, json={"override": True, "reason": "CVE fix"})
    assert r.json()["status"] == "active"
    listed = RolloutList.from_json(hub.client.get("/v1/rollouts", headers=hub.trainer).content).rollouts
    assert [(x.version, x.kind, x.state) for x in listed] == [
        ("m3", "override", "running"), ("m2", "promotion", "completed")]
    assert listed[0].reason == "admin override by bootstrap-admin: CVE fix"


def test_a_new_rollout_or_promotion_ends_an_overrides_watch(hub: HubHarness) -> None:
    hub.register_model("m2", seed=1)
    hub.register_model("m3", seed=2)
    hub.register_model("m4", seed=3)
    r = hub.client.post("/v1/models/m2/promote", headers=hub.admin, json={"override": True, "reason": "a"})
    first = r.json()["rollout"]
    r = hub.client.post("/v1/models/m3/promote", headers=hub.admin, json={"override": True, "reason": "b"})
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    assert _status(hub, first)["state"] == "completed" and "watch ended: m3" in _status(hub, first)["reason"]
    ro = _rollout(hub, "m4", stages=[0.5, 1.0])  # the trainer's staged rollout is not blocked either
    assert ro["incumbent"] == "m3"


def _hb_predicted(hub: HubHarness, device: str, version: str, counts: list[int], *, none: int = 0,
                  boot: str = "b1") -> None:
    """A heartbeat that carries the active model's prediction histogram (cumulative since it became active)."""
    body = {"device_id": device, "sent_at": hub.clock(), "boot_id": boot, "model_version": version,
            "counters": {"frames_seen": sum(counts) + none, "flagged": 1},
            "predicted_version": version, "predicted_counts": counts, "predicted_none": none}
    r = hub.client.post("/v1/heartbeats", json=body, headers=hub.devices[device])
    assert r.status_code == 204, r.text


@pytest.mark.parametrize("shifted", [True, False])
def test_a_shift_in_the_prediction_distribution_rolls_a_canary_back_with_no_human(hub_factory: Any,
                                                                                    shifted: bool) -> None:
    """Neither humans nor a shadow model: the canary's only evidence is what it predicts. A candidate that puts
    most frames in class 0 where the incumbent spreads them evenly rolls back; one within the margin does not."""
    hub = hub_factory()
    hub.register_model("m1", promote=True)
    devices = _fleet(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, stages=[0.5, 1.0])
    canary = [d for d in devices if _assign(hub, d).active.version == "m2"]  # type: ignore[union-attr]
    for d in devices:
        if d in canary:
            _hb_predicted(hub, d, "m2", [50, 5, 5] if shifted else [24, 19, 17], none=0)
        else:
            _hb_predicted(hub, d, "m1", [20, 20, 20])
    status = hub.client.get(f"/v1/rollouts/{ro['rollout_id']}", headers=hub.trainer).json()
    if not shifted:
        assert status["state"] == "running", status["reason"]
        return
    assert status["state"] == "rolled_back", status
    reason = status["reason"]
    assert reason.startswith("prediction distribution shifted from the incumbent's: total variation 0.500 > margin")
    assert "Pearson chi-square test of homogeneity" in reason and "no human needed" in reason
    assert hub.model_statuses() == {"m1": "active", "m2": "retired"}


def test_prediction_histograms_count_per_version_and_restart_with_a_new_model(hub: HubHarness) -> None:
    from sqlmodel import Session, select

    from fleet.hub.models import PredictionCount

    hub.enroll("d9")
    _hb_predicted(hub, "d9", "m1", [3, 1])
    _hb_predicted(hub, "d9", "m1", [5, 2], none=4)  # cumulative: +2, +1, +4
    with Session(hub.hub.engine) as s:
        got = {(r.version, r.label): r.count for r in s.exec(select(PredictionCount)
                                                            .where(PredictionCount.scope == "all")).all()}
    assert got == {("m1", "0"): 5, ("m1", "1"): 2, ("m1", "none"): 4}
    body = {"device_id": "d9", "sent_at": hub.clock(), "boot_id": "b1", "model_version": "m1",
            "predicted_counts": [1] * 1001}
    r = hub.client.post("/v1/heartbeats", json=body, headers=hub.devices["d9"])
    assert r.status_code == 422 and "predicted_counts" in r.text


def test_a_device_another_worker_enrolled_is_counted_when_it_asks(hub: HubHarness) -> None:
    """Another hub worker enrolled the newcomers: this worker's stage does not know them until one asks."""
    _fleet(hub, 4)
    hub.register_model("m2", seed=1)
    _rollout(hub, stages=[0.5, 1.0])
    for d in _enrolled(hub):
        _assign(hub, d)
    stale = dict(rollouts._THRESHOLDS)
    late = [f"late-{i}" for i in range(6)]
    for d in late:
        hub.enroll(d)
    rollouts._THRESHOLDS.update(stale)  # this worker did not see the enrollments
    got = {d for d in late + _enrolled(hub) if _assign(hub, d).active.version == "m2"}  # type: ignore[union-attr]
    assert got == _expected_canary(hub, "m2", 0.5)
