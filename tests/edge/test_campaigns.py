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
from tests.edge.conftest import bank, client
from tests.support.inproc import InProcHub

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


def test_trigger_state_survives_a_restart(tmp_path: Path, hub: InProcHub) -> None:
    camps = Campaigns(client(hub), tmp_path)
    (live,) = camps.apply([ref(CALIBRATED)])
    for seed in range(5):
        decide(window(64, seed), [live], device_id="d")
    seen = live.evaluator.calibrators["entropy"].seen
    threshold = live.evaluator.calibrators["entropy"].threshold
    assert seen == 320
    camps.save_state()
    again = Campaigns(client(hub), tmp_path)
    (restored,) = again.apply([ref(CALIBRATED)])
    assert restored.evaluator.calibrators["entropy"].seen == seen
    assert restored.evaluator.calibrators["entropy"].threshold == pytest.approx(threshold)


def test_same_campaign_keeps_its_evaluator_and_a_new_version_replaces_it(tmp_path: Path, hub: InProcHub) -> None:
    camps = Campaigns(client(hub), tmp_path)
    (a,) = camps.apply([ref(CALIBRATED)])
    (b,) = camps.apply([ref(CALIBRATED)])
    assert a is b
    (c,) = camps.apply([ref(dict(CALIBRATED, version=2))])
    assert c is not a and c.version == 2
    assert (tmp_path / "cal-v1.state.json").exists()  # the retired version's state was kept
    assert camps.apply([]) == ()


def test_one_version_in_another_form_is_rebuilt_keeping_what_matches(tmp_path: Path, hub: InProcHub) -> None:
    """The hub sends a campaign version without its learned leaf to a device running another model than the leaf
    was fitted for (a canary), and with it once the device runs that model again: each form is its own evaluator,
    and the triggers both forms share keep their calibration and budgets across the swaps."""
    full = {"id": "two", "version": 3, "rule": {"any_of": [
        {"trigger": "entropy", "target_rate": 0.1}, {"trigger": "margin", "label": "learned", "below": 0.2}]},
        "budgets": {"global": {"rate_per_s": 1, "burst": 10}, "per_trigger": {
            "entropy": {"rate_per_s": 0.5, "burst": 5}, "learned": {"rate_per_s": 0.5, "burst": 5}}}}
    stripped = {**full, "rule": {"trigger": "entropy", "target_rate": 0.1},
                "budgets": {"global": {"rate_per_s": 1, "burst": 10},
                            "per_trigger": {"entropy": {"rate_per_s": 1, "burst": 10}}}}
    camps = Campaigns(client(hub), tmp_path)
    (a,) = camps.apply([ref(full)])
    assert sorted(a.evaluator.calibrators) == ["entropy"] and "learned" in a.evaluator.fired_counts
    for seed in range(3):
        decide(window(64, seed), [a], device_id="d")
    seen = a.evaluator.calibrators["entropy"].seen
    (b,) = camps.apply([ref(stripped)])
    assert b is not a and "learned" not in b.evaluator.fired_counts
    assert b.evaluator.calibrators["entropy"].seen == seen  # carried over by label
    decide(window(64, 7), [b], device_id="d")
    (c,) = camps.apply([ref(full)])
    assert c is not a and "learned" in c.evaluator.fired_counts
    assert c.evaluator.calibrators["entropy"].seen == seen + 64
    assert camps.apply([ref(full)]) == (c,)  # the same form again keeps its evaluator


def test_expired_and_invalid_campaigns_are_left_out(tmp_path: Path, hub: InProcHub,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    camps = Campaigns(client(hub), tmp_path, clock=lambda: 1000.0)
    bad = {"id": "bad", "version": 1, "rule": {"trigger": "margin", "above": "high"}}
    with caplog.at_level(logging.ERROR):
        live = camps.apply([ref(CALIBRATED, expires_at=999.0), ref(bad), ref(dict(CALIBRATED, id="ok"))])
    assert [c.campaign_id for c in live] == ["ok"]
    assert "refusing campaign bad v1 from the hub" in caplog.text


def test_novelty_bank_is_downloaded_verified_and_cached(tmp_path: Path, hub: InProcHub,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    seen = rng.normal(0, 0.1, (50, 8)).astype(np.float32)
    seen[:, 0] += 1.0  # everything the bank knows points one way ...
    sha = bank(hub, seen)["sha256"]  # built by the hub from labeled cases with these embeddings
    camps = Campaigns(client(hub), tmp_path)
    (live,) = camps.apply([ref(NOVELTY, novelty_bank="bank-1", novelty_bank_sha256=sha)])
    new = rng.normal(0, 0.1, (16, 8)).astype(np.float32)
    new[:, 0] -= 1.0  # ... and these frames the other way
    result = decide(window(16, embedding=new), [live], device_id="d")
    assert len(result.captures) == 16
    assert all([h.name for h in c.fields["triggers"]] == ["novelty"] for c in result.captures)
    assert all(0.5 < c.fields["scores"]["novelty"] <= 2.0 for c in result.captures)
    # a second device start reuses the cached file
    before = len(hub.requests())
    Campaigns(client(hub), tmp_path).apply([ref(NOVELTY, novelty_bank="bank-1", novelty_bank_sha256=sha)])
    assert len(hub.requests()) == before
    # a bank whose bytes do not match the assignment's hash is refused
    with caplog.at_level(logging.ERROR):
        live2 = Campaigns(client(hub), tmp_path / "other").apply(
            [ref(dict(NOVELTY, version=2), novelty_bank="bank-1", novelty_bank_sha256="ab" * 32)])
    assert live2 == () and "sha256" in caplog.text


def test_local_default_spec_must_be_valid(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="triggers.default_spec is not a valid trigger spec"):
        Campaigns(None, tmp_path, default_spec={"id": "x", "version": 1, "rule": {"trigger": "nope"}})
    camps = Campaigns(None, tmp_path, default_spec=json.loads(json.dumps(CALIBRATED)))
    assert [c.key for c in camps.current] == ["cal-local"]


def test_assigned_campaigns_resume_at_start_even_offline(tmp_path: Path, hub: InProcHub) -> None:
    Campaigns(client(hub), tmp_path).apply([ref(CALIBRATED), ref(dict(CALIBRATED, id="gone", version=3),
                                                                   expires_at=10.0)])
    hub.faults.add(None, "", "503", times=None)  # the hub is down at the next start
    resumed = Campaigns(client(hub), tmp_path, clock=lambda: 100.0)
    assert [c.key for c in resumed.current] == ["cal-v1"]  # the expired one stays out
    (tmp_path / "assigned.json").write_text("{broken")
    assert Campaigns(client(hub), tmp_path).current == ()


def test_the_recorded_assignment_keeps_its_model_and_reads_the_older_list(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """assigned.json holds the assignment's model beside its campaigns (a learned leaf runs only on that model);
    a file from before, a bare list of campaigns, still resumes them; a model that is no name is refused whole."""
    Campaigns(None, tmp_path).apply([ref(CALIBRATED)], "m7")
    doc = json.loads((tmp_path / "assigned.json").read_text())
    assert doc["model_version"] == "m7" and [c["campaign_id"] for c in doc["campaigns"]] == ["cal"]
    (tmp_path / "assigned.json").write_text(json.dumps(doc["campaigns"]))
    assert [c.key for c in Campaigns(None, tmp_path).current] == ["cal-v1"]
    (tmp_path / "assigned.json").write_text(json.dumps({"model_version": 7, "campaigns": doc["campaigns"]}))
    with caplog.at_level(logging.WARNING):
        assert Campaigns(None, tmp_path).current == ()
    assert "model_version must be a string or null; received 7" in caplog.text


def scaled_window(n: int, seed: int, *, version: str, scale: float) -> list[Inferred]:
    """A window from model ``version`` whose logits have spread ``scale`` (small: unsure, high entropy)."""
    from fleet.edge.ota import LoadedModels

    [w] = window(n, seed)
    models = LoadedModels()
    object.__setattr__(models, "active", type("M", (), {"version": version})())
    w.models, w.logits = models, (w.logits / 2.0 * scale).astype(np.float32)
    return [w]


def fire_rate(camps: Campaigns, version: str, scale: float, seeds: range) -> float:
    camps.use_model(version)
    kept = n = 0
    for seed in seeds:
        result = decide(scaled_window(64, seed, version=version, scale=scale), camps.current, device_id="d")
        kept, n = kept + len(result.captures), n + 64
    return kept / n


def test_calibrated_thresholds_follow_the_model_across_an_ota_and_a_rollback(tmp_path: Path, hub: InProcHub) -> None:
    """A threshold fitted to one model's entropies means nothing for another's: after an OTA to a confident
    model (low entropies), triggers fitted to the unsure one would never fire again."""
    spec = {"id": "cal", "version": 1, "rule": {"trigger": "entropy", "target_rate": 0.1}}
    camps = Campaigns(client(hub), tmp_path)
    (live,) = camps.apply([ref(spec)])
    assert fire_rate(camps, "v1", 0.5, range(0, 40)) == pytest.approx(0.1, abs=0.03)
    v1_threshold = live.evaluator.calibrators["entropy"].threshold
    from trigger import entropy, softmax

    v2_entropy = np.concatenate([entropy(softmax(scaled_window(64, s, version="v2", scale=6.0)[0].logits))
                                 for s in range(40, 80)])
    assert (v2_entropy > v1_threshold).mean() < 0.02  # v1's threshold on v2's scores: next to nothing fires
    # OTA to v2: the triggers calibrate on v2's own scores and hold the target rate
    assert fire_rate(camps, "v2", 6.0, range(40, 80)) == pytest.approx(0.1, abs=0.03)
    assert live.evaluator.calibrators["entropy"].threshold < v1_threshold
    # rollback to v1: its thresholds come back at once (no warm-up, no drift towards v2's)
    camps.use_model("v1")
    assert live.evaluator.calibrators["entropy"].threshold == pytest.approx(v1_threshold, rel=0.01)
    assert fire_rate(camps, "v1", 0.5, range(80, 100)) == pytest.approx(0.1, abs=0.04)

    # and across a restart: both models' calibration is on disk
    camps.use_model("v2")
    v2_threshold = live.evaluator.calibrators["entropy"].threshold
    camps.save_state()
    again = Campaigns(client(hub), tmp_path)
    (restored,) = again.apply([ref(spec)])
    again.use_model("v2")
    assert restored.evaluator.calibrators["entropy"].threshold == pytest.approx(v2_threshold, rel=0.01)
    again.use_model("v1")
    assert restored.evaluator.calibrators["entropy"].threshold == pytest.approx(v1_threshold, rel=0.01)


def test_budgets_and_dedup_memory_carry_over_a_model_change(tmp_path: Path, hub: InProcHub) -> None:
    spec = {"id": "b", "version": 1, "rule": {"trigger": "entropy", "above": -1.0},
            "budgets": {"global": {"rate_per_day": 0, "burst": 10}}}
    camps = Campaigns(client(hub), tmp_path)
    camps.apply([ref(spec)])
    camps.use_model("v1")
    first = decide(scaled_window(64, 0, version="v1", scale=1.0), camps.current, device_id="d")
    camps.use_model("v2")
    second = decide(scaled_window(64, 1, version="v2", scale=1.0), camps.current, device_id="d")
    assert len(first.captures) == 10 and len(second.captures) == 0  # the budget spent under v1 stays spent
