"""Campaigns (trigger specs validated by ``trigger``), versioned, expiring, aimed at groups; novelty banks."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fleet.protocol import Assignment, CampaignList
from tests.hub.conftest import HubHarness


def spec(cid: str = "rare", version: int = 1, expires: str | None = "2030-01-01T00:00:00Z",
         **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": "flywheel.trigger/1", "id": cid, "version": version,
                           "rule": {"any_of": [{"trigger": "entropy", "target_rate": 0.02},
                                               {"trigger": "human_disagreement"}]}}
    if expires is not None:
        doc["expires_at"] = expires
    doc.update(kw)
    return doc


def _campaigns(hub: HubHarness, device: str) -> list[tuple[str, int]]:
    a = Assignment.from_dict(hub.client.get("/v1/assignment", headers=hub.devices[device]).json())
    return [(c.campaign_id, c.version) for c in a.campaigns]


def test_campaign_crud_versions_and_groups(hub: HubHarness) -> None:
    hub.enroll("night-1", group="night")
    r = hub.client.post("/v1/campaigns", json=spec(), headers=hub.admin)
    assert r.status_code == 201, r.text
    assert r.json()["campaign_id"] == "rare" and r.json()["version"] == 1
    assert _campaigns(hub, "d1") == [("rare", 1)]
    r = hub.client.post("/v1/campaigns", json={"spec": spec("fog", 1), "groups": ["night"]}, headers=hub.admin)
    assert r.status_code == 201
    assert _campaigns(hub, "d1") == [("rare", 1)]
    assert _campaigns(hub, "night-1") == [("fog", 1), ("rare", 1)]
    assert hub.client.post("/v1/campaigns", json=spec(version=2), headers=hub.admin).status_code == 201
    assert _campaigns(hub, "d1") == [("rare", 2)]
    listing = CampaignList.from_json(hub.client.get("/v1/campaigns", headers=hub.admin).content).campaigns
    assert [(c.campaign_id, c.version) for c in listing] == [("fog", 1), ("rare", 2)]
    assert len(hub.client.get("/v1/campaigns/rare", headers=hub.admin).json()["versions"]) == 2
    assert hub.client.delete("/v1/campaigns/rare", headers=hub.admin).status_code == 200
    assert _campaigns(hub, "d1") == []
    assert hub.client.delete("/v1/campaigns/rare", headers=hub.admin).status_code == 404


def test_same_version_is_idempotent_changed_or_older_conflicts(hub: HubHarness) -> None:
    assert hub.client.post("/v1/campaigns", json=spec(version=2), headers=hub.admin).status_code == 201
    r = hub.client.post("/v1/campaigns", json=spec(version=2), headers=hub.admin)
    assert r.status_code == 200 and r.json()["already"] is True
    changed = spec(version=2, rule={"trigger": "margin", "below": 0.1})
    assert hub.client.post("/v1/campaigns", json=changed, headers=hub.admin).status_code == 409
    assert hub.client.post("/v1/campaigns", json=spec(version=1), headers=hub.admin).status_code == 409


def test_expired_campaigns_are_not_assigned(hub: HubHarness) -> None:
    r = hub.client.post("/v1/campaigns", json=spec(expires="2020-01-01T00:00:00Z"), headers=hub.admin)
    assert r.status_code == 422 and "expired" in r.json()["detail"]
    soon = hub.clock() + 100
    assert hub.client.post("/v1/campaigns", json=spec(expires=None) | {"expires_at": soon},
                           headers=hub.admin).status_code == 201
    assert _campaigns(hub, "d1") == [("rare", 1)]
    hub.clock.advance(101)
    assert _campaigns(hub, "d1") == []


def test_invalid_specs_are_refused_with_the_trigger_message(hub: HubHarness) -> None:
    for doc, needle in [
        (spec(rule={"trigger": "telepathy"}), "telepathy"),
        (spec(cid="../../etc"), "id"),
        (spec(format="flywheel.trigger/99"), "format"),
        ([1, 2], "object"),
    ]:
        r = hub.client.post("/v1/campaigns", json=doc, headers=hub.admin)
        assert r.status_code == 422, (doc, r.text)
        assert needle in r.json()["detail"], r.json()["detail"]
    r = hub.client.post("/v1/campaigns", json={"spec": spec(), "groups": ["../x"]}, headers=hub.admin)
    assert r.status_code == 422
    r = hub.client.post("/v1/campaigns", json={"spec": spec(), "novelty_bank": "missing"}, headers=hub.admin)
    assert r.status_code == 422 and "novelty bank" in r.json()["detail"]
    assert hub.client.post("/v1/campaigns", json=spec(), headers=hub.devices["d1"]).status_code == 403
    assert hub.client.get("/v1/campaigns", headers=hub.admin).json()["campaigns"] == []


def test_novelty_bank_from_labeled_embeddings_is_served_to_devices(hub: HubHarness) -> None:
    from trigger import NoveltyBank

    rng = np.random.default_rng(0)
    for i in range(12):
        cid = hub.send_case("d1", embedding=rng.normal(size=16).astype(np.float32))
        if i < 8:
            hub.label(cid, i % 3)
    r = hub.client.post("/v1/novelty-banks", json={"bank_id": "bank-m1"}, headers=hub.admin)
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["n"] == 8 and meta["dim"] == 16 and meta["model_version"] == "m1"
    data = hub.client.get("/v1/novelty-banks/bank-m1", headers=hub.devices["d1"])
    assert data.status_code == 200 and hashlib.sha256(data.content).hexdigest() == meta["sha256"]
    path = hub.tmp / "bank.npz"
    path.write_bytes(data.content)
    bank = NoveltyBank.load(path)
    assert len(bank) == 8
    r = hub.client.post("/v1/campaigns", json={"spec": spec(), "novelty_bank": "bank-m1"}, headers=hub.admin)
    assert r.status_code == 201
    a = Assignment.from_dict(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).json())
    assert a.campaigns[0].novelty_bank == "bank-m1" and a.campaigns[0].novelty_bank_sha256 == meta["sha256"]
    assert hub.client.post("/v1/novelty-banks", json={"bank_id": "bank-m1"}, headers=hub.admin).status_code == 409
    assert hub.client.get("/v1/novelty-banks/nope", headers=hub.devices["d1"]).status_code == 404


def test_novelty_bank_needs_labeled_embeddings(hub: HubHarness) -> None:
    r = hub.client.post("/v1/novelty-banks", headers=hub.admin)
    assert r.status_code == 409 and "no labeled cases" in r.json()["detail"]
