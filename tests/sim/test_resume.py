"""The demo's state on disk (fleet.sim.resume): what a resumed demo reads back, and what it refuses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fleet.sim.fleet import Frames
from fleet.sim.report import ArmResult, TurnResult
from fleet.sim.resume import (
    DEMO_MARK,
    DemoState,
    NotResumable,
    TurnProgress,
    _zombie,
    load_frames,
    marking_children,
    rng_state,
    save_frames,
    set_rng_state,
    settings_from_dict,
    settings_to_dict,
    stop_leftovers,
    turn_from_dict,
)
from fleet.sim.settings import TASK_DEFAULTS, Arm, DemoSettings


def a_state(ws: Path) -> DemoState:
    settings = DemoSettings(workspace=ws, turns=3, budget=8, test_size=40)
    rng = np.random.default_rng(7)
    state = DemoState(settings=settings_to_dict(settings), hub={"port": 1234, "keys": {"admin": "a"}},
                      base_version="base-s0", arms={}, rng=rng_state(rng))
    state.set_arms(Arm("flywheel", checkpoint=ws / "c.pt", version="fw-1-s0", onnx=ws / "m.onnx", labels=8),
                   Arm("random", version="base-s0", labels=8))
    state.turns.append({"turn": 0, "flywheel": {"accuracy": 0.5, "per_condition": {"clear": 0.5}, "labels": 0},
                        "random": {"accuracy": 0.5, "per_condition": {}, "labels": 0}, "gate": "base"})
    state.current = TurnProgress(1, rng_state(rng), phase="labeling", labeled_before=3, parts={"fleet": 1.5},
                                 launched={"rnd-1": 1796617547.963})
    return state


def test_the_state_round_trips_and_only_its_owner_reads_it(tmp_path: Path) -> None:
    state = a_state(tmp_path)
    state.save(tmp_path)
    path = DemoState.path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the hub's secrets
    assert not list(tmp_path.glob("*.tmp"))  # replaced atomically, nothing half-written left beside it
    back = DemoState.load(tmp_path)
    assert back == state
    assert back.demo_settings() == DemoSettings(workspace=tmp_path, turns=3, budget=8, test_size=40)
    fly = back.arm("flywheel", tmp_path)
    assert (fly.checkpoint, fly.version, fly.onnx, fly.labels) == (tmp_path / "c.pt", "fw-1-s0", tmp_path / "m.onnx", 8)
    assert back.arm("random", tmp_path).checkpoint is None
    [turn0] = back.turn_results()
    assert turn0 == TurnResult(0, ArmResult(0.5, {"clear": 0.5}, 0), ArmResult(0.5, {}, 0), gate="base")


def test_settings_and_turns_come_back_typed() -> None:
    s = DemoSettings(workspace=Path("/w"), seed_size=None, dataset="digits", upload_rate=0.1, annotate=True)
    assert settings_from_dict(json.loads(json.dumps(settings_to_dict(s)))) == s
    t = TurnResult(2, ArmResult(0.7, {"fog": 0.6}, 16, "fw-2-s0"), ArmResult(0.6, {"fog": 0.5}, 16), uploads=5,
                   parts={"fleet": 1.0}, short="why", short_fault=True, launched={"rnd-2": 10.5, "fw-2": 12.25})
    from dataclasses import asdict

    assert turn_from_dict(json.loads(json.dumps(asdict(t)))) == t


def test_a_demo_saved_before_new_repeats_existed_resumes_with_each_label_once() -> None:
    """Each label's copies in a retrain's epoch came with a classifier's default of 2; a demo saved before then ran
    with 1 and keeps it when resumed, while one saved since with the option unset still follows the task's default."""
    saved = settings_to_dict(DemoSettings(workspace=Path("/w")))
    assert saved["new_repeats"] is None
    assert settings_from_dict(saved).repeats() == TASK_DEFAULTS["classify"]["new_repeats"]
    del saved["new_repeats"]
    assert settings_from_dict(saved).new_repeats == 1 and settings_from_dict(saved).repeats() == 1


def test_a_demo_saved_before_balance_existed_resumes_selecting_over_the_whole_pool() -> None:
    """The demo's selection came to be balanced over conditions (a classifier's default); a demo saved before ran
    over the whole pool and keeps doing so when resumed."""
    saved = settings_to_dict(DemoSettings(workspace=Path("/w")))
    assert saved["balance"] is None and settings_from_dict(saved).balanced() == TASK_DEFAULTS["classify"]["balance"]
    del saved["balance"]
    assert settings_from_dict(saved).balance == "none" and settings_from_dict(saved).balanced() is None


@pytest.mark.parametrize(("content", "expected"), [
    (None, "holds no demo-state.json: there is no demo to resume there"),
    ("{not json", "is not JSON"),
    ('["a list"]', "has format 'list'; expected 'flywheel.demo-state/1'"),
    ('{"format": "flywheel.demo-state/0"}', "has format 'flywheel.demo-state/0'; expected 'flywheel.demo-state/1'"),
    ('{"format": "flywheel.demo-state/1", "settings": {}}', "lacks ['arms', 'base_version', 'hub', 'rng']"),
])
def test_a_workspace_without_a_demo_state_is_refused_with_the_reason(tmp_path: Path, content: str | None,
                                                                     expected: str) -> None:
    if content is not None:
        DemoState.path(tmp_path).write_text(content)
    with pytest.raises(NotResumable, match=expected.replace("[", r"\[").replace("(", r"\(")):
        DemoState.load(tmp_path)


def test_a_missing_workspace_is_named(tmp_path: Path) -> None:
    with pytest.raises(NotResumable, match="does not exist"):
        DemoState.load(tmp_path / "nope")


def test_the_world_replays_from_a_saved_generator_state() -> None:
    rng = np.random.default_rng(3)
    rng.random(5)
    saved = json.loads(json.dumps(rng_state(rng)))
    first = rng.integers(0, 1000, 20)
    other = np.random.default_rng(99)
    set_rng_state(other, saved)
    assert (other.integers(0, 1000, 20) == first).all()


def test_frames_round_trip(tmp_path: Path) -> None:
    f = Frames(np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8), np.array([3, 4]), np.array(["clear", "fog"]),
               np.array(["t1-000001", "t1-000002"]), np.array([-1, 4]))
    back = load_frames(save_frames(f, tmp_path / "f.npz"))
    for name in ("images", "labels", "conditions", "frame_ids", "human"):
        assert (getattr(back, name) == getattr(f, name)).all()


def test_leftovers_are_stopped_by_pid_only_when_their_command_line_matches(tmp_path: Path) -> None:
    marker = str(tmp_path / "hub")
    code = "import time, sys; time.sleep(120)"
    mine = subprocess.Popen([sys.executable, "-c", code, marker], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", code, "something else"], start_new_session=True)
    said: list[str] = []
    try:
        stopped = stop_leftovers({"hub": [mine.pid, marker], "reused pid": [stranger.pid, marker],
                                  "gone": [2**22 + 12345, marker]}, said.append)
        assert stopped == ["hub"]
        assert mine.wait(10) is not None
        time.sleep(0.2)
        assert stranger.poll() is None  # a pid now held by something else is left alone
        assert said == [f"stopping hub (pid {mine.pid}), left running by the interrupted demo"]
    finally:
        for p in (mine, stranger):
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)


def has_in_command_line(pid: int, word: bytes) -> bool:
    """Whether ``pid``'s command line holds ``word``, waiting out the moment just after exec when /proc shows it
    empty (the parent's Popen returns once the close-on-exec pipe closes, before the new argv is in place)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if word in Path(f"/proc/{pid}/cmdline").read_bytes():
            return True
        time.sleep(0.01)
    return False


def test_a_stopped_leftover_is_stopped_too(tmp_path: Path) -> None:
    """A leftover frozen by SIGSTOP (Ctrl-Z, a debugger) still ends on the first, polite signal."""
    marker = str(tmp_path / "models" / "rnd-2")
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", marker], start_new_session=True)
    try:
        assert has_in_command_line(frozen.pid, marker.encode())
        os.killpg(frozen.pid, signal.SIGSTOP)
        t = time.monotonic()
        assert stop_leftovers({"train rnd-2": [frozen.pid, marker]}, lambda _: None) == ["train rnd-2"]
        assert frozen.wait(10) == -signal.SIGTERM
        assert time.monotonic() - t < 10  # not the 15 s wait before SIGKILL
    finally:
        if frozen.poll() is None:
            os.killpg(frozen.pid, signal.SIGKILL)
            frozen.wait(10)


def test_a_member_that_outlives_its_leader_on_sigterm_is_killed_too(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault: a leftover's child ignores SIGTERM and so outlives its leader (which ends at once). Waiting for
    the leader alone would leave the child running; the whole group gets SIGKILL once the wait is up."""
    monkeypatch.setattr("fleet.sim.resume.TERM_WAIT_S", 1.0)
    marker = str(tmp_path / "models" / "rnd-3")
    child_pid = tmp_path / "child.pid"
    stubborn = ("import signal, time, os, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)")
    leader_code = ("import subprocess, sys, time; "
                   f"subprocess.Popen([sys.executable, '-c', {stubborn!r}, {str(child_pid)!r}]); time.sleep(120)")
    leader = subprocess.Popen([sys.executable, "-c", leader_code, marker], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (child_pid.exists() and child_pid.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(child_pid.read_text())
        assert os.getpgid(child) == leader.pid and has_in_command_line(leader.pid, marker.encode())
        assert stop_leftovers({"train rnd-3": [leader.pid, marker]}, lambda _: None) == ["train rnd-3"]
        assert leader.wait(10) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and not _zombie(child) and time.monotonic() < deadline:
            time.sleep(0.05)  # reaped by init once killed
        assert not Path(f"/proc/{child}").exists() or _zombie(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(10)


def marked(pid: int, ws: Path) -> bool:
    """Whether ``pid``'s environment holds ``ws``'s mark yet (empty in /proc just after exec)."""
    mark = f"{DEMO_MARK}={ws.resolve()}".encode()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return True
        time.sleep(0.01)
    return False


def test_a_run_killed_before_the_state_named_it_is_found_by_its_mark(tmp_path: Path) -> None:
    """The fault: the demo dies hard after starting a trainer run and before its state names the run (the pid
    hook never returns). The resume still stops that run, found by the workspace's mark in its environment;
    runs marked for another workspace, and unmarked ones, are left alone."""
    ws, other = tmp_path / "ws", tmp_path / "other"
    pid_file = tmp_path / "orphan.pid"
    crash = (
        "import os, sys; from pathlib import Path\n"
        "from fleet.sim.procs import LoggedRun\n"
        "from fleet.sim.resume import marking_children\n"
        f"with marking_children(Path({str(ws)!r})):\n"
        "    LoggedRun([sys.executable, '-c', 'import time; time.sleep(120)', 'orphan'],\n"
        f"              Path({str(tmp_path / 'orphan.log')!r}),\n"
        f"              started=lambda pid: (Path({str(pid_file)!r}).write_text(str(pid)), os._exit(9)))\n"
    )
    code = "import time; time.sleep(120)"
    assert DEMO_MARK not in os.environ
    with marking_children(other):
        stranger = subprocess.Popen([sys.executable, "-c", code, "stranger"], start_new_session=True)
    assert DEMO_MARK not in os.environ  # restored: only what starts inside carries the mark
    plain = subprocess.Popen([sys.executable, "-c", code, "plain"], start_new_session=True)
    died = subprocess.run([sys.executable, "-c", crash], timeout=60)
    assert died.returncode == 9
    orphan = int(pid_file.read_text())
    said: list[str] = []
    try:
        assert marked(orphan, ws) and marked(stranger.pid, other)
        assert stop_leftovers({}, said.append) == []  # the state names nothing: by pid alone, nothing is found
        assert stop_leftovers({}, said.append, ws=ws) == [Path(sys.executable).name]
        assert said == [f"stopping {Path(sys.executable).name} (pid {orphan}), left running by the interrupted "
                        f"demo before its state named it"], said
        deadline = time.monotonic() + 10
        while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:  # reaped by init once killed
            time.sleep(0.05)
        assert not Path(f"/proc/{orphan}").exists() or _zombie(orphan)
        assert stranger.poll() is None and plain.poll() is None
    finally:
        for p in (stranger, plain):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        if Path(f"/proc/{orphan}").exists():
            os.killpg(orphan, signal.SIGKILL)


def test_a_run_names_its_pid_at_once_and_stops_with_its_caller(tmp_path: Path) -> None:
    """``run_logged`` tells its caller the pid while the run goes on (the demo writes it to its state, so a resume
    stops a run a hard kill left behind); when the caller stops (Ctrl-C), the run stops with it."""
    from fleet.sim.procs import run_logged

    seen: list[int] = []

    def started(pid: int) -> None:
        seen.append(pid)
        assert has_in_command_line(pid, b"run-marker")  # the run itself
        raise KeyboardInterrupt  # the demo stopped while the run went on

    with pytest.raises(KeyboardInterrupt):
        run_logged([sys.executable, "-c", "import time; time.sleep(120)", "run-marker"], tmp_path / "run.log",
                   started=started)
    assert len(seen) == 1
    deadline = time.monotonic() + 10
    while Path(f"/proc/{seen[0]}").exists() and time.monotonic() < deadline:  # reaped by stop_process
        time.sleep(0.05)
    assert not Path(f"/proc/{seen[0]}").exists()
    assert (tmp_path / "run.log").read_text().startswith("$ ")  # the command line, logged before it ran


def test_runs_started_side_by_side_each_end_on_their_own_terms(tmp_path: Path) -> None:
    """``LoggedRun`` (the demo's two retrains of a turn run at once): each run's exit code, its log's tail when it
    fails, and its timeout counted from its start, after which it is stopped, not left running."""
    from fleet.sim.procs import LoggedRun, ProcessFailed

    def py(code: str, name: str, **kw: object) -> LoggedRun:
        return LoggedRun([sys.executable, "-c", code, name], tmp_path / f"{name}.log", **kw)  # type: ignore[arg-type]

    # side by side, not one after the other: each run ends only once it has seen the other one started (a
    # file each), and gives up with exit 9 after 60 s
    meet = ("import sys, time; from pathlib import Path; d = Path({d!r}); (d / '{me}.up').touch()\n"
            "t = time.monotonic()\n"
            "while not (d / '{other}.up').exists():\n"
            "    time.sleep(0.01)\n"
            "    if time.monotonic() - t > 60: sys.exit(9)\n")
    slow = py(meet.format(d=str(tmp_path), me="slow", other="rejected"), "slow")
    rejected = py(meet.format(d=str(tmp_path), me="rejected", other="slow") + "print('gate refused'); sys.exit(3)",
                  "rejected", ok_codes=(0, 3))
    assert slow.wait() == 0 and rejected.wait() == 3
    assert "gate refused" in (tmp_path / "rejected.log").read_text()
    failed = py("import sys; print('the trainer broke'); sys.exit(2)", "failed")
    with pytest.raises(ProcessFailed, match=r"(?s)exited with code 2.*the trainer broke"):
        failed.wait()
    hung = py("import time; time.sleep(120)", "hung", timeout=1.0)
    time.sleep(1.2)  # the time before the wait counts
    with pytest.raises(ProcessFailed, match="ran past 1s"):
        hung.wait()
    assert hung.proc.poll() is not None  # stopped and reaped
    assert (tmp_path / "hung.log").read_text().startswith("$ ")


def test_a_run_that_failed_unseen_is_trained_again_not_taken_as_finished(tmp_path: Path) -> None:
    """The fault: a trainer run a hard kill left behind failed later (its folder pulled from under it), so its
    report says ``failed`` (its gate may have passed) and there is no model. A resume trains it again instead of
    taking that report for a finished run (and then reading a model that was never exported); a run seen through
    is kept."""
    from fleet.sim.trainer import Trainer

    t = Trainer(DemoSettings(workspace=tmp_path), tmp_path, tmp_path / "key", None, "token",  # type: ignore[arg-type]
                tmp_path / "seed.npz", ["a", "b"])
    out = tmp_path / "models" / "rnd-1"
    for status in ("failed", "running", None):
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt").write_bytes(b"half")
        (out / "report.json").write_text(json.dumps({"status": status, "gate": {"passed": True},
                                                     "error": "FileNotFoundError: ...model.fp32.onnx"}))
        assert t.finished("rnd-1") is None, status
        assert not out.exists()  # removed, so the new run starts clean
    out.mkdir(parents=True)
    (out / "report.json").write_text("{not json")
    assert t.finished("rnd-1") is None and not out.exists()
    out.mkdir(parents=True)
    gate = {"passed": False, "reasons": ["fell 0.02 below the baseline"]}
    (out / "report.json").write_text(json.dumps({"status": "rejected", "gate": gate, "timings": {"total": 3.0}}))
    done = t.finished("rnd-1")
    assert done is not None and not done.passed and done.timings == {"total": 3.0} and out.exists()
