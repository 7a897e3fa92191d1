"""Several processes through torch DDP with ``torchrun`` and the same entry point (gloo on CPU here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torchrun(out: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """``torchrun --nproc-per-node 2 -m training ... --out OUT``; returns rank 0's stdout and the run report."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", *args, "--out", str(out), "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # a session of its own, so a hang kills torchrun *and* its workers
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_torchrun_two_processes_train_one_model(digits_npz: Path, tmp_path: Path) -> None:
    stdout, report = torchrun(tmp_path / "ddp", "--data", f"npz:{digits_npz}", "--epochs", "2", "--width", "8",
                              "--version", "ddp-1")
    assert report["training"]["world_size"] == 2 and report["status"] == "ready"
    assert [h["images"] for h in report["training"]["history"]] == [1400, 1400]  # the shards cover the epoch
    assert report["metrics"]["test"]["accuracy"] > 0.3
    assert stdout.count("ready: ddp-1") == 1  # rank 0 alone evaluates, exports and reports


@pytest.mark.slow
def test_torchrun_two_processes_train_one_detector(scenes_npz: Path, tmp_path: Path) -> None:
    stdout, report = torchrun(tmp_path / "ddp", "--task", "detect", "--data", f"npz:{scenes_npz}", "--epochs", "1",
                              "--width", "8", "--batch-size", "4", "--version", "dddp-1")
    assert report["training"]["world_size"] == 2 and report["status"] == "ready"
    assert report["training"]["history"][0]["images"] == 48  # the shards cover the epoch
    assert report["export"]["manifest"]["task"] == "detect"
    assert stdout.count("ready: dddp-1") == 1
