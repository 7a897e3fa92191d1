"""`flywheel demo --resume`: a demo killed hard (SIGKILL, no clean-up) or stopped with Ctrl-C at any step picks up
where it stopped, and ends as the uninterrupted run would have: every turn spends its budget exactly once (no label
given twice, no turn repeated or skipped), the random arm labels the very same frames, and nothing the dead run
started is left running.

The oracle labels here (Label Studio across a resume: tests/system/test_demo_resume_studio.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleet.sim.resume import PHASES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = ["--labeler", "oracle", "--turns", "3", "--devices", "2", "--frames-per-device", "100", "--budget", "8",
         "--base-epochs", "3", "--epochs", "2", "--test-size", "40"]
BUDGET, TURNS = 8, 3


def demo(ws: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def state(ws: Path) -> dict | None:  # type: ignore[type-arg]
    try:
        return json.loads((ws / "demo-state.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def stop_at(proc: subprocess.Popen[str], ws: Path, turn: int, phase: str, sig: int, *, freeze: str = "") -> str:
    """Send ``sig`` to the demo (not its children: they die or linger as they would) once its state shows ``turn``
    at ``phase`` or later; return what it printed. ``freeze``: instead, once the state names that process (a
    trainer run), stop that process (SIGSTOP) and then the demo, so the run is certain to outlive it unfinished."""
    order = list(PHASES)
    before = (state(ws) or {}).get("processes", {}).get(freeze)  # what an earlier run left named there
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        s = state(ws)
        if s is not None:
            cur = s.get("current")
            done = len(s["turns"]) - 1
            if freeze:
                if s.get("processes", {}).get(freeze, before) != before:
                    os.killpg(int(s["processes"][freeze][0]), signal.SIGSTOP)
                    os.kill(proc.pid, sig)
                    break
            elif done >= turn or (cur and cur["turn"] == turn and order.index(cur["phase"]) >= order.index(phase)):
                os.kill(proc.pid, sig)
                break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 130  # Ctrl-C and TERM: a clean stop, exit 130
    assert proc.returncode == expected, f"stopping at turn {turn} {phase} with {sig!r}: exit {proc.returncode}:\n{out}"
    return out


def leftovers(ws: Path) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(ws) in cmd:
                out.append(f"{d.name}: {cmd[:200]}")
    return out


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """However the test ends, nothing it started (a hub a killed demo left behind) outlives it."""
    yield
    for line in leftovers(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(line.split(":", 1)[0]), signal.SIGKILL)


@pytest.mark.usefixtures("no_leftovers")
def test_a_demo_killed_at_any_step_resumes_and_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    p = demo(straight, *SMALL)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out

    ws = tmp_path / "ws"
    said = [stop_at(demo(ws, *SMALL), ws, 1, "fleet", signal.SIGKILL)]
    assert "resume" not in said[0]  # a hard kill says nothing
    assert leftovers(ws), "the hub should outlive a SIGKILLed demo (it runs in its own session)"
    # each stop lands in a later step, whichever: the state on disk decides where the next run starts
    for turn, phase, sig in ((1, "labeled", signal.SIGKILL), (2, "labeling", signal.SIGINT)):
        said.append(stop_at(demo(ws, "--resume"), ws, turn, phase, sig))
    # killed once turn 2's random-arm retrain runs in its own process (while the flywheel arm labels): that run
    # outlives the demo, unfinished
    said.append(stop_at(demo(ws, "--resume"), ws, 2, "labeled", signal.SIGKILL, freeze="train rnd-2"))
    said.append(stop_at(demo(ws, "--resume"), ws, 3, "start", signal.SIGTERM))
    assert "resuming the demo in" in said[1]
    assert "stopping hub (pid" in said[1]  # the dead run's hub, found by its pid and command line
    assert f"flywheel demo --resume --workspace {ws}" in " ".join(said[2].split())  # Ctrl-C says how to go on
    assert "stopping train rnd-2 (pid" in said[4], said[4]  # before it trains rnd-2 again into the same folder
    last = demo(ws, "--resume")
    out, _ = last.communicate(timeout=600)
    assert last.returncode == 0, out
    assert not leftovers(ws), leftovers(ws)

    mine = json.loads((ws / "report" / "results.json").read_text())["turns"]
    ref = json.loads((straight / "report" / "results.json").read_text())["turns"]
    assert [t["turn"] for t in mine] == list(range(TURNS + 1))
    for t in mine[1:]:
        assert t["spent"] == BUDGET and not t["short"], t
        assert t["flywheel"]["labels"] == t["random"]["labels"] == BUDGET * t["turn"]
    # the same world: every turn streamed the same frames, so the random arm labeled the very same ones ...
    for turn in range(1, TURNS + 1):
        a, b = (np.load(d / f"random-picks-{turn}.npz") for d in (ws, straight))
        assert (a["frame_ids"] == b["frame_ids"]).all()
        assert (a["labels"] == b["labels"]).all()
    # ... and its control models, trained on them with the same seeds, score the same
    assert [t["random"]["accuracy"] for t in mine] == [t["random"]["accuracy"] for t in ref]
    # no label given twice, none lost: the last retrain's snapshot holds every label the flywheel arm spent
    last_fw = max((ws / "models").glob(f"fw-{TURNS}*"), key=lambda d: d.stat().st_mtime)
    data = json.loads((last_fw / "report.json").read_text())["data"]
    assert data["snapshot"]["entries"] == BUDGET * TURNS, data["snapshot"]

    again = demo(ws, "--resume")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "finished all 3 turn(s); nothing to resume" in " ".join(out.split()), out


def test_resume_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    nothing = tmp_path / "empty"
    nothing.mkdir()
    p = demo(nothing, "--resume")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1 and "no demo-state.json: there is no demo to resume there" in " ".join(out.split()), out

    (nothing / "demo-state.json").write_text('{"format": "something/9"}')
    p = demo(nothing, "--resume", "--budget", "9")
    out, _ = p.communicate(timeout=120)
    flat = " ".join(out.split())
    assert p.returncode == 2 and "format 'something/9'; expected 'flywheel.demo-state/1'" in flat, out

    p = subprocess.run([sys.executable, "-m", "fleet.cli", "demo", "--resume"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "--resume needs --workspace" in " ".join(p.stderr.split()), p.stderr
