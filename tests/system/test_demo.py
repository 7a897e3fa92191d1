"""`flywheel demo` end to end, as a newcomer runs it: real hub, real agent processes, real trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_turns_the_whole_loop(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), "--turns", "1", "--devices", "2",
           "--frames-per-device", "150", "--budget", "20", "--labeler", "oracle"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "built-in oracle" in run.stdout and "report:" in run.stdout
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
