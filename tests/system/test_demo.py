"""`flywheel demo` end to end, as a newcomer runs it: real hub, real agent processes, real trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.demo import assert_control_arm_did_not_wait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_turns_the_whole_loop(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), "--turns", "1", "--devices", "2",
           "--frames-per-device", "150", "--budget", "20", "--labeler", "oracle"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "built-in oracle" in run.stdout and "report:" in run.stdout
    assert f"flywheel demo --serve --workspace {ws}" in " ".join(run.stdout.split())
    results = json.loads((ws / "report" / "results.json").read_text())
    turns = results["turns"]
    assert [t["turn"] for t in turns] == [0, 1]
    assert turns[1]["flywheel"]["labels"] == 20 == turns[1]["random"]["labels"]
    assert turns[1]["spent"] == turns[1]["budget"] == 20 and not turns[1]["short"]
    assert turns[1]["uploads"] > 0 and turns[1]["frames_seen"] == 300
    assert turns[1]["model_errors"] > 0 and 0 <= turns[1]["errors_captured"] <= turns[1]["model_errors"]
    for arm in ("flywheel", "random"):
        assert set(turns[1][arm]["per_condition"]) == {"clear", "fog", "motion_blur", "night", "occlusion", "rain"}
    assert (ws / "report" / "index.html").exists() and (ws / "report" / "accuracy_vs_labels.png").exists()
    # the agents really ran the real agent code and picked the retrained model up by OTA
    for dev in ("dev-000", "dev-001"):
        assert (ws / "agents" / dev / "data" / "spool.db").exists()
    assert_control_arm_did_not_wait(ws, 1, side_by_side=True)


def test_demo_refuses_a_used_workspace_and_bad_options(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    run = subprocess.run([sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(tmp_path / "used")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "is not empty" in " ".join((run.stdout + run.stderr).split())
    assert (tmp_path / "used" / "x").read_text() == "keep me"
    run = subprocess.run([sys.executable, "-m", "fleet.cli", "demo", "--labeler", "crowd"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "labeler" in run.stdout + run.stderr
    # a file where the workspace should go is named, not a traceback; a dataset the demo cannot read is refused
    # before the new workspace holds anything (it used to keep a fresh signing key there)
    (tmp_path / "file").write_text("keep me")
    run = subprocess.run([sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(tmp_path / "file")],
                         capture_output=True, text=True, timeout=120)
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 1 and f"workspace {tmp_path / 'file'} is a file; expected a new folder" in out, out
    assert "Traceback" not in out and (tmp_path / "file").read_text() == "keep me"
    import numpy as np

    np.savez(tmp_path / "wrong.npz", images=np.zeros((4, 8, 8), np.uint8))
    run = subprocess.run([sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(tmp_path / "new"),
                          "--dataset", str(tmp_path / "wrong.npz")], capture_output=True, text=True, timeout=120)
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 1 and "lacks array(s) ['x_train', 'y_train', 'x_test', 'y_test']" in out, out
    assert not (tmp_path / "new").exists()


def test_demo_on_a_many_class_rgb_set_says_which_option_to_change(tmp_path: Path) -> None:
    """Thirty classes of RGB noise: no model gets above chance on it, and the demo must say so, naming the
    options that would help, and honour the sizes it was given."""
    import numpy as np

    rng = np.random.default_rng(0)
    k = 30
    data = tmp_path / "many.npz"
    np.savez(data, x_train=rng.integers(0, 256, (900, 16, 16, 3), dtype=np.uint8), y_train=np.arange(900) % k,
             x_test=rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8), y_test=np.arange(300) % k)
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), "--dataset", str(data), "--turns", "1",
           "--devices", "1", "--frames-per-device", "60", "--budget", "10", "--labeler", "oracle",
           "--base-epochs", "1", "--epochs", "1", "--seed-size", "60", "--test-size", "90", "--width", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = " ".join(run.stdout.split())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "30 classes" in out and "seed set 60" in out and "test 540 across conditions" in out  # 90 x 6
    assert "WARNING: the base model is near chance" in out
    assert "(--seed-size, now 60)" in out and "(--base-epochs, now 1)" in out and "(--model, now smallcnn)" in out
    settings = json.loads((ws / "report" / "results.json").read_text())["settings"]
    assert settings["seed_size"] == 60 and settings["test_size"] == 90 and settings["turn_epochs"] == 1
    assert settings["dataset"] == str(data) and isinstance(settings["install_studio"], bool)  # values, not str()
