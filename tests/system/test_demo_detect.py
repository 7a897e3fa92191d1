"""`flywheel demo --task detect` end to end, as a newcomer runs it: real hub, real agent processes running a
detector, per-box triggers, the real trainer (fcos_tiny), mAP of the exported models; with the oracle, and with
Label Studio (boxes pushed as pre-annotations, drawn by simulated annotators) across model versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support.services import missing_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SMALL = ["--task", "detect", "--devices", "2", "--frames-per-device", "120", "--budget", "20", "--seed-size", "240",
         "--base-epochs", "8", "--test-size", "12"]


def _demo(ws: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), *SMALL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1100, env=env)


def _check_report(ws: Path, turns_run: int, budget: int) -> dict:  # type: ignore[type-arg]
    results = json.loads((ws / "report" / "results.json").read_text())
    assert results["metric"] == "mAP" and results["error"] is None
    turns = results["turns"]
    assert [t["turn"] for t in turns] == list(range(turns_run + 1))
    for t in turns[1:]:
        assert t["spent"] == t["budget"] == budget and not t["short"], t
        assert t["flywheel"]["labels"] == budget * t["turn"] == t["random"]["labels"]
        assert t["uploads"] > 0 and t["frames_seen"] == 240
        assert t["model_errors"] > 0 and 0 < t["errors_captured"] <= t["model_errors"]  # missed and wrong boxes
        for arm in ("flywheel", "random"):
            assert set(t[arm]["per_condition"]) == {"clear", "fog", "motion_blur", "night", "occlusion", "rain"}
            assert 0.0 <= t[arm]["accuracy"] <= 1.0
    assert turns[0]["flywheel"]["accuracy"] > 0.05, "the base detector should find objects on the test scenes"
    html = (ws / "report" / "index.html").read_text()
    assert "mAP (flywheel)" in html and "examples.png" in html and (ws / "report" / "map_vs_labels.png").exists()
    with Image.open(ws / "report" / "examples.png") as im:  # a scene per condition, truth and three models
        assert im.width > 4 * 96 * 3 and im.height > 6 * 96 * 3
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20) or []}
        assert (40, 200, 70) in colours and (235, 60, 50) in colours  # true boxes and the models' boxes drawn
    # the flywheel's retrain read boxes from the hub's snapshot: the agents uploaded detect cases, labeled as boxes
    fw1 = json.loads((ws / "models" / "fw-1" / "report.json").read_text())
    assert fw1["task"] == "detect" and fw1["data"]["new"]["n"] == budget and fw1["data"]["new"]["boxes"] >= budget
    for dev in ("dev-000", "dev-001"):
        assert (ws / "agents" / dev / "data" / "spool.db").exists()
    return results


def test_the_detection_demo_turns_the_whole_loop_with_the_oracle(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    run = _demo(ws, "--turns", "2", "--labeler", "oracle")
    out = " ".join(run.stdout.split())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "scenes of scikit-learn's digits with boxes" in out and "test mAP" in out and "report:" in out
    _check_report(ws, 2, 20)


def test_the_detection_demo_labels_boxes_through_label_studio_across_model_versions(tmp_path: Path) -> None:
    url, token = os.environ.get("FLYWHEEL_TEST_LS_URL"), os.environ.get("FLYWHEEL_TEST_LS_TOKEN")
    if not url or not token:
        missing_service("FLYWHEEL_TEST_LS_URL / FLYWHEEL_TEST_LS_TOKEN not set (scripts/test.sh starts Label Studio)")
    pytest.importorskip("label_studio_sdk")
    ws = tmp_path / "ws"
    env = {**os.environ, "FLYWHEEL_STUDIO_URL": url, "FLYWHEEL_STUDIO_TOKEN": token}
    run = _demo(ws, "--turns", "2", "--labeler", "studio", env=env)
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = _check_report(ws, 2, 20)
    assert results["labeler"].startswith("Label Studio") and "simulated annotators" in results["labeler"]
    for n in (1, 2):
        assert f"Label Studio turn {n}: pushed 20 tasks, 20 annotations" in out
    # the second turn's queue was pushed while another model than the first turn's was active, or its candidate
    # failed the gate: either way the base and the turns' models are named in the report
    versions = [t["flywheel"]["model_version"] for t in results["turns"]]
    assert versions[0] == "base-s0" and all(versions)
