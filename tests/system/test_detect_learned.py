"""A detector's learned trigger (``learned_box_error_hist``) in the real ``flywheel agent`` across two detector
versions and back: the hub fits one leaf per detector from that detector's labeled box cases, the agent (a
subprocess, against a real hub process on loopback, reading a video file) runs the leaf of the detector it runs,
never another's, and scores every frame of the clip with it (from the agent's own saved trigger state)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.hub.admin_cli import campaigns_app, models_app
from fleet.hub.learned import BOX_LEAF
from fleet.protocol import Box, Detection, TriggerHit
from tests.support.cases import make_detect_case
from tests.support.data import png_bytes
from tests.support.hub import RunningHub, start_hub
from tests.support.video import write_clip

from .support import AgentDir, bearer, make_agent
from .test_detect_agent import FPS, LOOP, publish_detector, run_to_end, scene

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

runner = CliRunner()
CAMPAIGN = "boxes-sys"
SURE = Box(0.1, 0.1, 0.4, 0.4, 0, 0.95)
FAINT = Box(0.6, 0.6, 0.9, 0.9, 1, 0.45)  # under the detector's operating threshold (0.5): not reported
OTHER = Box(0.5, 0.1, 0.8, 0.4, 2)  # an object only the human drew


def _labeled(hub: RunningHub, model: str, campaign_version: int, faint_misses: bool, rng: np.random.Generator) -> None:
    """40 cases of ``model`` for the campaign, from a device of their own, each labeled with its true boxes.
    ``faint_misses``: the model's faint box under the threshold is an object it missed, the human never known;
    else the model finds everything it reports, and is wrong exactly where the human drew an object it did not."""
    labeler = bearer(hub.token("labeler"))
    png = png_bytes(scene(0))
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        r = c.post("/v1/enroll", json={"device_id": f"seed-{model}", "fleet_secret": hub.fleet_secret})
        device = bearer(r.json()["token"])
        for i in range(40):
            human = None
            if faint_misses:
                faint = rng.random() < 0.5
                found, truth = ([SURE, FAINT], [SURE, FAINT]) if faint else ([SURE], [SURE])
            else:
                found, truth = [SURE], [SURE]
                if rng.random() < 0.6:
                    truth = [SURE, OTHER] if rng.random() < 0.5 else [SURE]
                    human = Detection([Box(b.x1, b.y1, b.x2, b.y2, b.label) for b in truth])
            case = make_detect_case(case_id=f"{model}-{i:03d}", device_id=f"seed-{model}", model_version=model,
                                    boxes=found, image=png, campaign_id=CAMPAIGN, campaign_version=campaign_version,
                                    human_action=human, triggers=[TriggerHit("flicker", 1.0, 0.2)])
            r = c.post("/v1/cases", headers=device, data={"case": case.to_json()},
                       files={"image": ("f.png", png, "image/png")})
            assert r.status_code == 201, r.text
            n = int(rng.integers(1, 1 << 30))
            r = c.post("/v1/labels", headers=labeler, json={
                "case_id": case.case_id, "annotator": "a@example.com", "source": "label-studio", "task_id": n,
                "annotation_id": n, "created_at": case.captured_at,
                "label": {"task": "detect", "boxes": [{"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2,
                                                       "label": b.label} for b in truth]}})
            assert r.status_code in (200, 201), r.text


def _ran(agent: AgentDir, model: str) -> tuple[int, dict[str, Any] | None, int, list[str]]:
    """Run the agent over the clip until it runs ``model`` (the OTA swap happens while a run goes on), then once
    more, all of it on ``model``: the campaign version it held, that version's learned leaf's parameters (or None),
    how many frames, in all its runs on ``model``, the leaf scored, and the other models that campaign version
    ever ran on (the last two from the agent's saved trigger state)."""
    from trigger import parse_spec

    for _ in range(5):
        if run_to_end(agent)["model_version"] == model:
            break
    summary = run_to_end(agent)
    assert summary["model_version"] == model and summary["frames"] == LOOP, summary
    assigned = json.loads((agent.data / "campaigns" / "assigned.json").read_text())
    assert assigned["model_version"] == model, assigned["model_version"]
    (ref,) = [r for r in assigned["campaigns"] if r["campaign_id"] == CAMPAIGN]
    leaves = [x for x in parse_spec(ref["spec"]).leaves if x.label == "learned_error"]
    assert all(x.trigger == BOX_LEAF for x in leaves), leaves
    state = json.loads((agent.data / "campaigns" / f"{CAMPAIGN}-v{ref['version']}.state.json").read_text())
    assert state["model_version"] == model, state["model_version"]
    seen = int(state["calibrators"].get("learned_error", {}).get("seen", 0))
    return int(ref["version"]), (leaves[0].params if leaves else None), seen, sorted(state["calibration_by_model"])


def test_the_agent_runs_its_own_detector_s_learned_leaf_across_two_detectors_and_back(tmp_path: Path) -> None:
    """d-v1 misses the faint objects it scores under its threshold; d-v2 is wrong where the human drew an object
    it did not. `flywheel campaigns learn` fits d-v1's leaf; the agent runs it on d-v1. d-v2 takes the leaf away
    (no labels yet), then its own labels refit it on d-v2's cases, and the agent runs that one. Rolled back to
    d-v1, the agent runs d-v1's leaf again, the same weights as before."""
    with start_hub(tmp_path / "hub") as hub:
        trainer = hub.token("trainer")
        opts = ["--hub", hub.url, "--token", hub.admin_token]
        publish_detector(hub, tmp_path / "v1", "d-v1", trainer)
        spec = {"id": CAMPAIGN, "version": 1, "rule": {"trigger": "box_flicker", "above": 0.2, "label": "flicker"}}
        r = httpx.post(f"{hub.url}/v1/campaigns", json={"spec": spec}, headers=hub.admin_headers, timeout=30)
        assert r.status_code == 201, r.text
        rng = np.random.default_rng(11)
        _labeled(hub, "d-v1", 1, True, rng)
        learned = runner.invoke(campaigns_app, ["learn", CAMPAIGN, "--target-rate", "0.2", *opts])
        assert learned.exit_code == 0, learned.output
        assert learned.output.startswith(f"learned: {CAMPAIGN} v2 for model d-v1 on 40 cases"), learned.output
        assert BOX_LEAF in learned.output

        agent = make_agent(tmp_path / "cam", hub, "cam", source={"kind": "video", "path": "clip.mp4"})
        clip = write_clip(agent.root / "clip.mp4", frames=LOOP, fps=FPS, image=scene)
        version, v1_leaf, seen, others = _ran(agent, "d-v1")
        assert version == 2 and v1_leaf is not None and seen >= clip.frames and others == []
        assert v1_leaf["floor"] == pytest.approx(0.5, abs=1e-6)  # the detector's operating threshold
        # d-v1's fit weighs the faint box alone under the threshold, not the human (never known in its cases)
        assert v1_leaf["w_under_75"] > 0.5 and v1_leaf["w_under_75"] > abs(v1_leaf["w_human"]), v1_leaf

        publish_detector(hub, tmp_path / "v2", "d-v2", trainer)  # promoted: d-v1's leaf must not reach it
        assert _ran(agent, "d-v2")[:3] == (3, None, 0)  # without a leaf it may have run on d-v1 before the swap

        _labeled(hub, "d-v2", 3, False, rng)  # the hub refits as the labels come in
        version, v2_leaf, seen, others = _ran(agent, "d-v2")
        assert version == 4 and v2_leaf is not None and seen >= clip.frames and others == []
        assert v2_leaf["w_human"] > 0.5 and v2_leaf["w_human"] > abs(v2_leaf["w_under_75"]), v2_leaf

        r = runner.invoke(models_app, ["promote", "d-v1", "--override", "--reason", "back to d-v1", *opts])
        assert r.exit_code == 0, r.output
        # the agent, on d-v2, takes the assignment of d-v1 with d-v1's leaf: parked until the swap, never run on d-v2
        version, leaf, seen, others = _ran(agent, "d-v1")
        assert version == 5 and leaf == v1_leaf and seen >= clip.frames and others == []
