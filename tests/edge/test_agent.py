from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from fleet.edge.agent import Agent
from fleet.edge.config import AgentConfig, config_from_dict
from fleet.edge.sources import Frame
from fleet.errors import InvalidInput, RetryableError
from fleet.inference.runtime import ModelRuntime, Outputs
from fleet.protocol import Enrollment, decode_embedding
from tests.edge.conftest import DEVICE, Keys, assign, client, publish
from tests.support.faults import replaced
from tests.support.inproc import InProcHub

KEEP_ALL = {"id": "all", "version": 1, "rule": {"trigger": "entropy", "above": -1.0}}
DISAGREE = {"id": "disagree", "version": 2, "rule": {"trigger": "human_disagreement", "above": 0.5}}


CASE_PATHS = r"^/v1/cases(/batch)?$"


def campaign(spec: dict[str, Any]) -> dict[str, Any]:
    """A campaign as an assignment carries it (fleet.protocol.CampaignRef)."""
    return {"campaign_id": spec["id"], "version": spec["version"], "spec": spec}


def stored(hub: InProcHub) -> list[tuple[Any, bytes]]:
    """(case, PNG) of every case the hub stored."""
    return [(case, hub.image(case)) for case in hub.cases().values()]


def frames(n: int, *, seed: int = 0, shape: tuple[int, ...] = (8, 8)) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [
        Frame(image=rng.integers(0, 256, shape, dtype=np.uint8), frame_id=f"f{i}", human_action=i % 3,
              tags={"condition": "night" if i % 2 else "day"}, ts=1_700_000_000.0 + i)
        for i in range(n)
    ]


def make_agent(tmp_path: Path, hub: InProcHub, keys: Keys, source: list[Frame], **sections: dict[str, Any]) -> Agent:
    doc: dict[str, Any] = {
        "device_id": DEVICE, "data_dir": "data", "hub": {"url": "http://hub.test"},
        "source": {"kind": "npz", "path": "unused.npz"},
        "heartbeat": {"interval_s": 0.05}, "ota": {"poll_interval_s": 0.05},
        "uplink": {"backoff_base_s": 0.02, "backoff_max_s": 0.1, "drain_timeout_s": 5.0},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    cfg: AgentConfig = config_from_dict(doc, base_dir=tmp_path)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    enrollment = Enrollment(device_id=DEVICE, token=hub.tokens[DEVICE], fleet_public_key=keys.public_b64)
    (cfg.data_dir / "enrollment.json").write_text(enrollment.to_json())
    return Agent(cfg, client=client(hub), source=source)


def test_full_loop_spools_and_uploads_cases_with_full_context(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                             make_model) -> None:
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    agent = make_agent(tmp_path, hub, keys, frames(40), runtime={"batch_size": 4})
    summary = agent.run()
    agent.close()
    assert summary.stopped_by == "source-ended" and summary.frames == 40
    assert summary.flagged == 40 and summary.uploaded == 40 and summary.spool_items == 0
    assert len(hub.cases()) == 40
    reference = ModelRuntime(v1.onnx_path, v1.manifest)
    for case, png in stored(hub):
        assert case.model_version == "v1" and case.campaign_id == "all" and case.campaign_version == 1
        assert case.device_id == "dev-1" and case.triggers[0].name == "entropy"
        assert case.triggers[0].threshold == -1.0
        assert case.human_action is not None and case.human_action.label in (0, 1, 2)
        assert case.tags["condition"] in ("day", "night")
        assert case.captured_at >= 1_700_000_000.0
        assert set(case.scores) >= {"entropy", "margin", "energy"}
        emb = decode_embedding(case.embedding or "")
        assert emb.shape == (16,)
        assert 0 < case.priority <= 1 and abs(sum(case.prediction.probs or []) - 1) < 1e-6
        img = np.asarray(Image.open(io.BytesIO(png)))
        out = reference.run([img])
        assert int(np.argmax(out.logits[0])) == case.prediction.label
    beats = hub.heartbeats()
    assert beats and beats[-1].counters["frames_seen"] == 40 and beats[-1].counters["uploaded"] == 40
    assert beats[-1].human_compared == 40 and beats[-1].latency_p95_ms >= beats[-1].latency_p50_ms > 0
    # trigger state was saved for the next start
    assert (tmp_path / "data" / "campaigns" / "all-v1.state.json").exists()


def test_challenger_runs_in_shadow_and_is_never_acted_on(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                         make_model) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    hub.rollout("v2", [1.0])  # the canary (every device) runs v2 and keeps v1 in shadow
    agent = make_agent(tmp_path, hub, keys, frames(30))
    summary = agent.run()
    agent.close()
    assert (summary.model_version, summary.challenger_version) == ("v2", "v1")
    r1, r2 = ModelRuntime(v1.onnx_path, v1.manifest), ModelRuntime(v2.onnx_path, v2.manifest)
    imgs = [f.image for f in frames(30)]
    p1 = np.argmax(r1.run(imgs).logits, axis=1)
    p2 = np.argmax(r2.run(imgs).logits, axis=1)
    assert (p1 != p2).any()  # the two models do disagree somewhere
    by_ts = {round(c.captured_at - 1_700_000_000.0): c for c in hub.cases().values()}
    for i, case in by_ts.items():
        assert case.prediction.label == p2[i]  # what the device acts on comes from the active model only
        assert case.challenger is not None
        assert case.challenger.version == "v1" and case.challenger.prediction.label == p1[i]
    hb = hub.heartbeats()[-1]
    assert hb.challenger_version == "v1" and hb.challenger_compared == 30
    assert hb.challenger_agreed == int((p1 == p2).sum())
    assert hb.human_disagreed == int((p2 != np.arange(30) % 3).sum())
    metrics = hub.field_metrics("v1")  # the hub counts the shadow's agreement for the version the device ran
    assert metrics["challenger_compared"] == 0 and hub.field_metrics("v2")["challenger_compared"] == 30


def test_human_disagreement_campaign_keeps_only_disagreements(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                              make_model) -> None:
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    assign(hub, v1, campaigns=(DISAGREE,))
    agent = make_agent(tmp_path, hub, keys, frames(60))
    summary = agent.run()
    agent.close()
    assert 0 < summary.flagged < 60
    for case in hub.cases().values():
        assert case.human_action is not None and case.human_action.label != case.prediction.label
        assert [t.name for t in case.triggers] == ["human_disagreement"]
    assert summary.flagged == hub.heartbeats()[-1].human_disagreed


def test_any_frame_size_and_channels_go_through(tmp_path: Path, hub: InProcHub, keys: Keys, make_model) -> None:
    v1 = make_model("v1", channels=3, height=12, width=12)
    publish(hub, v1)
    spec = dict(KEEP_ALL, dedup={"max_hamming": 0, "memory": 64})
    assign(hub, v1, campaigns=(spec,))
    mixed = frames(6, shape=(20, 30)) + frames(6, seed=1, shape=(9, 9, 3)) + frames(6, seed=2, shape=(5, 7, 4))
    agent = make_agent(tmp_path, hub, keys, mixed, runtime={"batch_size": 5})
    summary = agent.run()
    agent.close()
    assert summary.frames == 18 and summary.uploaded == summary.flagged > 0


def test_hub_down_during_the_run_then_back_loses_nothing(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                         make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    down = hub.faults.add("POST", r"^/v1/(cases|cases/batch|heartbeats)$", "refuse", times=None)
    agent = make_agent(tmp_path, hub, keys, frames(25), uplink={"drain_timeout_s": 0.2})
    first = agent.run()
    agent.close()
    assert first.frames == 25 and first.uploaded == 0 and first.spool_items == 25
    hub.faults.remove(down)  # the hub is back: the next start delivers what was spooled
    agent = make_agent(tmp_path, hub, keys, [])
    second = agent.run()
    agent.close()
    assert second.uploaded == 25 and second.spool_items == 0
    assert len(hub.cases()) == 25 and len(hub.case_posts()) == 25


def test_a_restarted_agent_goes_on_where_its_npz_source_left_off(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                                 make_model) -> None:
    """Issue 13: the npz source restarted at frame 0 after every restart, so the same frames were flagged again."""
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    images = np.random.default_rng(3).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "frames.npz", images=images, tag_frame=np.array([f"x{i:02d}" for i in range(30)]))

    def run(**kw: Any) -> Any:
        import dataclasses

        agent = make_agent(tmp_path, hub, keys, [], runtime={"batch_size": 4})
        agent.source = None  # read the npz file itself, as `flywheel agent run` does
        agent.config = dataclasses.replace(agent.config, source=dataclasses.replace(
            agent.config.source, path=tmp_path / "frames.npz"))
        try:
            return agent.run(**kw)
        finally:
            agent.close()

    first = run(max_frames=12)
    assert first.frames == 12 and len(hub.cases()) == 12
    second = run()
    assert second.frames == 18 and second.stopped_by == "source-ended"
    tags = sorted(case.tags["frame"] for case in hub.cases().values())
    assert tags == [f"x{i:02d}" for i in range(30)]  # each frame flagged exactly once
    assert run().frames == 0  # nothing left in this file
    np.savez(tmp_path / "frames.npz", images=images[:5], tag_frame=np.array([f"y{i}" for i in range(5)]))
    assert run().frames == 5  # another file at the same path starts from its first frame
    assert (tmp_path / "data" / "source_cursor.json").stat().st_mode & 0o777 == 0o600


def test_full_spool_evicts_and_the_heartbeat_counts_it(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                       make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    hub.faults.add("POST", CASE_PATHS, "503", times=None)
    agent = make_agent(tmp_path, hub, keys, frames(200, shape=(64, 64)), spool={"max_bytes": 65536},
                       uplink={"drain_timeout_s": 0.0})
    summary = agent.run()
    stats = agent.spool.check()
    agent.close()
    assert summary.evicted > 0 and stats.bytes <= 65536
    assert stats.offered == 200 == stats.items + stats.evicted
    assert hub.heartbeats()[-1].counters["evicted"] == summary.evicted
    assert hub.heartbeats()[-1].spool_bytes == stats.bytes


def test_nan_in_service_rolls_back_to_the_previous_model(tmp_path: Path, hub: InProcHub, keys: Keys, make_model,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    for m in (v1, v2):
        assign(hub, m)
        agent = make_agent(tmp_path, hub, keys, frames(2))
        agent.run()
        agent.close()
    assert agent.ota.models.versions[0] == "v2"

    import fleet.edge.agent as agent_module

    real = agent_module.infer

    def v2_goes_bad(frames_: list[Frame], models: Any, *args: Any, **kwargs: Any) -> Any:
        if models.active.version == "v2":  # in service, v2 starts returning NaN
            infer = models.active.infer
            models.active.infer = lambda t, **kw: Outputs(logits=infer(t).logits * np.nan, embedding=infer(t).embedding)
        return real(frames_, models, *args, **kwargs)

    monkeypatch.setattr(agent_module, "infer", v2_goes_bad)  # in the agent's thread: a patch cannot reach a child
    agent = make_agent(tmp_path, hub, keys, frames(20),
                       runtime={"batch_size": 2, "trigger_window": 2, "inference": "thread"})
    summary = agent.run()
    agent.close()
    assert summary.model_version == "v1"
    assert [(r.version, r.outcome) for r in hub.ota_reports()][-1] == ("v2", "rolled_back")
    assert "NaN or infinite outputs in 3 consecutive windows" in hub.ota_reports()[-1].reason
    assert hub.heartbeats()[-1].counters["health_failures"] == 3
    assert hub.heartbeats()[-1].counters["frames_seen"] == 20


def test_malformed_assignment_during_a_run_is_refused_and_logged(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                                make_model, caplog: pytest.LogCaptureFixture) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    assign(hub, v1)
    agent = make_agent(tmp_path, hub, keys, frames(4))
    agent.run()
    agent.close()
    hub.faults.add("GET", "^/v1/assignment$", "answer", times=None, json={  # a hub answering off the contract
        "device_id": "dev-1", "active": {"version": "v9", "onnx_sha256": "nothex"}})
    agent = make_agent(tmp_path, hub, keys, frames(4))
    with caplog.at_level(logging.ERROR):
        summary = agent.run()
    agent.close()
    assert summary.model_version == "v1" and summary.frames == 4
    assert "refusing malformed assignment from the hub" in caplog.text
    assert "onnx_sha256 must be 64 lowercase hex characters" in caplog.text


def test_bad_campaign_is_refused_and_the_rest_run(tmp_path: Path, hub: InProcHub, keys: Keys, make_model,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    bad = {"id": "bad", "version": 1, "rule": {"trigger": "entropyy", "above": 0.1}}
    assign(hub, v1, campaigns=(KEEP_ALL,))
    with pytest.raises(AssertionError, match="invalid trigger spec"):  # the hub refuses it ...
        hub.campaign(bad)

    def with_bad(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = json.loads(response.content)
        body["campaigns"].insert(0, campaign(bad))
        return replaced(response, content=json.dumps(body).encode())

    hub.faults.add("GET", "^/v1/assignment$", "edit", times=None, edit=with_bad)  # ... yet one reaches the device
    agent = make_agent(tmp_path, hub, keys, frames(5))
    with caplog.at_level(logging.ERROR):
        summary = agent.run()
    agent.close()
    assert summary.flagged == 5
    assert "refusing campaign bad v1 from the hub" in caplog.text and "entropyy" in caplog.text


def test_local_default_spec_applies_without_campaigns(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                      make_model) -> None:
    v1 = make_model("v1")
    publish(hub, v1)
    assign(hub, v1)
    (tmp_path / "spec.json").write_text(json.dumps(KEEP_ALL))
    agent = make_agent(tmp_path, hub, keys, frames(5), triggers={"default_spec": "spec.json"})
    summary = agent.run(max_frames=3)
    agent.close()
    assert summary.stopped_by == "max-frames" and summary.frames == 3 and summary.uploaded == 3
    case = next(iter(hub.cases().values()))
    assert case.campaign_id == "all" and case.campaign_version is None


def test_trigger_calibration_is_kept_per_model_across_an_ota(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                            make_model) -> None:
    calibrated = {"id": "cal", "version": 1, "rule": {"trigger": "entropy", "target_rate": 0.2}}
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    runs = [(v1, 96), (v2, 2), (v2, 96)]  # a run on v1; the hub assigns v2, which the agent takes by OTA
    for m, n in runs:
        assign(hub, m, campaigns=(calibrated,))
        agent = make_agent(tmp_path, hub, keys, frames(n), runtime={"batch_size": 8, "trigger_window": 32})
        summary = agent.run()
        agent.close()
    assert summary.model_version == "v2"
    state = json.loads((tmp_path / "data" / "campaigns" / "cal-v1.state.json").read_text())
    assert state["model_version"] == "v2"
    v1_seen, v2_seen = state["calibration_by_model"]["v1"]["entropy"]["seen"], state["calibrators"]["entropy"]["seen"]
    assert v1_seen >= 96 and v2_seen >= 96 and v1_seen + v2_seen == 194  # each model's calibrator saw its own


def test_sync_at_start_follows_the_hub_before_the_first_frame(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                              make_model) -> None:
    """An agent that ran v1 restarts after the hub moved the fleet to v2: with ``ota.sync_at_start`` it polls and
    takes v2 before it reads a frame, so no case of the new run is captured by the replaced model."""
    v1, v2 = make_model("v1", seed=1), make_model("v2", seed=2)
    publish(hub, v1)
    publish(hub, v2)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    first = make_agent(tmp_path, hub, keys, frames(8), runtime={"batch_size": 4})
    assert first.run().model_version == "v1"
    first.close()
    assign(hub, v2)
    events: list[str] = []

    def source() -> Any:
        for i, f in enumerate(frames(24, seed=5)):
            events.append("frame")
            yield Frame(image=f.image, frame_id=f"n{i}", human_action=f.human_action, tags={**f.tags, "frame": f"n{i}"},
                        ts=f.ts)

    agent = make_agent(tmp_path, hub, keys, [], runtime={"batch_size": 4},
                       ota={"poll_interval_s": 3600.0, "sync_at_start": True})
    agent.source = source()
    polled = agent.client.get_assignment

    def logged_poll() -> Any:
        events.append("poll")
        return polled()

    agent.client.get_assignment = logged_poll  # type: ignore[method-assign]
    summary = agent.run()
    agent.close()
    assert events[0] == "poll" and events.count("frame") == 24
    assert summary.model_version == "v2" and summary.frames == 24
    new = [c for c in hub.cases().values() if c.tags.get("frame", "").startswith("n")]
    assert len(new) == 24 and {c.model_version for c in new} == {"v2"}


def test_sync_at_start_must_be_a_boolean(tmp_path: Path) -> None:
    doc = {"device_id": DEVICE, "hub": {"url": "http://hub.test"}, "source": {"kind": "npz", "path": "x.npz"},
           "ota": {"sync_at_start": "yes"}}
    with pytest.raises(InvalidInput, match=r"ota\.sync_at_start must be .*; received 'yes'"):
        config_from_dict(doc, base_dir=tmp_path)


def test_sync_at_start_with_the_hub_down_mines_with_the_stored_model(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                                    make_model) -> None:
    """The start-up poll fails (the hub cannot be reached): the agent does not wait for it, it mines every frame
    with the model it stored."""
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    first = make_agent(tmp_path, hub, keys, frames(8), runtime={"batch_size": 4})
    assert first.run().model_version == "v1"
    first.close()
    agent = make_agent(tmp_path, hub, keys, frames(12, seed=7), runtime={"batch_size": 4},
                       ota={"poll_interval_s": 3600.0, "sync_at_start": True})

    def down() -> Any:
        raise RetryableError("hub unreachable: connection refused")

    agent.client.get_assignment = down  # type: ignore[method-assign]
    summary = agent.run()
    agent.close()
    assert summary.model_version == "v1" and summary.frames == 12 and summary.uploaded == 12
    assert len(hub.cases()) == 20 and {c.model_version for c in hub.cases().values()} == {"v1"}
