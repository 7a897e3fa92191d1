from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fleet.edge.campaigns import Campaigns
from fleet.edge.shadow import Inferred, decide
from fleet.edge.sources import Frame
from fleet.errors import InvalidInput
from fleet.protocol import CampaignRef
from tests.edge.fakehub import FakeHub

CALIBRATED = {"id": "cal", "version": 1, "rule": {"trigger": "entropy", "target_rate": 0.1}}
NOVELTY = {"id": "novel", "version": 1, "rule": {"trigger": "novelty", "k": 3, "above": 0.5}}


def ref(spec: dict, **kw: object) -> CampaignRef:  # type: ignore[type-arg]
    return CampaignRef(campaign_id=spec["id"], version=spec["version"], spec=spec, **kw)  # type: ignore[arg-type]


def window(n: int, seed: int = 0, embedding: np.ndarray | None = None) -> list[Inferred]:
    rng = np.random.default_rng(seed)
    from fleet.edge.ota import LoadedModels

    models = LoadedModels()
    object.__setattr__(models, "active", type("M", (), {"version": "v1"})())  # only the version is read
    frames = [Frame(image=rng.integers(0, 256, (12, 12), dtype=np.uint8), frame_id=str(i)) for i in range(n)]
    return [Inferred(frames=frames, models=models, logits=rng.normal(0, 2, (n, 3)).astype(np.float32),
                     embedding=rng.normal(0, 1, (n, 8)).astype(np.float32) if embedding is None else embedding,
                     challenger_logits=None,
                     latency_ms=1.0, seen_at=1.0)]


def test_trigger_state_survives_a_restart(tmp_path: Path, hub: FakeHub) -> None:
    camps = Campaigns(hub.client(), tmp_path)
    (live,) = camps.apply([ref(CALIBRATED)])
    for seed in range(5):
        decide(window(64, seed), [live], device_id="d")
    seen = live.evaluator.calibrators["entropy"].seen
    threshold = live.evaluator.calibrators["entropy"].threshold
    assert seen == 320
    camps.save_state()
    again = Campaigns(hub.client(), tmp_path)
    (restored,) = again.apply([ref(CALIBRATED)])
    assert restored.evaluator.calibrators["entropy"].seen == seen
    assert restored.evaluator.calibrators["entropy"].threshold == pytest.approx(threshold)


def test_same_campaign_keeps_its_evaluator_and_a_new_version_replaces_it(tmp_path: Path, hub: FakeHub) -> None:
    camps = Campaigns(hub.client(), tmp_path)
    (a,) = camps.apply([ref(CALIBRATED)])
    (b,) = camps.apply([ref(CALIBRATED)])
    assert a is b
    (c,) = camps.apply([ref(dict(CALIBRATED, version=2))])
    assert c is not a and c.version == 2
    assert (tmp_path / "cal-v1.state.json").exists()  # the retired version's state was kept
    assert camps.apply([]) == ()


def test_expired_and_invalid_campaigns_are_left_out(tmp_path: Path, hub: FakeHub,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    camps = Campaigns(hub.client(), tmp_path, clock=lambda: 1000.0)
    bad = {"id": "bad", "version": 1, "rule": {"trigger": "margin", "above": "high"}}
    with caplog.at_level(logging.ERROR):
        live = camps.apply([ref(CALIBRATED, expires_at=999.0), ref(bad), ref(dict(CALIBRATED, id="ok"))])
    assert [c.campaign_id for c in live] == ["ok"]
    assert "refusing campaign bad v1 from the hub" in caplog.text


def test_novelty_bank_is_downloaded_verified_and_cached(tmp_path: Path, hub: FakeHub,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from trigger import NoveltyBank

    rng = np.random.default_rng(0)
    seen = rng.normal(0, 0.1, (50, 8)).astype(np.float32)
    seen[:, 0] += 1.0  # everything the bank knows points one way ...
    bank = NoveltyBank.from_embeddings(seen)
    data = bank.to_bytes()
    hub.banks["bank-1"] = data
    camps = Campaigns(hub.client(), tmp_path)
    (live,) = camps.apply([ref(NOVELTY, novelty_bank="bank-1", novelty_bank_sha256=bank.sha256)])
    new = rng.normal(0, 0.1, (16, 8)).astype(np.float32)
    new[:, 0] -= 1.0  # ... and these frames the other way
    result = decide(window(16, embedding=new), [live], device_id="d")
    assert len(result.captures) == 16
    assert all([h.name for h in c.fields["triggers"]] == ["novelty"] for c in result.captures)
    assert all(0.5 < c.fields["scores"]["novelty"] <= 2.0 for c in result.captures)
    # a second device start reuses the cached file
    before = len(hub.requests)
    Campaigns(hub.client(), tmp_path).apply([ref(NOVELTY, novelty_bank="bank-1", novelty_bank_sha256=bank.sha256)])
    assert len(hub.requests) == before
    # a bank whose bytes do not match the assignment's hash is refused
    with caplog.at_level(logging.ERROR):
        live2 = Campaigns(hub.client(), tmp_path / "other").apply(
            [ref(dict(NOVELTY, version=2), novelty_bank="bank-1", novelty_bank_sha256="ab" * 32)])
    assert live2 == () and "sha256" in caplog.text


def test_local_default_spec_must_be_valid(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="triggers.default_spec is not a valid trigger spec"):
        Campaigns(None, tmp_path, default_spec={"id": "x", "version": 1, "rule": {"trigger": "nope"}})
    camps = Campaigns(None, tmp_path, default_spec=json.loads(json.dumps(CALIBRATED)))
    assert [c.key for c in camps.current] == ["cal-local"]


def test_assigned_campaigns_resume_at_start_even_offline(tmp_path: Path, hub: FakeHub) -> None:
    Campaigns(hub.client(), tmp_path).apply([ref(CALIBRATED), ref(dict(CALIBRATED, id="gone", version=3),
                                                                   expires_at=10.0)])
    hub.fail = lambda r: 503  # the hub is down at the next start
    resumed = Campaigns(hub.client(), tmp_path, clock=lambda: 100.0)
    assert [c.key for c in resumed.current] == ["cal-v1"]  # the expired one stays out
    (tmp_path / "assigned.json").write_text("{broken")
    assert Campaigns(hub.client(), tmp_path).current == ()
