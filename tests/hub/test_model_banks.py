"""Novelty banks per model version: the trainer uploads each model's bank, and every device gets the bank of the
model it is assigned (never another model's), across a canary rollout."""

from __future__ import annotations

import httpx
import numpy as np

from fleet.protocol import Assignment, BankList, BankPublic
from tests.hub.conftest import HubHarness
from trigger import NoveltyBank

NOVELTY = {"id": "novel", "version": 1, "rule": {"trigger": "novelty", "k": 3, "above": 0.5}}
ENTROPY = {"id": "plain", "version": 1, "rule": {"trigger": "entropy", "above": 0.5}}


def bank_bytes(dim: int = 16, *, seed: int = 0, n: int = 40) -> bytes:
    return NoveltyBank.from_embeddings(np.random.default_rng(seed).normal(size=(n, dim))).to_bytes()


def put_bank(hub: HubHarness, version: str, data: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return hub.client.put(f"/v1/models/{version}/novelty-bank", content=data,
                          headers={**(hub.trainer if headers is None else headers),
                                   "Content-Type": "application/octet-stream"})


def assignment(hub: HubHarness, device_id: str) -> Assignment:
    r = hub.client.get("/v1/assignment", headers=hub.devices[device_id])
    assert r.status_code == 200, r.text
    return Assignment.from_json(r.content)


def test_the_trainer_uploads_a_model_s_bank(hub: HubHarness) -> None:
    data = bank_bytes()
    r = put_bank(hub, "m1", data)
    assert r.status_code == 201, r.text
    bank = BankPublic.from_json(r.content)
    assert (bank.bank_id, bank.model_version, bank.dim, bank.n) == ("model-m1", "m1", 16, 40)
    again = put_bank(hub, "m1", data)
    assert again.status_code == 200 and BankPublic.from_json(again.content).sha256 == bank.sha256
    served = hub.client.get("/v1/novelty-banks/model-m1", headers=hub.devices["d1"])
    assert served.content == data and served.headers["X-Sha256"] == bank.sha256
    # a rebuilt bank replaces it (PUT), under the same id
    rebuilt = put_bank(hub, "m1", bank_bytes(seed=1, n=30))
    assert rebuilt.status_code == 200 and BankPublic.from_json(rebuilt.content).n == 30
    listed = BankList.from_json(hub.client.get("/v1/novelty-banks", headers=hub.trainer).content).banks
    assert [(b.bank_id, b.n) for b in listed] == [("model-m1", 30)]


def test_a_bank_that_is_not_the_model_s_is_refused(hub: HubHarness) -> None:
    wrong_dim = put_bank(hub, "m1", bank_bytes(dim=8))
    assert wrong_dim.status_code == 400
    assert "dimension 8; model 'm1' has embedding_dim 16" in wrong_dim.json()["detail"]
    garbage = put_bank(hub, "m1", b"PK\x03\x04 not a bank at all")
    assert garbage.status_code == 400 and "not a novelty bank (22 bytes)" in garbage.json()["detail"]
    empty = put_bank(hub, "m1", b"")
    assert empty.status_code == 400 and "no body" in empty.json()["detail"]
    unknown = put_bank(hub, "nope", bank_bytes())
    assert unknown.status_code == 404 and "upload the model before" in unknown.json()["detail"]
    # only a trainer (or an admin) publishes banks
    for headers in (hub.devices["d1"], hub.labeler):
        assert put_bank(hub, "m1", bank_bytes(), headers).status_code in (401, 403)
    assert hub.client.get("/v1/novelty-banks", headers=hub.trainer).json()["banks"] == []
    # over the size limit, before anything is read
    small = hub.hub.settings.max_bank_bytes
    too_big = put_bank(hub, "m1", b"\0" * (small + 1))
    assert too_big.status_code == 413


def test_each_device_gets_the_bank_of_the_model_it_is_assigned_during_a_canary(hub: HubHarness) -> None:
    devices = [f"dev-{i}" for i in range(16)]
    for d in devices:
        hub.enroll(d)
    m1 = BankPublic.from_json(put_bank(hub, "m1", bank_bytes(seed=1)).content)
    r = hub.client.post("/v1/campaigns", json={"spec": NOVELTY, "novelty_bank": "model-m1"}, headers=hub.admin)
    assert r.status_code == 201, r.text
    assert hub.client.post("/v1/campaigns", json={"spec": ENTROPY}, headers=hub.admin).status_code == 201
    hub.register_model("m2", seed=2)
    r = hub.client.post("/v1/rollouts", json={"version": "m2", "stages": [0.5, 1.0]}, headers=hub.trainer)
    assert r.status_code == 201, r.text

    def banks() -> dict[str, tuple[str, str | None, str | None]]:
        out = {}
        for d in devices:
            a = assignment(hub, d)
            refs = {c.campaign_id: c for c in a.campaigns}
            assert refs["plain"].novelty_bank is None and refs["plain"].novelty_bank_version is None
            assert a.active is not None
            out[d] = (a.active.version, refs["novel"].novelty_bank, refs["novel"].novelty_bank_version)
        return out

    # m2 has no bank yet: canary devices are told to wait for m2's, the others keep m1's
    before = banks()
    canary = {d for d, (active, _, _) in before.items() if active == "m2"}
    assert 0 < len(canary) < len(devices)
    for d, (active, bank, version) in before.items():
        assert (bank, version) == ((None, "m2") if d in canary else ("model-m1", "m1")), (d, active)
    # the trainer uploads m2's bank: canary devices get it, with its hash; the others still m1's
    m2 = BankPublic.from_json(put_bank(hub, "m2", bank_bytes(seed=2)).content)
    for d, (active, bank, version) in banks().items():
        assert (bank, version) == (("model-m2", "m2") if d in canary else ("model-m1", "m1")), (d, active)
    ref = next(c for c in assignment(hub, next(iter(canary))).campaigns if c.campaign_id == "novel")
    assert ref.novelty_bank_sha256 == m2.sha256 != m1.sha256
    # the whole fleet on m2: every device scores novelty in m2's space
    r = hub.client.post(f"/v1/rollouts/{r.json()['rollout_id']}/advance", headers=hub.trainer)
    assert r.status_code == 200, r.text
    assert {v[1:] for v in banks().values()} == {("model-m2", "m2")}


def test_a_novelty_campaign_without_a_bank_uses_the_device_model_s(hub: HubHarness) -> None:
    r = hub.client.post("/v1/campaigns", json={"spec": NOVELTY}, headers=hub.admin)
    assert r.status_code == 201, r.text
    (ref,) = assignment(hub, "d1").campaigns
    assert (ref.novelty_bank, ref.novelty_bank_version) == (None, "m1")  # wait for m1's bank
    put_bank(hub, "m1", bank_bytes())
    (ref,) = assignment(hub, "d1").campaigns
    assert (ref.novelty_bank, ref.novelty_bank_version) == ("model-m1", "m1")
