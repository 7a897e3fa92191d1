"""`flywheel demo --annotate`, interrupted while you label and resumed: the labels you gave before the interruption
count, the tasks still open in Label Studio wait for you (nothing is pushed twice), and the loop turns on all of
your labels, then goes on to the next model version's tasks.

A person is headless Chromium here, driven as in tests/system/test_demo_annotate.py. Uses the Label Studio that
scripts/test.sh starts (FLYWHEEL_TEST_LS_*), through FLYWHEEL_STUDIO_URL/TOKEN.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.test_demo_annotate import Lines, label_in_the_browser, studio_for_the_demo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_an_interrupted_annotate_demo_resumes_with_your_labels_and_open_tasks(tmp_path: Path) -> None:
    url, token, email, password, env = studio_for_the_demo()
    from labeling.studio import Studio

    ws = tmp_path / "ws"

    def demo(*args: str) -> tuple[subprocess.Popen[str], Lines]:
        cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        return proc, Lines(proc)

    studio = Studio(url, token)
    proc, lines = demo("--annotate", "--turns", "2", "--devices", "1", "--frames-per-device", "120", "--budget", "4",
                       "--base-epochs", "3", "--epochs", "2", "--test-size", "60")
    try:
        waiting = lines.wait_for("task(s) wait for you in Label Studio", 600)
        lines.wait_for("turn 1: 0 / 4 labeled", 120)
        title = waiting.split("project '", 1)[1].split("';", 1)[0]
        project = studio.find_project(title)
        assert project is not None, waiting
        tasks = sorted(t.id for t in studio.iter_tasks(project.id))
        assert len(tasks) == 4
        label_in_the_browser(url, email, password, project.id, {tasks[0]: "0", tasks[1]: "7"}, tmp_path)
        lines.wait_for("turn 1: 2 / 4 labeled", 180)
        os.kill(proc.pid, signal.SIGINT)  # the person presses Ctrl-C
        lines.wait_for("carry on where it stopped with: flywheel demo --resume", 120)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    proc, lines = demo("--resume")
    try:
        lines.wait_for("turn 1 stopped after its labeling step", 120)
        lines.wait_for(f"project {title!r}", 300)  # the same project, with the two tasks still open in it
        lines.wait_for("turn 1: 2 / 4 labeled", 120)  # the labels given before the interruption count
        assert sorted(t.id for t in studio.iter_tasks(project.id)) == tasks  # nothing pushed again
        label_in_the_browser(url, email, password, project.id, {tasks[2]: "3", tasks[3]: "3"}, tmp_path)
        lines.wait_for("turn 1: 4 / 4 labeled", 180)
        lines.wait_for("turn 2: 0 / 4 labeled", 600)  # the next model version's tasks reach the queue
        (ws / "finish-turn").touch()
        assert proc.wait(600) == 0, "".join(lines.seen[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    all_tasks = list(studio.iter_tasks(project.id))
    assert len(all_tasks) == 8, [t.id for t in all_tasks]  # 4 a turn, each pushed once
    results = json.loads((ws / "report" / "results.json").read_text())
    assert [t["flywheel"]["labels"] for t in results["turns"]] == [0, 4, 4] and results["error"] is None
    data = json.loads((ws / "models" / "fw-1" / "report.json").read_text())["data"]
    assert data["snapshot"]["entries"] == 4 and data["new"]["n"] == 4
    per_class = data["new"]["per_class"]
    assert (per_class[0], per_class[3], per_class[7], sum(per_class)) == (1, 2, 1, 4)  # exactly what was clicked
    studio.close()
