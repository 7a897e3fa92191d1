"""Device groups with their own model (fleet.hub.rollouts, issue 19.4): a rollout aimed at one group, the group's
pinned model across fleet model versions and a hub restart, a group canary rolled back on that group only, and a
shadow trial on a group that promotes to a canary of that group; both backends."""

from __future__ import annotations

from typing import Any

from fleet.hub import rollouts
from fleet.hub.db import read_session
from fleet.hub.models import Rollout
from fleet.protocol import Assignment, GroupList, RolloutPublic, ShadowPublic
from tests.hub.conftest import HubHarness


def _groups(hub: HubHarness, north: int = 8, south: int = 24) -> tuple[list[str], list[str]]:
    ns = [f"n{i}" for i in range(north)]
    ss = [f"s{i}" for i in range(south)]
    for d in ns:
        hub.enroll(d, group="cam-north")
    for d in ss:
        hub.enroll(d, group="cam-south")
    return ns, ss


def _runs(hub: HubHarness, device: str) -> tuple[str | None, str | None]:
    """(active, challenger) in the device's assignment."""
    r = hub.client.get("/v1/assignment", headers=hub.devices[device])
    assert r.status_code == 200, r.text
    a = Assignment.from_json(r.content)
    return (a.active.version if a.active else None), (a.challenger.version if a.challenger else None)


def _rollout(hub: HubHarness, version: str, stages: list[float], group: str | None = None) -> RolloutPublic:
    r = hub.client.post("/v1/rollouts", json={"version": version, "stages": stages, "group": group},
                        headers=hub.trainer)
    assert r.status_code == 201, r.text
    return RolloutPublic.from_json(r.content)


def _advance(hub: HubHarness, ro: RolloutPublic) -> RolloutPublic:
    r = hub.client.post(f"/v1/rollouts/{ro.rollout_id}/advance", headers=hub.trainer)
    assert r.status_code == 200, r.text
    return RolloutPublic.from_json(r.content)


def _group_table(hub: HubHarness) -> dict[str, tuple[int, str | None, bool, str | None]]:
    r = hub.client.get("/v1/groups", headers=hub.labeler)
    assert r.status_code == 200, r.text
    return {g.group: (g.devices, g.model, g.pinned, g.rollout_id) for g in GroupList.from_json(r.content).groups}


def _canary_size(hub: HubHarness, rollout_id: str) -> int:
    with read_session(hub.hub.engine) as s:
        row = s.get(Rollout, rollout_id)
        assert row is not None
        return rollouts.canary_size(hub.hub, s, row)


def test_a_group_runs_its_own_model_across_fleet_versions_and_a_restart(hub: HubHarness, hub_factory: Any) -> None:
    north, south = _groups(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, "m2", [0.5, 1.0], group="cam-south")
    assert (ro.group, ro.incumbent, ro.state) == ("cam-south", "m1", "running")
    assert hub.model_statuses()["m2"] == "candidate"  # a group's canary is not the fleet's
    canary = [d for d in south if _runs(hub, d) == ("m2", "m1")]
    held = [d for d in south if _runs(hub, d) == ("m1", None)]
    assert canary and held and len(canary) + len(held) == len(south)
    assert _canary_size(hub, ro.rollout_id) == len(canary)
    assert {_runs(hub, d) for d in north + ["d1"]} == {("m1", None)}  # other groups never see it
    again = hub.client.post("/v1/rollouts", json={"version": "m2", "group": "cam-south"}, headers=hub.trainer)
    assert again.status_code == 409 and "still running on group 'cam-south'" in again.text

    # a fleet-wide rollout at the same time: every device but cam-south's
    hub.register_model("m3", seed=2)
    fleet = _rollout(hub, "m3", [1.0])
    assert fleet.group is None and _canary_size(hub, fleet.rollout_id) == len(north) + 1
    assert {_runs(hub, d) for d in north} == {("m3", "m1")}
    assert {_runs(hub, d) for d in canary} == {("m2", "m1")}

    done = _advance(hub, _advance(hub, ro))
    assert done.state == "completed"
    table = _group_table(hub)
    assert table["cam-south"] == (len(south), "m2", True, None)
    assert table["cam-north"] == (len(north), "m1", False, fleet.rollout_id)
    assert _advance(hub, fleet).state == "completed"
    assert hub.model_statuses() == {"m1": "retired", "m2": "candidate", "m3": "active"}
    assert {_runs(hub, d) for d in north + ["d1"]} == {("m3", None)}
    assert {_runs(hub, d) for d in south} == {("m2", None)}  # pinned: not in the fleet's rollout

    # a second fleet version: the group still keeps its own model, and so does a restarted hub
    hub.register_model("m4", seed=3)
    assert _advance(hub, _rollout(hub, "m4", [1.0])).state == "completed"
    restarted = hub_factory()
    restarted.devices.update(hub.devices)
    assert {_runs(restarted, d) for d in south} == {("m2", None)}
    assert {_runs(restarted, d) for d in north} == {("m4", None)}
    r = restarted.client.delete("/v1/groups/cam-south/model", headers=restarted.admin)
    assert r.status_code == 200 and r.json()["model"] == "m4" and r.json()["pinned"] is False, r.text
    assert {_runs(restarted, d) for d in south} == {("m4", None)}
    gone = restarted.client.delete("/v1/groups/cam-south/model", headers=restarted.admin)
    assert gone.status_code == 404 and "no model of its own" in gone.text


def test_a_failing_group_canary_rolls_back_on_that_group_only(hub: HubHarness) -> None:
    north, south = _groups(hub)
    hub.register_model("m2", seed=1)
    ro = _rollout(hub, "m2", [1.0], group="cam-south")
    for device in north[:3]:  # not assigned m2: their reports count for nothing
        body = {"device_id": device, "version": "m2", "outcome": "rolled_back", "reason": "NaN logits",
                "previous_version": "m1", "reported_at": hub.clock()}
        assert hub.client.post("/v1/ota-reports", json=body, headers=hub.devices[device]).status_code == 204
    status = RolloutPublic.from_json(hub.client.get(f"/v1/rollouts/{ro.rollout_id}", headers=hub.trainer).content)
    assert status.state == "running"
    for device in south[:3]:
        body = {"device_id": device, "version": "m2", "outcome": "rolled_back", "reason": "NaN logits",
                "previous_version": "m1", "reported_at": hub.clock()}
        assert hub.client.post("/v1/ota-reports", json=body, headers=hub.devices[device]).status_code == 204
    status = RolloutPublic.from_json(hub.client.get(f"/v1/rollouts/{ro.rollout_id}", headers=hub.trainer).content)
    assert status.state == "rolled_back" and "from 3 devices" in (status.reason or ""), status.reason
    assert hub.model_statuses() == {"m1": "active", "m2": "retired"}
    assert {_runs(hub, d) for d in north + south} == {("m1", None)}
    assert _group_table(hub)["cam-south"] == (len(south), "m1", False, None)


def test_a_shadow_trial_on_a_group_with_its_own_model_becomes_that_groups_canary(hub: HubHarness) -> None:
    north, south = _groups(hub, 4, 4)
    hub.register_model("m2", seed=1)
    assert _advance(hub, _rollout(hub, "m2", [1.0], group="cam-south")).state == "completed"
    hub.register_model("m3", seed=2)
    r = hub.client.post("/v1/shadows", json={"version": "m3", "group": "cam-south", "frames": 40}, headers=hub.admin)
    assert r.status_code == 201, r.text
    trial = ShadowPublic.from_json(r.content)
    assert trial.incumbent == "m2"  # beside the group's own model, not the fleet's
    assert {_runs(hub, d) for d in south} == {("m2", "m3")} and {_runs(hub, d) for d in north} == {("m1", None)}
    for d in south[:2]:
        body = {"device_id": d, "sent_at": hub.clock(), "boot_id": "b1", "model_version": "m2",
                "challenger_version": "m3", "counters": {"frames_seen": 30}, "challenger_compared": 30,
                "challenger_agreed": 27}
        assert hub.client.post("/v1/heartbeats", json=body, headers=hub.devices[d]).status_code == 204
    r = hub.client.post(f"/v1/shadows/{trial.trial_id}/promote", json={"stages": [1.0]}, headers=hub.admin)
    assert r.status_code == 201, r.text
    canary = RolloutPublic.from_json(r.content)
    assert (canary.group, canary.incumbent) == ("cam-south", "m2")
    assert {_runs(hub, d) for d in south} == {("m3", "m2")} and {_runs(hub, d) for d in north} == {("m1", None)}
    assert _advance(hub, canary).state == "completed"
    table = _group_table(hub)
    assert table["cam-south"][1:3] == ("m3", True) and table["cam-north"][1:3] == ("m1", False)
    listed = GroupList.from_json(hub.client.get("/v1/groups", headers=hub.labeler).content).groups
    assert [g.previous for g in listed if g.group == "cam-south"] == ["m2"]
    # the fleet's active model may run in shadow beside a group's own model
    r = hub.client.post("/v1/shadows", json={"version": "m1", "group": "cam-south", "frames": 10}, headers=hub.admin)
    assert r.status_code == 201 and r.json()["incumbent"] == "m3", r.text


def test_bad_group_requests_are_refused_and_change_nothing(hub: HubHarness) -> None:
    _groups(hub, 2, 2)
    hub.register_model("m2", seed=1)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"version": "m2", "group": "cam south!"}, 422, "group"),
        ({"version": "m1", "group": "cam-south"}, 409, "runs 'm1' already"),
        ({"version": "nope", "group": "cam-south"}, 404, "nope"),
        ({"version": "m2", "group": "cam-south", "stages": [0.5, 0.2]}, 422, "stages"),
    ]
    for body, status, words in cases:
        r = hub.client.post("/v1/rollouts", json=body, headers=hub.trainer)
        assert r.status_code == status and words in r.text, (body, r.text)
    r = hub.client.get("/v1/rollouts", headers=hub.trainer)
    assert r.json()["rollouts"] == []
    assert hub.client.delete("/v1/groups/cam-south/model", headers=hub.admin).status_code == 404
    assert hub.client.delete("/v1/groups/cam-south/model", headers=hub.trainer).status_code == 403
    assert hub.client.get("/v1/groups", headers=hub.devices["s0"]).status_code == 403

    ro = _advance(hub, _rollout(hub, "m2", [1.0], group="cam-south"))
    hub.register_model("m3", seed=2)
    _rollout(hub, "m3", [0.5, 1.0], group="cam-south")
    busy = hub.client.delete("/v1/groups/cam-south/model", headers=hub.admin)
    assert busy.status_code == 409 and "is running on group 'cam-south'" in busy.text
    pinned = hub.client.post("/v1/models/m2/retire", headers=hub.admin)
    assert pinned.status_code == 409 and "cam-south" in pinned.text
    assert _group_table(hub)["cam-south"][1:3] == ("m2", True) and ro.state == "completed"
