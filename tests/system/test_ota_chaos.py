"""OTA under fire, with a real hub and real agent processes.

- A power cut (SIGKILL) at each step of an update: the device always has a valid model, and once power
  is back it finishes the update.
- A canary that is corrupted on the way, wrongly signed, crashes on load, outputs NaN, has the wrong
  output shape, or disagrees with the humans more than the incumbent does: the hub rolls it back by
  itself, every device's assignment returns the incumbent, and every device ends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fleet.inference.runtime import ModelRuntime
from fleet.protocol import RolloutPublic
from fleet.signing import generate_keypair, load_private_key, sign_manifest
from tests.support.hub import RunningHub
from tests.support.models import ModelFiles, make_model_files

from .crashagent import STEPS
from .support import (
    AgentDir,
    agent_cmd,
    agents_running,
    assignment_of,
    bearer,
    devices,
    flagging_spec,
    make_agent,
    model_statuses,
    publish,
    record,
    restartable_hub,
    rollout_state,
    spool_stats,
    start_agent,
    wait_for,
    write_shard,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def check_store(agent: AgentDir, allowed: set[str]) -> dict[str, Any]:
    """The device's model store, read from disk: the active model verifies and is one of ``allowed``."""
    status = spool_stats(agent)
    active = status["models"]["active"]
    assert active in allowed, f"{agent.device_id}: active model {active!r}, expected one of {allowed}"
    assert not any(str(v).startswith("BROKEN") for v in status["models"].values()), status
    return dict(status["models"])


def test_power_cut_at_each_step_of_an_update(tmp_path: Path) -> None:
    with restartable_hub(tmp_path / "hub") as hub:
        trainer = hub.token("trainer")
        key = hub.private_key()
        publish(hub, make_model_files(tmp_path / "m", "pc-v1", private_key=key, seed=1), trainer, promote=True)
        base = make_agent(tmp_path / "base", hub, "pc-dev", spec=flagging_spec(), loop=True, fps=50,
                          drain_timeout_s=5)
        write_shard(base.root / "shard.npz", 64, seed=5, flag_every=8)
        first = subprocess.run(agent_cmd("run", base.config, "--max-frames", "16"), capture_output=True, text=True,
                               timeout=120)
        assert first.returncode == 0, first.stderr[-3000:]
        assert check_store(base, {"pc-v1"})["active"] == "pc-v1"
        publish(hub, make_model_files(tmp_path / "m", "pc-v2", private_key=key, seed=2, parent="pc-v1"), trainer,
                promote=True)

        outcomes = {}
        for step in STEPS:
            # the same device, its disk as it was before the update, cut off at ``step``
            root = tmp_path / f"cut-{step}"
            shutil.copytree(base.root, root)
            dev = AgentDir(root, "pc-dev")
            for name in ("agent.out", "agent.log"):
                (root / name).unlink(missing_ok=True)
            proc = start_agent(dev, module=[sys.executable, "-m", "tests.system.crashagent", str(dev.config), step])
            try:
                code = proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"step {step}: the crash never came:\n{dev.log_tail()}") from None
            assert code == -9, f"step {step}: exit {code}\n{dev.log_tail()}"
            after_cut = check_store(dev, {"pc-v1", "pc-v2"})  # a valid model at once, whatever the instant

            again = subprocess.run(agent_cmd("run", dev.config, "--max-frames", "24"), capture_output=True, text=True,
                                   timeout=120)
            assert again.returncode == 0, f"step {step}: {again.stderr[-3000:]}"
            summary = json.loads(again.stdout.strip().splitlines()[-1])
            assert summary["model_version"] == "pc-v2", (step, summary, again.stderr[-2000:])
            models = check_store(dev, {"pc-v2"})
            assert models["previous"] == "pc-v1", (step, models)
            store = dev.data / "models"
            assert not any((store / "incoming").iterdir()), f"step {step}: a half download was left behind"
            state = json.loads((store / "state.json").read_text())
            kept = {p.name for p in (store / "versions").iterdir()}
            assert kept == {v for v in state.values() if v}, f"step {step}: stray model folders {kept} vs {state}"
            outcomes[step] = after_cut["active"]
        record("ota_power_cut", steps=list(STEPS), power_cuts=len(STEPS), recovered=len(outcomes),
               active_right_after_cut=outcomes)


# ---------------------------------------------------------------------------------------------
# bad canaries, rolled back everywhere
# ---------------------------------------------------------------------------------------------

ROLLBACK_ENV = {
    "FLYWHEEL_HUB_ROLLBACK_HEALTH_FAILURES": "2",  # both devices must have refused it
    "FLYWHEEL_HUB_ROLLBACK_MIN_COMPARED": "80",
    "FLYWHEEL_HUB_ROLLBACK_MARGIN": "0.1",
}


def resign(files: ModelFiles, onnx: bytes, key: Any) -> ModelFiles:
    """Replace the ONNX bytes and sign a manifest that matches them (a model the hub accepts)."""
    files.onnx_path.write_bytes(onnx)
    manifest = dataclasses.replace(files.manifest, onnx_sha256=hashlib.sha256(onnx).hexdigest(), onnx_size=len(onnx))
    return ModelFiles(files.onnx_path, manifest, sign_manifest(manifest, key))


def tamper_blob(hub: RunningHub, sha: str) -> None:
    """Flip bytes in the hub's stored copy: every download of it arrives corrupted."""
    path = hub.data_dir / "blobs" / sha[:2] / sha[2:4] / sha
    data = bytearray(path.read_bytes())
    for i in range(100, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tamper_signature(hub: RunningHub, version: str, manifest: Any) -> None:
    """Replace the registry's stored manifest by one signed with a key that is not the fleet's."""
    forged = sign_manifest(manifest, load_private_key(generate_keypair().private_pem))
    signed = dict(forged.to_dict())
    with sqlite3.connect(hub.data_dir / "hub.db") as conn:
        (old,) = conn.execute("SELECT signed_manifest FROM model_versions WHERE version = ?", (version,)).fetchone()
        signed["key_id"] = json.loads(old)["key_id"]  # claims to be the fleet key; the signature says otherwise
        conn.execute("UPDATE model_versions SET signed_manifest = ? WHERE version = ?", (json.dumps(signed), version))


def ota_reports(hub: RunningHub, version: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(hub.data_dir / "hub.db") as conn:
        return conn.execute("SELECT device_id, outcome, reason FROM ota_reports WHERE version = ? ORDER BY device_id",
                            (version,)).fetchall()


def roll_out(hub: RunningHub, trainer: str, version: str) -> str:
    r = httpx.post(hub.url + "/v1/rollouts", headers=bearer(trainer), json={"version": version, "stages": [1.0]},
                   timeout=30)
    assert r.status_code in (200, 201), r.text
    return RolloutPublic.from_json(r.content).rollout_id


def test_bad_canaries_are_rolled_back_everywhere(tmp_path: Path) -> None:
    with restartable_hub(tmp_path / "hub", extra_env=ROLLBACK_ENV) as hub:
        trainer = hub.token("trainer")
        key = hub.private_key()
        models = tmp_path / "models"
        v1 = make_model_files(models, "ota-v1", private_key=key, seed=1)
        publish(hub, v1, trainer, promote=True)
        incumbent = ModelRuntime(v1.onnx_path, v1.manifest)

        # two devices whose humans always do what the incumbent predicts
        agents = []
        for i in range(2):
            dev = f"ota-dev-{i}"
            a = make_agent(tmp_path / dev, hub, dev, spec=flagging_spec(), loop=True, fps=40, heartbeat_s=0.3,
                           poll_s=0.3, drain_timeout_s=10)
            images = np.random.default_rng(20 + i).integers(0, 256, (200, 8, 8), dtype=np.uint8)
            human = incumbent.run(list(images)).logits.argmax(1)
            np.savez(a.root / "shard.npz", images=images, human=human, tag_flag=np.array(["0"] * 200))
            agents.append(a)
        ids = [a.device_id for a in agents]

        def fleet_on(version: str) -> bool:
            seen = devices(hub)
            return all(seen[d].model_version == version for d in ids)

        # the bad canaries: (name, version, how it is broken)
        bad: list[tuple[str, str]] = []
        with agents_running(agents) as procs:
            wait_for("both devices on the incumbent", lambda: fleet_on("ota-v1"), timeout=60)

            def canary(name: str, files: ModelFiles, tamper: Any = None) -> RolloutPublic:
                publish(hub, files, trainer)
                if tamper is not None:
                    tamper()
                rid = roll_out(hub, trainer, files.manifest.version)
                st = wait_for(f"rollout of {name} rolled back", lambda: (lambda s: s if s.state == "rolled_back"
                              else None)(rollout_state(hub, rid)), timeout=60, every=0.3)
                for d in ids:
                    a = assignment_of(hub, d)
                    assert a.active is not None and a.active.version == "ota-v1" and a.challenger is None, (name, a)
                bad.append((name, files.manifest.version))
                return st

            reasons: dict[str, str] = {}
            for name, why, build in [
                ("corrupted download", "sha256", lambda v: make_model_files(models, v, private_key=key, seed=3)),
                ("wrong signature", "signature", lambda v: make_model_files(models, v, private_key=key, seed=4)),
                ("crashes on load", "does not load", lambda v: resign(make_model_files(models, v, private_key=key,
                                                                                       seed=5),
                                                                      b"\x08\x07garbage, not an ONNX graph" * 64, key)),
                ("outputs NaN", "NaN", lambda v: make_model_files(models, v, private_key=key, seed=6, poison="nan")),
                ("wrong output shape", "shape", lambda v: make_model_files(models, v, private_key=key, seed=7,
                                                                           poison="shape")),
            ]:
                version = f"ota-bad-{len(bad) + 1}"
                files = build(version)
                tamper = None
                if name == "corrupted download":
                    tamper = lambda f=files: tamper_blob(hub, f.manifest.onnx_sha256)  # noqa: E731
                elif name == "wrong signature":
                    tamper = lambda f=files: tamper_signature(hub, f.manifest.version, f.manifest)  # noqa: E731
                st = canary(name, files, tamper)
                assert "health failures" in (st.reason or ""), st
                reports = ota_reports(hub, version)
                assert [(d, o) for d, o, _ in reports] == [(d, "refused") for d in ids], (name, reports)
                assert all(why.lower() in reason.lower() for *_, reason in reports), (name, why, reports)
                reasons[name] = reports[0][2][:160]
                assert fleet_on("ota-v1")

            # a healthy-looking model that the humans disagree with far more often than the incumbent
            worse = make_model_files(models, "ota-worse", private_key=key, seed=13)
            rid_holder: dict[str, str] = {}
            publish(hub, worse, trainer)
            rid_holder["id"] = roll_out(hub, trainer, "ota-worse")
            wait_for("the fleet running the worse canary", lambda: fleet_on("ota-worse") or
                     rollout_state(hub, rid_holder["id"]).state != "running", timeout=60, every=0.2)
            st = wait_for("the worse canary rolled back", lambda: (lambda s: s if s.state == "rolled_back"
                          else None)(rollout_state(hub, rid_holder["id"])), timeout=90, every=0.3)
            assert "field disagreement" in (st.reason or ""), st
            worse_field = st.metrics["ota-worse"]
            assert worse_field.human_compared >= 80 and (worse_field.disagreement or 0) > 0.1, worse_field
            for d in ids:
                a = assignment_of(hub, d)
                assert a.active is not None and a.active.version == "ota-v1" and a.challenger is None, a
            bad.append(("worse field disagreement", "ota-worse"))
            wait_for("every device back on the incumbent", lambda: fleet_on("ota-v1"), timeout=60)
            procs.terminate()
            codes = procs.wait(timeout=60)
        assert all(c == 0 for c in codes.values()), {a.device_id: a.log_tail() for a in agents}

        with httpx.Client(base_url=hub.url, timeout=30) as c:
            listed = model_statuses(c, trainer)
        assert listed["ota-v1"] == "active"
        assert all(listed[v] == "retired" for _, v in bad), listed
        for a in agents:
            assert a.summary()["model_version"] == "ota-v1"
            check_store(a, {"ota-v1"})
        # a model signed with another key never even enters the registry
        alien = make_model_files(models, "ota-alien", private_key=load_private_key(generate_keypair().private_pem))
        assert alien.signed is not None
        r = httpx.post(hub.url + "/v1/models", headers=bearer(trainer), timeout=30,
                       files={"onnx": ("m.onnx", alien.onnx_path.read_bytes(), "application/octet-stream")},
                       data={"manifest": alien.signed.to_json()})
        assert r.status_code == 422, r.text
        record("ota_bad_canaries", canaries=[n for n, _ in bad], rolled_back=len(bad), devices=len(ids),
               fleet_ends_on="ota-v1", alien_signature_refused_at_upload=True, device_reasons=reasons,
               worse_metrics={k: {"human_compared": v.human_compared, "disagreement": v.disagreement}
                              for k, v in st.metrics.items()})
