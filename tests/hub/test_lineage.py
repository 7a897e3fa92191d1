"""Lineage: a model's snapshot, labels, cases and devices; a case's influence on model versions."""

from __future__ import annotations

from fleet.protocol import CaseInfluence, Classification, ModelLineage
from tests.hub.conftest import HubHarness


def _labeled(hub: HubHarness, device: str, label: int, *, annotator: str) -> str:
    case_id = hub.send_case(device)
    r = hub.label(case_id, label, annotator=annotator)
    assert r.status_code == 200, r.text
    return case_id


def test_lineage_and_influence_follow_the_snapshot(hub: HubHarness) -> None:
    hub.enroll("d2")
    first = [_labeled(hub, "d1", 0, annotator="ann@example.com"), _labeled(hub, "d2", 2, annotator="bob@example.com")]
    r = hub.client.post("/v1/snapshots", json={"name": "first"}, headers=hub.trainer)
    assert r.status_code == 201, r.text
    snap1 = r.json()["snapshot_id"]
    hub.register_model("m2", parent="m1", data_snapshot=f"hub-snapshot:{snap1}")  # as training/report.py names it
    later = _labeled(hub, "d2", 1, annotator="ann@example.com")
    snap2 = hub.client.post("/v1/snapshots", json={}, headers=hub.trainer).json()["snapshot_id"]
    hub.register_model("m3", parent="m2", data_snapshot=snap2)  # a bare snapshot id, as training/cli.py writes it
    unlabeled = hub.send_case("d1")

    r = hub.client.get("/v1/models/m2/lineage", headers=hub.trainer)
    assert r.status_code == 200, r.text
    lin = ModelLineage.from_json(r.content)
    assert (lin.version, lin.parent_version, lin.data_snapshot) == ("m2", "m1", f"hub-snapshot:{snap1}")
    assert lin.snapshot is not None and lin.snapshot.snapshot_id == snap1 and lin.snapshot.n_labels == 2
    assert {e.case_id: (e.device_id, e.label, e.status, e.annotators) for e in lin.entries} == {
        first[0]: ("d1", Classification(0), "accepted", ["ann@example.com"]),
        first[1]: ("d2", Classification(2), "accepted", ["bob@example.com"])}
    assert [(d.device_id, d.cases) for d in lin.devices] == [("d1", 1), ("d2", 1)]
    assert lin.annotators == ["ann@example.com", "bob@example.com"]

    lin3 = ModelLineage.from_json(hub.client.get("/v1/models/m3/lineage", headers=hub.labeler).content)
    assert lin3.snapshot is not None and lin3.snapshot.snapshot_id == snap2
    assert sorted(e.case_id for e in lin3.entries) == sorted([*first, later])
    assert [(d.device_id, d.cases) for d in lin3.devices] == [("d1", 1), ("d2", 2)]

    influence = CaseInfluence.from_json(hub.client.get(f"/v1/cases/{first[0]}/influence", headers=hub.trainer).content)
    assert (influence.versions, influence.snapshots) == (["m2", "m3"], [snap1, snap2])
    influence = CaseInfluence.from_json(hub.client.get(f"/v1/cases/{later}/influence", headers=hub.trainer).content)
    assert (influence.versions, influence.snapshots) == (["m3"], [snap2])
    influence = CaseInfluence.from_json(hub.client.get(f"/v1/cases/{unlabeled}/influence",
                                                       headers=hub.trainer).content)
    assert (influence.versions, influence.snapshots) == ([], [])


def test_a_model_without_hub_data_has_no_snapshot(hub: HubHarness) -> None:
    hub.register_model("m2", parent="m1", data_snapshot="digits@sha256:0123456789abcdef")
    lin = ModelLineage.from_json(hub.client.get("/v1/models/m2/lineage", headers=hub.trainer).content)
    assert (lin.parent_version, lin.data_snapshot, lin.snapshot, lin.entries) == (
        "m1", "digits@sha256:0123456789abcdef", None, [])
    lin = ModelLineage.from_json(hub.client.get("/v1/models/m1/lineage", headers=hub.trainer).content)
    assert (lin.parent_version, lin.data_snapshot, lin.snapshot) == (None, None, None)


def test_lineage_refuses_unknown_names_and_callers(hub: HubHarness) -> None:
    r = hub.client.get("/v1/models/nope/lineage", headers=hub.trainer)
    assert r.status_code == 404 and "unknown model version 'nope'" in r.json()["detail"]
    r = hub.client.get("/v1/cases/nope/influence", headers=hub.trainer)
    assert r.status_code == 404 and "unknown case 'nope'" in r.json()["detail"]
    r = hub.client.get("/v1/cases/bad%20id/influence", headers=hub.trainer)
    assert r.status_code == 422 and "case_id" in r.json()["detail"]
    assert hub.client.get("/v1/models/m1/lineage").status_code == 401
    assert hub.client.get("/v1/models/m1/lineage", headers=hub.devices["d1"]).status_code == 403
