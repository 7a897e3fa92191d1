"""Device groups with their own model, with real agents (issue 19.4): a ``cam-north`` and a ``cam-south`` agent
enrolled through their own config; a rollout on ``cam-south`` only, a fleet-wide update after it, and unpinning the
group, each followed by both agents' own runs (the model each one installed and ran, from its own summary)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fleet.hub.admin_cli import models_app
from fleet.protocol import GroupList
from tests.support.hub import REPO, start_hub
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


def test_a_group_runs_its_own_model_on_real_agents_across_two_fleet_versions(tmp_path: Path) -> None:
    with start_hub(tmp_path / "hub") as hub:
        trainer, key = hub.token("trainer"), hub.private_key()
        opts = ["--hub", hub.url, "--token", hub.admin_token]
        publish(hub, make_model_files(tmp_path / "m", "g-v1", private_key=key, seed=1), trainer, promote=True)
        agents = {}
        for name, group in (("north-1", "cam-north"), ("south-1", "cam-south")):
            agents[group] = make_agent(tmp_path / name, hub, name, spec=flagging_spec(), loop=True, fps=50,
                                       drain_timeout_s=5, group=group)
            write_shard(agents[group].root / "shard.npz", 32, seed=3, flag_every=8)
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
