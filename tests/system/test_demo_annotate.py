"""`flywheel demo --annotate`: you are the annotator. The demo pushes a turn's tasks to Label Studio and waits;
a person (here headless Chromium, driven as a person would: log in, open a task, click a class, submit) labels
some of them in Label Studio's own UI, watches the progress line move, ends the turn early, and the labels
reach the trainer (its snapshot holds exactly the classes clicked).

Uses the Label Studio that scripts/test.sh starts (FLYWHEEL_TEST_LS_*), through FLYWHEEL_STUDIO_URL/TOKEN.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.browser import chromium_page, studio_login
from tests.support.services import missing_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

class Lines:
    """A child's stdout, line by line, read on a thread so the test can wait for a line with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        out = proc.stdout
        threading.Thread(target=lambda: [self.q.put(line) for line in out], daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=1.0)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout:.0f}s; the demo said:\n"
                             + "".join(self.seen[-40:]))


def label_in_the_browser(url: str, email: str, password: str, project_id: int, picks: dict[int, str],
                         shots: Path) -> None:
    """Log in to Label Studio as a person, open each task, click the class, submit."""
    with chromium_page() as page:
        studio_login(page, url, email, password)
        for task_id, name in picks.items():
            page.goto(f"{url}/projects/{project_id}/data?task={task_id}")
            radio = page.locator(f"input[type=radio][name={name!r}]").first
            radio.wait_for(state="attached", timeout=60_000)
            page.wait_for_timeout(1000)  # the model's guess is pre-selected once the task has loaded
            page.locator("label", has=radio).first.click()
            page.wait_for_function("n => document.querySelector(`input[type=radio][name=\"${n}\"]`).checked",
                                   arg=name, timeout=10_000)
            page.screenshot(path=str(shots / f"task-{task_id}.png"))
            page.get_by_role("button", name="Submit").first.click()
            page.wait_for_timeout(1500)


def studio_for_the_demo() -> tuple[str, str, str, str, dict[str, str]]:
    """The Label Studio scripts/test.sh started: URL, API token, a person's login (email, password), and the
    environment that points the demo at it."""
    env_keys = ("FLYWHEEL_TEST_LS_URL", "FLYWHEEL_TEST_LS_TOKEN", "FLYWHEEL_TEST_LS_USER", "FLYWHEEL_TEST_LS_PASSWORD")
    url, token, email, password = (os.environ.get(k) for k in env_keys)
    if not (url and token and email and password):
        missing_service(f"{', '.join(env_keys)} not set (scripts/test.sh starts Label Studio)")
    env = {**os.environ, "FLYWHEEL_STUDIO_URL": url, "FLYWHEEL_STUDIO_TOKEN": token, "COLUMNS": "400"}
    return url, token, email, password, env


def test_you_label_in_label_studio_and_the_loop_turns_on_your_labels(tmp_path: Path) -> None:
    url, token, email, password, env = studio_for_the_demo()
    from labeling.studio import Studio

    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), "--annotate", "--turns", "1",
           "--devices", "1", "--frames-per-device", "120", "--budget", "4", "--base-epochs", "3", "--epochs", "2",
           "--test-size", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = Lines(proc)
    try:
        waiting = lines.wait_for("task(s) wait for you in Label Studio", 600)
        lines.wait_for("turn 1: 0 / 4 labeled", 120)
        title = waiting.split("project '", 1)[1].split("';", 1)[0]
        studio = Studio(url, token)
        project = studio.find_project(title)
        assert project is not None, waiting
        tasks = sorted(t.id for t in studio.iter_tasks(project.id))
        assert len(tasks) == 4
        picks = {tasks[0]: "0", tasks[1]: "7"}  # whatever the model guessed: the person's answer is what counts
        label_in_the_browser(url, email, password, project.id, picks, tmp_path)
        lines.wait_for("turn 1: 2 / 4 labeled", 180)
        (ws / "finish-turn").touch()
        lines.wait_for("you finished the turn early: 2 of 4 task(s) labeled", 120)
        assert proc.wait(600) == 0, "".join(lines.seen[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    said = " ".join("".join(lines.seen).split())
    assert "Label Studio" in said and "with you as the annotator" in said
    assert not (ws / "finish-turn").exists()
    results = json.loads((ws / "report" / "results.json").read_text())
    assert results["turns"][1]["flywheel"]["labels"] == 2 and results["error"] is None
    data = json.loads((ws / "models" / "fw-1" / "report.json").read_text())["data"]
    assert data["snapshot"]["entries"] == 2 and data["new"]["n"] == 2
    per_class = data["new"]["per_class"]
    assert per_class[0] == 1 and per_class[7] == 1 and sum(per_class) == 2  # exactly the classes clicked
    studio.close()
