"""Several processes through torch DDP with ``torchrun`` and the same entry point (gloo on CPU here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_two_processes_train_one_model(digits_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", "--data", f"npz:{digits_npz}", "--out", str(out), "--epochs", "2", "--width", "8",
           "--threads", "1", "--version", "ddp-1", "--no-progress"]
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
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["world_size"] == 2 and report["status"] == "ready"
    assert [h["images"] for h in report["training"]["history"]] == [1400, 1400]  # the shards cover the epoch
    assert report["metrics"]["test"]["accuracy"] > 0.3
    assert stdout.count("ready: ddp-1") == 1  # rank 0 alone evaluates, exports and reports
