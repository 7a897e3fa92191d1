"""Device groups with their own model, with real agents (issue 19.4): a ``cam-north`` and a ``cam-south`` agent
enrolled through their own config; a rollout on ``cam-south`` only, a fleet-wide update after it, and unpinning the
group, each followed by both agents' own runs (the model each one installed and ran, from its own summary); and a
fleet-wide campaign's learned leaves, one per model, each run by the agent of that model across two fleet models."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.hub.admin_cli import campaigns_app, models_app
from fleet.protocol import GroupList, TriggerHit
from tests.support.hub import REPO, RunningHub, start_hub
from tests.support.models import make_model_files

from .support import AgentDir, agent_cmd, bearer, flagging_spec, make_agent, publish, write_shard

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

runner = CliRunner()


def _ran(agent: AgentDir) -> str:
    """Run the agent over 16 frames; the model it ran at the end, from its summary."""
    run = subprocess.run(agent_cmd("run", agent.config, "--max-frames", "16"), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(json.loads(run.stdout.strip().splitlines()[-1])["model_version"])


def _two_groups(tmp_path: Path, hub: RunningHub) -> dict[str, AgentDir]:
    """Agents north-1 in cam-north and south-1 in cam-south, each with a shard of 32 frames, every 8th flagged."""
    agents = {}
    for name, group in (("north-1", "cam-north"), ("south-1", "cam-south")):
        agents[group] = make_agent(tmp_path / name, hub, name, spec=flagging_spec(), loop=True, fps=50,
                                   drain_timeout_s=5, group=group)
        write_shard(agents[group].root / "shard.npz", 32, seed=3, flag_every=8)
    return agents


def test_a_group_runs_its_own_model_on_real_agents_across_two_fleet_versions(tmp_path: Path) -> None:
    with start_hub(tmp_path / "hub") as hub:
        trainer, key = hub.token("trainer"), hub.private_key()
        opts = ["--hub", hub.url, "--token", hub.admin_token]
        publish(hub, make_model_files(tmp_path / "m", "g-v1", private_key=key, seed=1), trainer, promote=True)
        agents = _two_groups(tmp_path, hub)
        assert {g: _ran(a) for g, a in agents.items()} == {"cam-north": "g-v1", "cam-south": "g-v1"}

        publish(hub, make_model_files(tmp_path / "m", "g-v2", private_key=key, seed=2, parent="g-v1"), trainer)
        r = runner.invoke(models_app, ["rollout", "g-v2", "--group", "cam-south", "--stages", "1.0", *opts])
        assert r.exit_code == 0 and "on group 'cam-south'" in r.output, r.output
        rollout_id = r.output.split(":")[0]
        assert {g: _ran(a) for g, a in agents.items()} == {"cam-north": "g-v1", "cam-south": "g-v2"}
        done = httpx.post(f"{hub.url}/v1/rollouts/{rollout_id}/advance", headers=bearer(trainer), timeout=30)
        assert done.status_code == 200 and done.json()["state"] == "completed", done.text

        # a fleet-wide update: the north group takes it, the south group keeps its own model
        publish(hub, make_model_files(tmp_path / "m", "g-v3", private_key=key, seed=3, parent="g-v1"), trainer,
                promote=True)
        assert {g: _ran(a) for g, a in agents.items()} == {"cam-north": "g-v3", "cam-south": "g-v2"}
        publish(hub, make_model_files(tmp_path / "m", "g-v4", private_key=key, seed=4, parent="g-v3"), trainer,
                promote=True)
        assert {g: _ran(a) for g, a in agents.items()} == {"cam-north": "g-v4", "cam-south": "g-v2"}
        groups = GroupList.from_json(httpx.get(hub.url + "/v1/groups", headers=bearer(trainer)).content).groups
        assert {(g.group, g.devices, g.model, g.pinned) for g in groups} == {
            ("cam-north", 1, "g-v4", False), ("cam-south", 1, "g-v2", True)}

        r = runner.invoke(models_app, ["unpin", "cam-south", *opts])
        assert r.exit_code == 0 and "runs the fleet's model g-v4" in r.output, r.output
        assert _ran(agents["cam-south"]) == "g-v4"


def _labeled(hub: RunningHub, model: str, campaign: str, n: int, truth: Callable[[float, int | None], int],
             rng: np.random.Generator) -> None:
    """``n`` cases of ``model`` for ``campaign`` v1, sent by a device of their own and labeled with ``truth(top
    probability, human's label or None)``."""
    from tests.support.cases import label_post, make_case
    from tests.support.data import png_bytes

    labeler = bearer(hub.token("labeler"))
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        r = c.post("/v1/enroll", json={"device_id": f"seed-{model}", "fleet_secret": hub.fleet_secret})
        device = bearer(r.json()["token"])
        for i in range(n):
            top = float(rng.uniform(0.35, 0.98))
            human = int(rng.integers(0, 3)) if rng.random() < 0.6 else None
            img = png_bytes(rng.integers(0, 256, (16, 16), dtype=np.uint8))
            case = make_case(case_id=f"{model}-{i:03d}", device_id=f"seed-{model}", model_version=model,
                             probs=[top, (1 - top) * 0.6, (1 - top) * 0.4], image=img, human=human,
                             campaign_id=campaign, campaign_version=1, triggers=[TriggerHit("flagged", 1.0, 0.5)])
            r = c.post("/v1/cases", headers=device, data={"case": case.to_json()},
                       files={"image": ("f.png", img, "image/png")})
            assert r.status_code == 201, r.text
            r = c.post("/v1/labels", headers=labeler, json=label_post(case.case_id, truth(top, human),
                                                                      annotation_id=int(rng.integers(1, 1 << 30))))
            assert r.status_code in (200, 201), r.text


def _leaf_held(agent: AgentDir, campaign: str) -> tuple[int, dict[str, Any] | None]:
    """The version of ``campaign`` the agent recorded from its last assignment, and its learned leaf (or None)."""
    from trigger import parse_spec

    assigned = json.loads((agent.data / "campaigns" / "assigned.json").read_text())["campaigns"]
    (ref,) = [r for r in assigned if r["campaign_id"] == campaign]
    leaves = [x.params for x in parse_spec(ref["spec"]).leaves if x.trigger == "learned_error"]
    return int(ref["version"]), (leaves[0] if leaves else None)


def _evaluated(agent: AgentDir, campaign: str, version: int) -> tuple[str, int]:
    """From the agent's saved trigger state of that campaign version: the model it ran the triggers on, and how many
    frames its learned leaf scored."""
    state = json.loads((agent.data / "campaigns" / f"{campaign}-v{version}.state.json").read_text())
    return str(state["model_version"]), int(state["calibrators"]["learned_error"]["seen"])


def test_each_group_s_agent_runs_the_learned_leaf_of_its_own_model_across_two_fleet_models(tmp_path: Path) -> None:
    """A fleet-wide campaign while cam-south runs a model of its own: `flywheel campaigns learn` fits one leaf for
    each model (the fleet's g-v1 wrong where it is unsure, the group's g-v2 wrong where the human disagrees), and
    each real agent runs the leaf of the model it runs. A new fleet model (g-v3) takes only g-v1's leaf away: the
    north agent runs the campaign without one, the south agent keeps g-v2's."""
    campaign = "learned-sys"
    with start_hub(tmp_path / "hub") as hub:
        trainer, key = hub.token("trainer"), hub.private_key()
        opts = ["--hub", hub.url, "--token", hub.admin_token]
        publish(hub, make_model_files(tmp_path / "m", "g-v1", private_key=key, seed=1), trainer, promote=True)
        publish(hub, make_model_files(tmp_path / "m", "g-v2", private_key=key, seed=2, parent="g-v1"), trainer)
        r = runner.invoke(models_app, ["rollout", "g-v2", "--group", "cam-south", "--stages", "1.0", *opts])
        assert r.exit_code == 0, r.output
        done = httpx.post(f"{hub.url}/v1/rollouts/{r.output.split(':')[0]}/advance", headers=bearer(trainer),
                          timeout=30)
        assert done.status_code == 200 and done.json()["state"] == "completed", done.text
        spec = flagging_spec(campaign)
        r = httpx.post(f"{hub.url}/v1/campaigns", json={"spec": spec}, headers=hub.admin_headers, timeout=30)
        assert r.status_code == 201, r.text
        rng = np.random.default_rng(5)
        _labeled(hub, "g-v1", campaign, 40, lambda top, human: 1 if top < 0.6 else 0, rng)
        _labeled(hub, "g-v2", campaign, 40, lambda top, human: human if human not in (None, 0) else 0, rng)

        learned = runner.invoke(campaigns_app, ["learn", campaign, "--target-rate", "0.2", *opts])
        assert learned.exit_code == 0, learned.output
        lines = learned.output.splitlines()
        assert [ln.split(" on ")[0] for ln in lines] == [f"learned: {campaign} v2 for model g-v1",
                                                         f"learned: {campaign} v2 for model g-v2"], learned.output
        agents = _two_groups(tmp_path, hub)
        assert {g: _ran(a) for g, a in agents.items()} == {"cam-north": "g-v1", "cam-south": "g-v2"}
        (n_version, north_leaf), (s_version, south_leaf) = (_leaf_held(agents[g], campaign)
                                                            for g in ("cam-north", "cam-south"))
        assert (n_version, s_version) == (2, 2) and north_leaf is not None and south_leaf is not None
        # each leaf is its own model's fit: g-v1's weighs its doubt, g-v2's the human's disagreement
        assert north_leaf["w_least_confidence"] > 1.0 and north_leaf["w_least_confidence"] > abs(north_leaf["w_human"])
        assert south_leaf["w_human"] > 1.0 and south_leaf["w_human"] > abs(south_leaf["w_least_confidence"])
        (north_ran, north_seen), (south_ran, south_seen) = (_evaluated(agents[g], campaign, 2)
                                                            for g in ("cam-north", "cam-south"))
        assert (north_ran, south_ran) == ("g-v1", "g-v2") and north_seen > 0 and south_seen > 0

        publish(hub, make_model_files(tmp_path / "m", "g-v3", private_key=key, seed=3, parent="g-v1"), trainer,
                promote=True)
        assert {g: _ran(a) for g, a in agents.items()} == {"cam-north": "g-v3", "cam-south": "g-v2"}
        assert _leaf_held(agents["cam-north"], campaign) == (3, None)  # g-v3 has no labels yet
        assert _leaf_held(agents["cam-south"], campaign) == (3, south_leaf)
        south_ran, south_seen = _evaluated(agents["cam-south"], campaign, 3)
        assert south_ran == "g-v2" and south_seen > 0
