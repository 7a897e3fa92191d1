"""`flywheel demo --labeler studio`: labels come from Label Studio, annotated by simulated annotators.

Uses the Label Studio that scripts/test.sh starts (FLYWHEEL_TEST_LS_*), through FLYWHEEL_STUDIO_URL/TOKEN,
so the demo does not start a second server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_studio_bin_is_found_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.sim.studio import find_studio_bin

    fake = tmp_path / "label-studio"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("FLYWHEEL_STUDIO_BIN", str(fake))
    assert find_studio_bin() == fake
    monkeypatch.setenv("FLYWHEEL_STUDIO_BIN", str(tmp_path / "missing"))
    assert find_studio_bin() != tmp_path / "missing"


@pytest.mark.slow
def test_demo_labels_through_label_studio(tmp_path: Path) -> None:
    url, token = os.environ.get("FLYWHEEL_TEST_LS_URL"), os.environ.get("FLYWHEEL_TEST_LS_TOKEN")
    if not url or not token:
        pytest.skip("FLYWHEEL_TEST_LS_URL / FLYWHEEL_TEST_LS_TOKEN not set (scripts/test.sh starts Label Studio)")
    pytest.importorskip("label_studio_sdk")
    ws = tmp_path / "ws"
    env = {**os.environ, "FLYWHEEL_STUDIO_URL": url, "FLYWHEEL_STUDIO_TOKEN": token}
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), "--turns", "1", "--devices", "2",
           "--frames-per-device", "150", "--budget", "10", "--labeler", "studio"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    out = " ".join((run.stdout + run.stderr).split())  # rich wraps long lines
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Label Studio" in out and "simulated annotators" in out
    turns = json.loads((ws / "report" / "results.json").read_text())["turns"]
    assert [t["turn"] for t in turns] == [0, 1]
    assert 0 < turns[1]["flywheel"]["labels"] <= 10
