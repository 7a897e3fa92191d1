"""The trainer against a real hub: SIGKILLed mid-run it resumes from its checkpoint and publishes; a
candidate that fails the gate is never registered, so no device is ever assigned it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.data import digits_arrays
from tests.support.hub import REPO

from .support import (
    agent_cmd,
    assignment_of,
    digits_snapshot,
    flagging_spec,
    make_agent,
    model_statuses,
    record,
    restartable_hub,
    spool_stats,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def train_cmd(hub_url: str, snapshot: str, base: Path, out: Path, key: Path, trainer: str, version: str,
              epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli", "train", "--data", f"hub:{hub_url}", "--snapshot", snapshot,
            "--base", f"npz:{base}", "--replay-ratio", "0.5", "--out", str(out), "--epochs", str(epochs),
            "--width", "4", "--threads", "1", "--version", version, "--parent", "tr-m0", "--sign-key", str(key),
            "--publish", hub_url, "--token", trainer, "--cache-dir", str(out.parent / "cache"), "--no-progress",
            "--no-int8", *extra]


def test_trainer_killed_resumes_and_a_gate_failure_never_ships(tmp_path: Path) -> None:
    with restartable_hub(tmp_path / "hub") as hub:
        trainer, snap, device = digits_snapshot(hub, tmp_path, "tr", 60)
        x, y = digits_arrays()
        base = tmp_path / "base.npz"
        np.savez(base, x_train=x[100:500], y_train=y[100:500], x_test=x[1500:1700], y_test=y[1500:1700])
        key = tmp_path / "fleet.key"
        key.write_bytes(hub.keypair.private_pem)
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        # 1. killed after its first checkpoint, then resumed: one run, published once
        out = tmp_path / "run"
        epochs = 25
        cmd = train_cmd(hub.url, snap, base, out, key, trainer, "tr-v1", epochs, "--resume")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        ckpt = out / "checkpoint.pt"
        deadline = time.monotonic() + 240
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert not (out / "report.json").exists()
        with httpx.Client(base_url=hub.url, timeout=30) as c:
            assert "tr-v1" not in model_statuses(c, trainer)  # nothing half-published
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        resumed_from = report["training"]["resumed_from_epoch"]
        assert resumed_from >= 1 and [h["epoch"] for h in report["training"]["history"]] == list(range(epochs))
        assert report["status"] == "published", report["status"]
        with httpx.Client(base_url=hub.url, timeout=30) as c:
            assert model_statuses(c, trainer)["tr-v1"] in ("candidate", "canary")  # it may start its rollout

        # 2. a candidate that fails the gate: exit 3, never registered, never assigned, never installed
        bad_out = tmp_path / "bad"
        rejected = subprocess.run(train_cmd(hub.url, snap, base, bad_out, key, trainer, "tr-bad", 2,
                                            "--min-accuracy", "0.999", "--rollout-stages", "1.0"),
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert rejected.returncode == 3, rejected.stdout[-2000:] + rejected.stderr[-2000:]
        assert json.loads((bad_out / "report.json").read_text())["status"] == "rejected"
        with httpx.Client(base_url=hub.url, timeout=30) as c:
            assert "tr-bad" not in model_statuses(c, trainer)
        r = httpx.get(hub.url + "/v1/models/tr-bad/manifest", headers=device)
        assert r.status_code == 404
        agent = make_agent(tmp_path / "dev", hub, "tr-dev", spec=flagging_spec(), drain_timeout_s=10)
        np.savez(agent.root / "shard.npz", images=x[:32], tag_flag=np.array(["0"] * 32))
        run = subprocess.run(agent_cmd("run", agent.config), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        good = {"tr-m0", "tr-v1", None}
        assert json.loads(run.stdout.strip().splitlines()[-1])["model_version"] in good
        assert set(spool_stats(agent)["models"].values()) <= good
        a = assignment_of(hub, "tr-dev")
        assert {ref.version if ref else None for ref in (a.active, a.challenger)} <= good
        assert "tr-bad" not in hub.log()
    record("trainer_chaos", trainer_kills=1, resumed_from_epoch=resumed_from, epochs=epochs, published="tr-v1",
           gate_failures=1, gate_failed_reached_devices=0)
