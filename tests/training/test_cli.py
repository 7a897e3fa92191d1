"""``flywheel train`` / ``flywheel export`` as a user (and the demo) runs them, including a SIGKILL mid-training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.protocol import SignedManifest
from fleet.signing import verify_manifest
from tests.support.data import digits_arrays
from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def flywheel(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_train_cli_end_to_end(digits_npz: Path, tmp_path: Path, signing_key: tuple[Path, str]) -> None:
    code, out = flywheel("train", "--data", f"npz:{digits_npz}", "--out", str(tmp_path / "r"), "--epochs", "1",
                         "--width", "8", "--threads", "1", "--version", "cli-1", "--sign-key", str(signing_key[0]),
                         "--slice-tolerance", "0.05", "--slice-tolerance", "condition=night:0.1", "--no-progress")
    assert code == 0, out
    assert "ready: cli-1" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["args"]["slice_tolerances"] == {"condition=night": 0.1} and report["args"]["slice_tolerance"] == 0.05
    signed = SignedManifest.from_json((tmp_path / "r" / "manifest.json").read_text())
    assert verify_manifest(signed, signing_key[1]).version == "cli-1"


def test_rejected_candidate_exits_3(digits_npz: Path, tmp_path: Path) -> None:
    code, out = flywheel("train", "--data", f"npz:{digits_npz}", "--out", str(tmp_path / "r"), "--epochs", "1",
                         "--width", "4", "--threads", "1", "--min-accuracy", "0.999", "--no-progress")
    assert code == 3, out
    assert "rejected" in out and "below the required minimum" in out


def test_bad_arguments_exit_2_with_the_value_received(digits_npz: Path, tmp_path: Path) -> None:
    code, out = flywheel("train", "--data", f"npz:{digits_npz}", "--out", str(tmp_path), "--replay-ratio", "1.5")
    assert code == 2 and "received 1.5" in out
    code, out = flywheel("train", "--data", f"npz:{digits_npz}", "--out", str(tmp_path), "--rollout-stages", "0.5")
    assert code == 2 and "end at 1.0" in out
    for option, value, expected in [("--width", "0", "--width must be >= 1; received 0"),
                                    ("--threads", "0", "--threads must be >= 1; received 0"),
                                    ("--weight-decay", "-1", "--weight-decay must be a number >= 0; received -1.0"),
                                    ("--stage-seconds", "-1", "--stage-seconds must be a number > 0; received -1.0"),
                                    ("--min-slice-size", "-1", "--min-slice-size must be >= 0; received -1"),
                                    ("--seed", "-1", "--seed must be in [0, 2**32); received -1"),
                                    ("--seed", "4294967296", "--seed must be in [0, 2**32); received 4294967296")]:
        bad = CliRunner().invoke(app, ["train", "--data", f"npz:{digits_npz}", "--out", str(tmp_path / "bad"),
                                       option, value], env={"COLUMNS": "400"})
        assert bad.exit_code == 2 and expected in bad.output, bad.output
    assert not (tmp_path / "bad").exists()  # refused before anything ran
    # an --out that cannot be a folder is refused before anything trains, not when the checkpoint is written
    taken = tmp_path / "taken"
    taken.write_text("a file")
    wide = CliRunner().invoke(app, ["train", "--data", f"npz:{digits_npz}", "--out", str(taken / "run")],
                              env={"COLUMNS": "400"})
    flat = " ".join(wide.output.replace("│", " ").split())
    assert wide.exit_code == 2 and f"--out {taken / 'run'} cannot be a folder: {taken} is a file" in flat, flat
    assert taken.read_text() == "a file"


def test_export_cli(trained: Path, tmp_path: Path, signing_key: tuple[Path, str]) -> None:
    code, out = flywheel("export", str(trained / "checkpoint.pt"), "--out", str(tmp_path / "x"), "--version",
                         "exp-1", "--sign-key", str(signing_key[0]), "--int8")
    assert code == 0, out
    signed = SignedManifest.from_json((tmp_path / "x" / "manifest.json").read_text())
    m = verify_manifest(signed, signing_key[1])
    assert m.version == "exp-1" and m.parent_version is None
    info = json.loads((tmp_path / "x" / "export.json").read_text())
    assert info["int8_agreement"] is not None and info["shipped"] in ("fp32", "int8")
    code, out = flywheel("export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "y"))
    assert code == 1 and "does not exist" in out
    (tmp_path / "taken").write_text("a file")
    code, out = flywheel("export", str(trained / "checkpoint.pt"), "--out", str(tmp_path / "taken" / "x"))
    assert code == 1 and "cannot be a folder" in out and "is a file" in out, out


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import training.cli, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_killed_mid_training_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    """SIGKILL the real CLI process after its first checkpoint; --resume finishes the same run."""
    x, y = digits_arrays()
    data = tmp_path / "small.npz"
    np.savez(data, x_train=x[:300], y_train=y[:300], x_test=x[1500:1600], y_test=y[1500:1600])
    out = tmp_path / "run"
    epochs = 40
    cmd = [sys.executable, "-m", "fleet.cli", "train", "--data", f"npz:{data}", "--out", str(out), "--epochs",
           str(epochs), "--width", "4", "--threads", "1", "--version", "kill-1", "--no-progress", "--resume"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    killed_at = load_checkpoint(ckpt)["epoch"]
    assert killed_at < epochs - 1, "the run finished before it could be killed"
    assert not (out / "report.json").exists()

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["resumed_from_epoch"] == killed_at + 1
    assert [h["epoch"] for h in report["training"]["history"]] == list(range(epochs))
    assert load_checkpoint(ckpt)["epoch"] == epochs - 1 and report["status"] == "ready"
    assert f"resumed from checkpoint.pt at epoch {killed_at + 1}" in done.stderr
