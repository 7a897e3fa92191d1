"""A device that cannot run a campaign version tells the hub why (``POST /v1/campaign-refusals``), and an operator
reads it (``GET /v1/campaigns/{id}/refusals``, ``flywheel campaigns refusals``). The device side is the real
``fleet.edge`` client and campaign set against the hub, across two campaign versions and an agent restart; the
fault is a novelty bank that arrives corrupted (it does not hash to what the assignment names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.edge.campaigns import Campaigns
from fleet.edge.hubclient import HubClient
from fleet.errors import NotFound, TransportError
from fleet.protocol import CampaignRefusal, CampaignRefusals
from tests.hub.conftest import HubHarness


def novelty_spec(version: int, above: float) -> dict[str, Any]:
    return {"format": "flywheel.trigger/1", "id": "novel", "version": version,
            "rule": {"trigger": "novelty", "k": 3, "above": above}}


class CorruptingLink(HubClient):
    """The real client, with novelty banks arriving bit-flipped (a proxy or a disk that corrupts them)."""

    def download_novelty_bank(self, bank_id: str, dest: Path, *, max_bytes: int = 64 * 1024 * 1024) -> str:
        super().download_novelty_bank(bank_id, dest, max_bytes=max_bytes)
        raw = bytearray(dest.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        dest.write_bytes(bytes(raw))
        import hashlib

        return hashlib.sha256(raw).hexdigest()


def with_bank(hub: HubHarness) -> None:
    rng = np.random.default_rng(0)
    for i in range(8):
        hub.label(hub.send_case("d1", embedding=rng.normal(size=16).astype(np.float32)), i % 3)
    assert hub.client.post("/v1/novelty-banks", json={"bank_id": "bank-m1"}, headers=hub.admin).status_code == 201


def refusals(hub: HubHarness, campaign: str = "novel") -> CampaignRefusals:
    r = hub.client.get(f"/v1/campaigns/{campaign}/refusals", headers=hub.admin)
    assert r.status_code == 200, r.text
    return CampaignRefusals.from_json(r.content)


def test_a_refused_campaign_reaches_the_hub_across_versions_and_a_restart(hub: HubHarness, tmp_path: Path) -> None:
    with_bank(hub)
    assert hub.client.post("/v1/campaigns", json={"spec": novelty_spec(1, 0.5), "novelty_bank": "bank-m1"},
                           headers=hub.admin).status_code == 201
    agent = CorruptingLink(hub.client, token=hub.devices["d1"]["Authorization"].split()[1])
    camps = Campaigns(agent, tmp_path / "agent")
    assert camps.apply(agent.get_assignment().campaigns) == ()
    assert refusals(hub).refusals == []  # not told yet: the control loop flushes after each poll
    camps.flush_refusals("d1")
    (r,) = refusals(hub).refusals
    assert (r.device_id, r.version, r.times) == ("d1", 1, 1)
    assert "novelty bank bank-m1: sha256" in r.reason and "expected" in r.reason
    camps.flush_refusals("d1")  # nothing new to tell
    assert refusals(hub).refusals[0].times == 1

    # the agent restarts: it resumes the recorded assignment, refuses again, and the hub counts it
    again = Campaigns(agent, tmp_path / "agent")
    again.flush_refusals("d1")
    assert [(x.version, x.times) for x in refusals(hub).refusals] == [(1, 2)]

    # a new version of the campaign: refused too, listed first
    assert hub.client.post("/v1/campaigns", json={"spec": novelty_spec(2, 0.6), "novelty_bank": "bank-m1"},
                           headers=hub.admin).status_code == 201
    again.apply(agent.get_assignment().campaigns)
    again.flush_refusals("d1")
    assert [(x.version, x.device_id, x.times) for x in refusals(hub).refusals] == [(2, "d1", 1), (1, "d1", 2)]

    # an agent whose bank arrives whole runs the campaign and refuses nothing
    whole = HubClient(hub.client, token=hub.devices["d1"]["Authorization"].split()[1])
    fine = Campaigns(whole, tmp_path / "other")
    assert [c.version for c in fine.apply(whole.get_assignment().campaigns)] == [2]
    fine.flush_refusals("d1")
    assert len(refusals(hub).refusals) == 2


class FlakyLink(CorruptingLink):
    """Corrupts the first ``bad`` novelty bank downloads, then delivers them whole; counts the downloads."""

    def __init__(self, *args: Any, bad: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bad, self.downloads = bad, 0

    def download_novelty_bank(self, bank_id: str, dest: Path, *, max_bytes: int = 64 * 1024 * 1024) -> str:
        self.downloads += 1
        if self.downloads <= self.bad:
            return super().download_novelty_bank(bank_id, dest, max_bytes=max_bytes)
        return HubClient.download_novelty_bank(self, bank_id, dest, max_bytes=max_bytes)


def test_a_bank_corrupted_on_the_way_is_fetched_again_later_less_often(hub: HubHarness, tmp_path: Path) -> None:
    """A bank that does not hash right may have been corrupted in transit: the agent fetches it again after 60 s,
    then 120 s, ..., and runs the campaign once it arrives whole; each failed try is a refusal the hub counts."""
    with_bank(hub)
    assert hub.client.post("/v1/campaigns", json={"spec": novelty_spec(1, 0.5), "novelty_bank": "bank-m1"},
                           headers=hub.admin).status_code == 201
    now = [1000.0]
    agent = FlakyLink(hub.client, token=hub.devices["d1"]["Authorization"].split()[1], bad=2)
    camps = Campaigns(agent, tmp_path / "agent", clock=lambda: now[0])
    refs = agent.get_assignment().campaigns
    assert camps.apply(refs) == () and agent.downloads == 1
    now[0] += 59
    assert camps.apply(refs) == () and agent.downloads == 1  # not before 60 s
    camps.flush_refusals("d1")
    (r,) = refusals(hub).refusals
    assert r.times == 1 and "(try 1; fetching it again in 60 s)" in r.reason
    now[0] += 1
    assert camps.apply(refs) == () and agent.downloads == 2  # corrupted again: the next try waits twice as long
    now[0] += 119
    assert camps.apply(refs) == () and agent.downloads == 2
    camps.flush_refusals("d1")
    (r,) = refusals(hub).refusals
    assert r.times == 2 and "(try 2; fetching it again in 120 s)" in r.reason
    now[0] += 1
    assert [c.campaign_id for c in camps.apply(refs)] == ["novel"] and agent.downloads == 3
    now[0] += 10_000
    assert [c.campaign_id for c in camps.apply(refs)] == ["novel"] and agent.downloads == 3  # built: kept
    camps.flush_refusals("d1")
    assert refusals(hub).refusals[0].times == 2


def test_refusals_are_kept_while_the_hub_cannot_be_told(hub: HubHarness, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with_bank(hub)
    hub.client.post("/v1/campaigns", json={"spec": novelty_spec(1, 0.5), "novelty_bank": "bank-m1"},
                    headers=hub.admin)
    agent = CorruptingLink(hub.client, token=hub.devices["d1"]["Authorization"].split()[1])
    camps = Campaigns(agent, tmp_path)
    camps.apply(agent.get_assignment().campaigns)
    sent: list[CampaignRefusal] = []
    real = agent.send_campaign_refusal

    def down(refusal: CampaignRefusal) -> None:
        sent.append(refusal)
        raise TransportError("POST /v1/campaign-refusals: connection refused")

    monkeypatch.setattr(agent, "send_campaign_refusal", down)
    camps.flush_refusals("d1")
    assert len(sent) == 1 and refusals(hub).refusals == []
    monkeypatch.setattr(agent, "send_campaign_refusal", real)
    camps.flush_refusals("d1")  # the link is back: the kept refusal goes through
    assert [x.version for x in refusals(hub).refusals] == [1]

    def old_hub(refusal: CampaignRefusal) -> None:  # a hub from before refusals: the route is not there
        raise NotFound("POST /v1/campaign-refusals: hub answered 404: Not Found")

    monkeypatch.setattr(agent, "send_campaign_refusal", old_hub)
    again = Campaigns(agent, tmp_path)  # a restart refuses again
    again.flush_refusals("d1")
    monkeypatch.setattr(agent, "send_campaign_refusal", real)
    again.flush_refusals("d1")  # dropped, not asked again
    assert refusals(hub).refusals[0].times == 1


def test_bad_refusals_are_refused_naming_what_was_wrong(hub: HubHarness) -> None:
    hub.client.post("/v1/campaigns", json={"spec": {**novelty_spec(1, 0.5), "rule": {"trigger": "entropy",
                                                                                        "above": 0.5}}},
                    headers=hub.admin)
    body = CampaignRefusal(device_id="d1", campaign_id="novel", version=1, reason="no", refused_at=1.0).to_dict()

    def post(doc: dict[str, Any], device: str = "d1") -> Any:
        return hub.client.post("/v1/campaign-refusals", json=doc, headers=hub.devices[device])

    assert post(body).status_code == 204
    r = post({**body, "device_id": "d2"})
    assert r.status_code == 403 and "bound to device 'd1'" in r.text
    r = post({**body, "version": 7})
    assert r.status_code == 404 and "unknown campaign 'novel' v7" in r.text
    assert post({**body, "campaign_id": "nope"}).status_code == 404
    for bad, needle in (({"version": 0}, "version"), ({"reason": "x" * 2001}, "reason"),
                        ({"refused_at": "soon"}, "refused_at"), ({"extra": 1}, "unknown field")):
        r = post({**body, **bad})
        assert r.status_code == 422 and needle in r.text, (bad, r.text)
    assert hub.client.get("/v1/campaigns/novel/refusals", headers=hub.devices["d1"]).status_code == 403
    assert hub.client.get("/v1/campaigns/nope/refusals", headers=hub.admin).status_code == 404
    assert [(x.device_id, x.times) for x in refusals(hub).refusals] == [("d1", 1)]
