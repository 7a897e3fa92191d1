"""`flywheel demo --labeler studio`: labels come from Label Studio, annotated by simulated annotators, across
several model versions (each turn retrains and rolls a new model out).

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

from tests.support.proxy import fault_proxy
from tests.support.services import missing_service


@pytest.fixture
def studio_env() -> tuple[str, str]:
    url, token = os.environ.get("FLYWHEEL_TEST_LS_URL"), os.environ.get("FLYWHEEL_TEST_LS_TOKEN")
    if not url or not token:
        missing_service("FLYWHEEL_TEST_LS_URL / FLYWHEEL_TEST_LS_TOKEN not set (scripts/test.sh starts Label Studio)")
    pytest.importorskip("label_studio_sdk")
    return url, token


def _demo(ws: Path, url: str, token: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLYWHEEL_STUDIO_URL": url, "FLYWHEEL_STUDIO_TOKEN": token}
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), "--labeler", "studio", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


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
@pytest.mark.timeout(900)  # three turns through Label Studio: ~4 min alone, far more on a loaded machine
def test_demo_spends_every_turns_budget_through_label_studio(tmp_path: Path, studio_env: tuple[str, str]) -> None:
    """Three turns, so the queue crosses three model versions (base, fw-1, fw-2) in one Label Studio project."""
    ws = tmp_path / "ws"
    run = _demo(ws, *studio_env, "--turns", "3", "--budget", "40")
    out = " ".join((run.stdout + run.stderr).split())  # rich wraps long lines
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Label Studio" in out and "simulated annotators" in out
    results = json.loads((ws / "report" / "results.json").read_text())
    turns = results["turns"]
    assert [t["turn"] for t in turns] == [0, 1, 2, 3]
    assert results["labeler"].startswith("Label Studio") and results["error"] is None
    for t in turns[1:]:
        assert t["spent"] == t["budget"] == 40 and not t["short"], t
        assert t["flywheel"]["labels"] == 40 * t["turn"] == t["random"]["labels"]
    versions = [t["flywheel"]["model_version"] for t in turns]
    assert len(set(versions)) >= 3, f"the labeling queue should cross model versions: {versions}"
    for n in (1, 2, 3):
        assert f"Label Studio turn {n}: pushed 40 tasks, 40 annotations" in out
    assert turns[-1]["flywheel"]["accuracy"] > turns[-1]["random"]["accuracy"], turns[-1]


@pytest.mark.slow
def test_demo_fails_loudly_when_label_studio_refuses_the_tasks(tmp_path: Path, studio_env: tuple[str, str]) -> None:
    url, token = studio_env
    with fault_proxy(url) as proxy:
        proxy.refuse("POST", r"^/api/projects/\d+/import$")
        ws = tmp_path / "ws"
        run = _demo(ws, proxy.url, token, "--turns", "2", "--devices", "2", "--frames-per-device", "150",
                    "--budget", "10")
        assert proxy.refused, "the demo never tried to import tasks"
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 1, out[-3000:]
    assert "could not spend its budget" in out and "Label Studio refused 10 task(s)" in out, out[-3000:]
    assert "--allow-short" in out
    results = json.loads((ws / "report" / "results.json").read_text())
    assert "turn 1" in results["error"] and [t["turn"] for t in results["turns"]] == [0]

    with fault_proxy(url) as proxy:  # the same fault with --allow-short: the run carries on and marks the turn
        proxy.refuse("POST", r"^/api/projects/\d+/import$")
        ws = tmp_path / "ws2"
        run = _demo(ws, proxy.url, token, "--turns", "1", "--devices", "2", "--frames-per-device", "150",
                    "--budget", "10", "--allow-short")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    turns = json.loads((ws / "report" / "results.json").read_text())["turns"]
    assert turns[1]["spent"] == 0 and turns[1]["short_fault"] and "refused" in turns[1]["short"]
    assert "(short, fault: 0/10)" in (ws / "report" / "index.html").read_text()
