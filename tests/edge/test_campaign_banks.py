"""A device never scores novelty against another model's bank, nor its frames with a learned leaf fitted for
another model: the real hub (in-process, SQLite and PostgreSQL) assigns each campaign the bank and the leaf of the
device's model, and the device follows them across an OTA, a fallback, a restart and a rollback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.edge.campaigns import Campaigns
from fleet.edge.hubclient import HubClient
from fleet.edge.ota import LoadedModels
from fleet.edge.shadow import Inferred, WindowResult, decide
from fleet.edge.sources import Frame
from fleet.protocol import Assignment
from tests.hub.conftest import (  # noqa: F401 - the hub's fixtures: a real hub on each database
    HubHarness,
    backend,
    database_url,
    hub_factory,
    keypair,
    pg_template,
    sqlite_template,
)
from trigger import NoveltyBank

NOVELTY = {"id": "novel", "version": 1, "rule": {"trigger": "novelty", "k": 3, "above": 0.5}}
DIM = 16  # the test models' embedding width


def direction(axis: int, n: int, seed: int) -> np.ndarray:
    """``(n, DIM)`` embeddings around the unit vector on ``axis``."""
    x = np.random.default_rng(seed).normal(0, 0.1, (n, DIM)).astype(np.float32)
    x[:, axis] += 1.0
    return x


def window(version: str, embedding: np.ndarray, logits: np.ndarray | None = None) -> list[Inferred]:
    """A window of frames from model ``version`` with these embeddings (only the version of the model is read)."""
    n = len(embedding)
    rng = np.random.default_rng(n)
    models = LoadedModels()
    object.__setattr__(models, "active", type("M", (), {"version": version})())
    frames = [Frame(image=rng.integers(0, 256, (8, 8), dtype=np.uint8), frame_id=str(i)) for i in range(n)]
    logits = rng.normal(0, 1, (n, 3)).astype(np.float32) if logits is None else logits
    return [Inferred(frames=frames, models=models, logits=logits, embedding=embedding, challenger_logits=None,
                     latency_ms=1.0, seen_at=1.0)]


class Device:
    """The part of an agent that follows assignments: campaigns first, then the model swap (control thread),
    then every window switches the campaigns to the model that inferred it (decider thread)."""

    def __init__(self, hub: HubHarness, tmp: Path) -> None:
        hub.enroll("dev")
        token = hub.devices["dev"]["Authorization"].removeprefix("Bearer ")
        self.client = HubClient(hub.client, token=token)
        self.campaigns = Campaigns(self.client, tmp / "agent")
        self.running: str | None = None

    def poll(self) -> Assignment:
        a = self.client.get_assignment()
        self.campaigns.apply(a.campaigns, a.active.version if a.active is not None else None)
        return a

    def follow(self) -> Assignment:
        a = self.poll()
        assert a.active is not None
        self.running = a.active.version  # the OTA swap
        return a

    def run(self, embedding: np.ndarray, logits: np.ndarray | None = None) -> WindowResult:
        assert self.running is not None
        self.campaigns.use_model(self.running)
        with self.campaigns.lock:
            return decide(window(self.running, embedding, logits), self.campaigns.current, device_id="dev")

    def bank(self) -> NoveltyBank | None:
        """The bank the live novelty campaign scores against (None: the campaign is paused)."""
        live = [c for c in self.campaigns.current if c.campaign_id == "novel"]
        return live[0].evaluator.bank if live else None


def put_bank(hub: HubHarness, version: str, bank: NoveltyBank) -> None:
    r = hub.client.put(f"/v1/models/{version}/novelty-bank", content=bank.to_bytes(),
                       headers={**hub.trainer, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text


def novelty_of(result: WindowResult) -> list[float]:
    return [c.fields["scores"]["novelty"] for c in result.captures]


@pytest.fixture
def hub(hub_factory: Any) -> HubHarness:  # noqa: F811 - the fixture imported above
    """The real hub, in-process, with model v1 active."""
    h: HubHarness = hub_factory()
    h.register_model("v1", promote=True)
    return h


def test_novelty_follows_the_model_across_an_ota_and_a_rollback(hub: HubHarness, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    bank_v1 = NoveltyBank.from_embeddings(direction(0, 60, seed=1))  # v1 saw everything along axis 0
    bank_v2 = NoveltyBank.from_embeddings(direction(1, 60, seed=2))  # v2 embeds the same data along axis 1
    put_bank(hub, "v1", bank_v1)
    r = hub.client.post("/v1/campaigns", json={"spec": NOVELTY, "novelty_bank": "model-v1"}, headers=hub.admin)
    assert r.status_code == 201, r.text
    device = Device(hub, tmp_path)
    frames = direction(2, 24, seed=3)  # what the device sees: new to both banks

    # v1 runs with v1's bank: the novelty it scores is the distance to v1's bank
    device.follow()
    result = device.run(frames)
    assert device.bank() is not None and device.bank().sha256 == bank_v1.sha256  # type: ignore[union-attr]
    assert novelty_of(result) == pytest.approx(bank_v1.distance(frames, k=3).tolist())
    assert len(result.captures) == 24

    # OTA to v2, which has no bank yet: the campaign is paused, nothing is scored against v1's bank
    hub.register_model("v2", seed=2, promote=True)
    with caplog.at_level(logging.WARNING, logger="fleet.edge.campaigns"):
        a = device.follow()
        device.follow()  # the next poll waits too, without a second log line
    (ref,) = a.campaigns
    assert (ref.novelty_bank, ref.novelty_bank_version) == (None, "v2")
    assert caplog.text.count("the hub has no novelty bank for model v2 yet") == 1
    result = device.run(frames)
    assert device.bank() is None and result.captures == [] and device.campaigns.current == ()

    # v2's bank arrives with the next assignment: novelty in v2's space
    put_bank(hub, "v2", bank_v2)
    device.follow()
    result = device.run(frames)
    assert device.bank().sha256 == bank_v2.sha256  # type: ignore[union-attr]
    assert novelty_of(result) == pytest.approx(bank_v2.distance(frames, k=3).tolist())

    # the device falls back to v1 on its own (a failed health check): v2's bank stops at once
    device.running = "v1"
    assert device.run(frames).captures == [] and device.bank() is None
    device.running = "v2"
    assert device.run(frames).captures and device.bank().sha256 == bank_v2.sha256  # type: ignore[union-attr]

    # the fleet rolls back to v1: the assignment brings v1's bank, which waits until v1 runs again
    r = hub.client.post("/v1/models/rollback", json={"reason": "test"}, headers=hub.admin)
    assert r.status_code == 200 and r.json()["active"] == "v1", r.text
    a = device.poll()  # the control thread took the assignment; the swap has not happened yet
    assert (a.campaigns[0].novelty_bank, a.campaigns[0].novelty_bank_version) == ("model-v1", "v1")
    assert device.run(frames).captures == []  # v2 still runs: v1's bank is not used on its embeddings
    device.follow()
    result = device.run(frames)
    assert device.bank().sha256 == bank_v1.sha256  # type: ignore[union-attr]
    assert novelty_of(result) == pytest.approx(bank_v1.distance(frames, k=3).tolist())


def test_a_new_bank_for_the_same_campaign_rebuilds_it(hub: HubHarness, tmp_path: Path) -> None:
    put_bank(hub, "v1", NoveltyBank.from_embeddings(direction(0, 30, seed=1)))
    assert hub.client.post("/v1/campaigns", json={"spec": NOVELTY}, headers=hub.admin).status_code == 201
    device = Device(hub, tmp_path)
    device.follow()
    before = device.campaigns.current
    rebuilt = NoveltyBank.from_embeddings(direction(1, 30, seed=2))
    r = hub.client.put("/v1/models/v1/novelty-bank", content=rebuilt.to_bytes(),
                       headers={**hub.trainer, "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    device.follow()
    device.run(direction(2, 4, seed=3))
    assert device.campaigns.current != before and device.bank().sha256 == rebuilt.sha256  # type: ignore[union-attr]


def test_budgets_carry_over_when_the_bank_changes_with_the_model(hub: HubHarness, tmp_path: Path) -> None:
    """The campaign rebuilt with v2's bank is the same campaign: what v1 spent of its budget stays spent."""
    spec = {"id": "novel", "version": 1, "rule": {"trigger": "novelty", "k": 3, "above": 0.0},
            "budgets": {"global": {"rate_per_day": 0, "burst": 10}}}
    put_bank(hub, "v1", NoveltyBank.from_embeddings(direction(0, 30, seed=1)))
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    device = Device(hub, tmp_path)
    device.follow()
    assert len(device.run(direction(2, 24, seed=3)).captures) == 10
    hub.register_model("v2", seed=2)
    bank_v2 = NoveltyBank.from_embeddings(direction(1, 30, seed=2))
    put_bank(hub, "v2", bank_v2)
    r = hub.client.post("/v1/models/v2/promote", json={"override": True, "reason": "test"}, headers=hub.admin)
    assert r.status_code == 200, r.text
    device.follow()
    result = device.run(direction(2, 24, seed=4))
    assert device.bank().sha256 == bank_v2.sha256  # type: ignore[union-attr]
    assert result.captures == []  # live on v2's bank, with the budget v1 spent


def test_the_learned_trigger_with_the_bank_feature_runs_on_the_device(hub: HubHarness, tmp_path: Path) -> None:
    """The hub fits ``learned_error_knn`` on v1's labeled cases against v1's own bank (with labels); the device
    gets the leaf and that bank with its assignment and scores its frames with them: the values the agent's
    decision path records are the hub's logistic model over the device's features."""
    from fleet.hub.learned import KNN_K
    from fleet.protocol import LearnedFit, TriggerHit
    from fleet.protocol.base import decode_embedding
    from trigger import TRIGGERS, softmax
    from trigger.triggers import Inputs

    labeled = np.concatenate([direction(0, 30, seed=1), direction(1, 30, seed=2)])
    put_bank(hub, "v1", NoveltyBank.from_embeddings(labeled, labels=np.repeat([0, 1], 30)))
    spec = {"id": "learn", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    device = Device(hub, tmp_path)
    rng = np.random.default_rng(5)
    truth = {}
    for i in range(60):  # the model says class 0, sure of it; frames along axis 1 are class 1
        y = i % 2
        case, image = hub.make_case("dev", model_version="v1", probs=[0.9, 0.06, 0.04], campaign_id="learn",
                                    campaign_version=1, embedding=direction(y, 1, seed=100 + i)[0],
                                    triggers=[TriggerHit("unsure", 0.5, 0.1)])
        assert hub.post_case(case, image).status_code == 201
        truth[case.case_id] = y
    cases = hub.client.post("/v1/selections", json={"budget": 100, "strategy": "random"},
                            headers=hub.labeler).json()["cases"]
    for c in cases:
        assert hub.label(c["case"]["case_id"], truth[c["case"]["case_id"]]).status_code in (200, 201)
    r = hub.client.post("/v1/campaigns/learn/learn", params={"target_rate": 0.5}, headers=hub.admin)
    assert r.status_code == 201, r.text
    assert "neighbours_other" in LearnedFit.from_json(r.content).weights

    device.follow()
    (live,) = device.campaigns.current
    assert live.evaluator.bank is not None and live.evaluator.bank.sha256 == NoveltyBank.from_embeddings(
        labeled, labels=np.repeat([0, 1], 30)).sha256
    frames = np.concatenate([direction(0, 12, seed=7), direction(1, 12, seed=8)])
    logits = np.tile(np.log(np.asarray([[0.9, 0.06, 0.04]], np.float32)), (24, 1)) + rng.normal(0, 0.01, (24, 3))
    result = device.run(frames, logits.astype(np.float32))
    leaf = next(x for x in live.evaluator.spec.leaves if x.label == "learned_error")
    assert leaf.trigger == "learned_error_knn" and leaf.params["k"] == KNN_K
    probs = softmax(logits.astype(np.float32))
    want = TRIGGERS["learned_error_knn"].compute(
        Inputs(logits=logits, probs=probs, embeddings=frames, bank=live.evaluator.bank), None, leaf.params)
    got = {}
    for c in result.captures:  # which frame: the one whose embedding the case carries
        i = int(np.argmin(np.abs(frames - decode_embedding(c.fields["embedding"])).sum(axis=1)))
        got[i] = c.fields["scores"]["learned_error"]
    assert got and all(got[i] == pytest.approx(want[i], abs=1e-5) for i in got)
    assert set(got) == set(range(24))  # every frame fires the plain entropy leaf, so every value is seen
    # the frames that look like class 1 but are called 0 are the likely errors
    assert min(got[i] for i in range(12, 24)) > 0.5 > max(got[i] for i in range(12))


def _learned_leaf(device: Device) -> dict[str, Any] | None:
    """The parameters of the learned leaf the live campaign runs (None: the campaign runs without one)."""
    (live,) = device.campaigns.current
    leaves = [x.params for x in live.evaluator.spec.leaves if x.trigger == "learned_error"]
    return leaves[0] if leaves else None


def test_a_learned_leaf_runs_only_on_the_model_it_was_fitted_for(hub: HubHarness, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The hub sends a campaign with the leaf fitted for the model the same assignment makes active. Between
    taking that assignment and the OTA swap, after a fallback to the old model, and after a restart in that
    state, the campaign is parked: the old model's outputs are never scored with the new model's weights. A
    rollback brings back the first model's own leaf, again only once that model runs."""
    from fleet.protocol import TriggerHit

    spec = {"id": "learn", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    device = Device(hub, tmp_path)
    rng = np.random.default_rng(3)

    def send_and_label(version: str, campaign_version: int, wrong: Any) -> None:
        truth = {}
        for _ in range(40):
            top = float(rng.uniform(0.35, 0.98))
            human = int(rng.integers(0, 3)) if rng.random() < 0.5 else None
            case, image = hub.make_case("dev", model_version=version, probs=[top, (1 - top) * 0.6, (1 - top) * 0.4],
                                        campaign_id="learn", campaign_version=campaign_version, human=human,
                                        triggers=[TriggerHit("unsure", 0.5, 0.1)])
            assert hub.post_case(case, image).status_code == 201
            truth[case.case_id] = 1 if wrong(top, human) else 0
        for c in hub.client.post("/v1/selections", json={"budget": 100, "strategy": "random"},
                                 headers=hub.labeler).json()["cases"]:
            assert hub.label(c["case"]["case_id"], truth[c["case"]["case_id"]]).status_code in (200, 201)

    send_and_label("v1", 1, lambda top, human: top < 0.6)  # v1 is wrong where it is unsure
    assert hub.client.post("/v1/campaigns/learn/learn", params={"target_rate": 0.2},
                           headers=hub.admin).status_code == 201
    frames = direction(0, 24, seed=5)
    device.follow()
    v1_leaf = _learned_leaf(device)
    assert v1_leaf is not None and v1_leaf["w_least_confidence"] > 1.0
    assert device.run(frames).captures

    # v2 active, no labels of its own yet: the campaign comes without a leaf and runs on either model
    hub.register_model("v2", seed=2, promote=True)
    a = device.poll()  # the control thread took the assignment; the swap has not happened yet
    assert a.active is not None and a.active.version == "v2" and _learned_leaf(device) is None
    assert device.run(frames).captures  # v1 still runs, the leafless campaign with it

    # v2's labels come in and the hub refits for v2: while v1 still runs, the campaign with v2's leaf is parked
    send_and_label("v2", a.campaigns[0].version, lambda top, human: human not in (None, 0))
    with caplog.at_level(logging.INFO, logger="fleet.edge.campaigns"):
        a = device.poll()
        assert device.run(frames).captures == [] and device.campaigns.current == ()
    assert "its learned leaf was fitted for model v2, the device runs v1" in caplog.text
    # ... and after a restart in that state, from the recorded assignment, before any hub call
    restarted = Campaigns(None, tmp_path / "agent")
    restarted.use_model("v1")
    assert restarted.current == ()
    restarted.use_model("v2")
    (ref,) = restarted.current
    assert (ref.campaign_id, ref.version, ref.leaf_version) == ("learn", a.campaigns[0].version, "v2")

    device.follow()  # the swap: v2 runs its own leaf
    assert device.run(frames).captures
    v2_leaf = _learned_leaf(device)
    assert v2_leaf is not None and v2_leaf != v1_leaf and v2_leaf["w_human"] > 1.0
    device.running = "v1"  # the device falls back to v1 on its own (a failed health check): parked at once
    assert device.run(frames).captures == [] and device.campaigns.current == ()
    device.running = "v2"
    assert device.run(frames).captures and _learned_leaf(device) == v2_leaf

    # the fleet rolls back to v1: the hub refits v1's leaf from v1's cases, which waits until v1 runs again
    r = hub.client.post("/v1/models/rollback", json={"reason": "test"}, headers=hub.admin)
    assert r.status_code == 200 and r.json()["active"] == "v1", r.text
    device.poll()
    assert device.run(frames).captures == [] and device.campaigns.current == ()
    device.follow()
    assert device.run(frames).captures and _learned_leaf(device) == v1_leaf
