"""Shadow trials (fleet.hub.shadows): an operator runs a candidate in shadow on one device group for N frames,
reads its field agreement, then promotes it to a canary; both backends."""

from __future__ import annotations

from typing import Any

from fleet.protocol import Assignment, RolloutPublic, ShadowList, ShadowPublic
from tests.hub.conftest import HubHarness


def assignment(hub: HubHarness, device: str) -> Assignment:
    r = hub.client.get("/v1/assignment", headers=hub.devices[device])
    assert r.status_code == 200, r.text
    return Assignment.from_json(r.content)


def heartbeat(hub: HubHarness, device: str, *, challenger: str | None, compared: int, agreed: int,
              active: str = "m1") -> None:
    body = {"device_id": device, "sent_at": hub.clock(), "boot_id": "b1", "model_version": active,
            "challenger_version": challenger, "counters": {"frames_seen": compared},
            "challenger_compared": compared, "challenger_agreed": agreed}
    r = hub.client.post("/v1/heartbeats", json=body, headers=hub.devices[device])
    assert r.status_code == 204, r.text


def trial(hub: HubHarness, trial_id: str) -> ShadowPublic:
    r = hub.client.get(f"/v1/shadows/{trial_id}", headers=hub.trainer)
    assert r.status_code == 200, r.text
    return ShadowPublic.from_json(r.content)


def test_a_shadow_trial_on_one_group_counts_its_agreement_and_promotes_to_a_canary(hub: HubHarness) -> None:
    for dev, group in (("n1", "cam-north"), ("n2", "cam-north"), ("s1", "cam-south")):
        hub.enroll(dev, group=group)
    hub.register_model("m2", seed=1)
    r = hub.client.post("/v1/shadows", json={"version": "m2", "group": "cam-north", "frames": 100},
                        headers=hub.admin)
    assert r.status_code == 201, r.text
    started = ShadowPublic.from_json(r.content)
    assert (started.state, started.incumbent, started.compared) == ("running", "m1", 0)
    # only the group's devices run it in shadow, beside the active model
    assert assignment(hub, "n1").challenger.version == "m2"  # type: ignore[union-attr]
    assert assignment(hub, "n1").active.version == "m1"  # type: ignore[union-attr]
    assert assignment(hub, "s1").challenger is None
    again = hub.client.post("/v1/shadows", json={"version": "m2", "group": "cam-north"}, headers=hub.admin)
    assert again.status_code == 409 and "still running" in again.text
    early = hub.client.post(f"/v1/shadows/{started.trial_id}/promote", json={}, headers=hub.admin)
    assert early.status_code == 409 and "no field comparisons" in early.text

    heartbeat(hub, "n1", challenger="m2", compared=60, agreed=54)
    heartbeat(hub, "s1", challenger="m2", compared=500, agreed=0)  # not in the group: not the trial's evidence
    mid = trial(hub, started.trial_id)
    assert (mid.state, mid.compared, mid.agreed, mid.devices) == ("running", 60, 54, 1)
    heartbeat(hub, "n2", challenger="m2", compared=50, agreed=45)
    done = trial(hub, started.trial_id)
    assert (done.state, done.compared, done.agreed, done.devices) == ("done", 110, 99, 2)
    assert done.agreement == 0.9 and done.reason == "100 frames compared"
    assert assignment(hub, "n1").challenger is None  # the trial is over: the challenger leaves

    r = hub.client.post(f"/v1/shadows/{done.trial_id}/promote", json={"stages": [0.5, 1.0]}, headers=hub.admin)
    assert r.status_code == 201, r.text
    rollout = RolloutPublic.from_json(r.content)
    assert rollout.version == "m2" and rollout.state == "running" and "agreement 0.900 over 110" in (
        rollout.reason or "")
    listed = ShadowList.from_json(hub.client.get("/v1/shadows", headers=hub.labeler).content).trials
    assert [(t.trial_id, t.state, t.rollout_id) for t in listed] == [(done.trial_id, "promoted", rollout.rollout_id)]
    busy = hub.client.post("/v1/shadows", json={"version": "m2", "group": "cam-south"}, headers=hub.admin)
    assert busy.status_code == 409  # m2 is a canary now, and a rollout is running


def test_bad_shadow_trials_are_refused(hub: HubHarness) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"version": "nope"}, 404, "nope"),
        ({"version": "m1"}, 409, "active"),
        ({"version": "m1", "frames": 0}, 422, "frames"),
        ({"group": "x"}, 422, "version"),
    ]
    for body, status, words in cases:
        r = hub.client.post("/v1/shadows", json=body, headers=hub.admin)
        assert r.status_code == status and words in r.text, (body, r.text)
    hub.register_model("m2", seed=1)
    assert hub.client.post("/v1/shadows", json={"version": "m2"}, headers=hub.labeler).status_code == 403
    r = hub.client.post("/v1/shadows", json={"version": "m2"}, headers=hub.admin)
    tid = r.json()["trial_id"]
    assert hub.client.post(f"/v1/shadows/{tid}/cancel", headers=hub.admin).json()["state"] == "cancelled"
    assert assignment(hub, "d1").challenger is None
    assert hub.client.post(f"/v1/shadows/{tid}/cancel", headers=hub.admin).status_code == 409
    assert hub.client.get("/v1/shadows/sh-none", headers=hub.trainer).status_code == 404
