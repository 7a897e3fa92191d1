"""An interrupted ``flywheel demo`` picks up where it stopped (``flywheel demo --resume``).

The demo writes its progress to ``<workspace>/demo-state.json`` (mode 0600: it holds the hub's and Label
Studio's secrets), replacing the file atomically after every step that must not be done twice: the base model's
rollout, each turn's fleet run, its labeling, its retrain, and the turn's end. A resumed demo starts the hub
again on the same port with the same secrets (agents' configs, Label Studio's tasks and its webhook name them),
comes back to the same Label Studio project, and replays the world's random stream from the interrupted turn's
start, so the frames, shards and the random arm's picks are the ones the uninterrupted run would have had.

Processes a hard kill left behind (the hub, Label Studio, agents, trainer runs: each runs in its own session)
are stopped before anything starts again: those the state names, by pid and command line, and any the kill left
before the state could name it (it landed between a process's start and the state's next save), by the mark every
process a demo starts carries in its environment (``FLYWHEEL_DEMO_WORKSPACE``: the workspace).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fleet.sim.detect_world import SceneFrames
from fleet.sim.fleet import Frames
from fleet.sim.report import ArmResult, TurnResult
from fleet.sim.settings import Arm, DemoSettings

STATE_FILE = "demo-state.json"
FORMAT = "flywheel.demo-state/1"
TERM_WAIT_S = 15.0  # how long a leftover's process group has to end on SIGTERM before it gets SIGKILL
PHASES = ("start", "fleet", "labeling", "labeled", "trained")  # a turn's steps, in order
DEMO_MARK = "FLYWHEEL_DEMO_WORKSPACE"  # in the environment of every process a demo starts: its workspace


class NotResumable(ValueError):
    """The workspace holds no demo that can be resumed, or the resume was asked to change its settings."""


@dataclass
class TurnProgress:
    """The turn in flight: the step it reached and what the earlier steps measured."""

    turn: int
    rng: dict[str, Any]  # the world's generator at the turn's start: frames and the random pick replay from it
    phase: str = "start"
    parts: dict[str, float] = field(default_factory=dict)
    gate_note: str = ""
    uploads: int = 0
    model_errors: int = 0
    errors_captured: int = 0
    labeled_before: int | None = None  # the hub's labeled count when the turn's labeling began
    label_round: dict[str, Any] | None = None  # the LabelRound, once labeling ended
    short: str = ""
    short_fault: bool = False
    candidate: dict[str, Any] | None = None  # the flywheel candidate, once trained: version, paths, gate
    launched: dict[str, float] = field(default_factory=dict)  # trainer run -> wall time the demo launched it


@dataclass
class DemoState:
    settings: dict[str, Any]
    hub: dict[str, Any]  # port and secrets
    base_version: str
    arms: dict[str, dict[str, Any]]  # flywheel / random: checkpoint, version, onnx, labels
    rng: dict[str, Any]  # the world's generator at the next turn's start
    turns: list[dict[str, Any]] = field(default_factory=list)
    rollout_id: str | None = None  # a canary rollout the next turn finishes
    studio: dict[str, Any] = field(default_factory=dict)  # how the labeler comes back to its Label Studio project
    random_picks: list[str] = field(default_factory=list)  # npz files of the random arm's labeled frames
    current: TurnProgress | None = None
    starts: list[dict[str, Any]] = field(default_factory=list)  # the world's generator at each turn's start
    processes: dict[str, list[Any]] = field(default_factory=dict)  # name -> [pid, a word its command line holds]

    # --- the file -------------------------------------------------------------------------------

    @staticmethod
    def path(ws: Path) -> Path:
        return ws / STATE_FILE

    def save(self, ws: Path) -> None:
        """Replace the state file atomically (write, fsync, rename), readable by its owner only."""
        doc = {"format": FORMAT, **asdict(self)}
        path = self.path(ws)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, ws: Path) -> DemoState:
        path = cls.path(ws)
        if not path.is_file():
            why = "does not exist" if not ws.exists() else f"holds no {STATE_FILE}"
            raise NotResumable(f"workspace {ws} {why}: there is no demo to resume there (a demo becomes resumable "
                               f"once its base model is rolled out)")
        try:
            doc = json.loads(path.read_text())
        except ValueError as exc:
            raise NotResumable(f"{path} is not JSON ({exc}); expected a flywheel demo's state") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise NotResumable(f"{path} has format {got!r}; expected {FORMAT!r}")
        names = {f.name for f in fields(cls)}
        missing = {"settings", "hub", "base_version", "arms", "rng"} - doc.keys()
        if missing:
            raise NotResumable(f"{path} lacks {sorted(missing)}; expected a complete demo state")
        body = {k: v for k, v in doc.items() if k in names}
        if body.get("current") is not None:
            body["current"] = TurnProgress(**body["current"])
        return cls(**body)

    # --- what it holds --------------------------------------------------------------------------

    def demo_settings(self) -> DemoSettings:
        return settings_from_dict(self.settings)

    def turn_results(self) -> list[TurnResult]:
        return [turn_from_dict(t) for t in self.turns]

    def arm(self, name: str, ws: Path) -> Arm:
        d = self.arms[name]
        arm = Arm(name, checkpoint=_path(d.get("checkpoint")), version=d.get("version"), onnx=_path(d.get("onnx")),
                  labels=int(d.get("labels", 0)))
        if name == "random":
            arm.labeled = [load_frames(ws / f) for f in self.random_picks]
        return arm

    def set_arms(self, *arms: Arm) -> None:
        for a in arms:
            self.arms[a.name] = {"checkpoint": _str(a.checkpoint), "version": a.version, "onnx": _str(a.onnx),
                                 "labels": a.labels}


def settings_to_dict(s: DemoSettings) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}


# what a demo saved before a setting existed ran with (today's default may differ, and a resumed demo keeps its own)
SAVED_BEFORE = {"new_repeats": 1, "balance": "none"}


def settings_from_dict(d: dict[str, Any]) -> DemoSettings:
    known = {f.name for f in fields(DemoSettings)}
    body: dict[str, Any] = {**SAVED_BEFORE, **{k: v for k, v in d.items() if k in known}}
    body["workspace"] = Path(body["workspace"])
    return DemoSettings(**body)


def turn_from_dict(d: dict[str, Any]) -> TurnResult:
    known = {f.name for f in fields(TurnResult)}
    body = {k: v for k, v in d.items() if k in known}
    body["flywheel"], body["random"] = ArmResult(**d["flywheel"]), ArmResult(**d["random"])
    return TurnResult(**body)


def save_frames(frames: Frames | SceneFrames, path: Path) -> Path:
    np.savez(path, **{f.name: getattr(frames, f.name) for f in fields(frames)})
    return path


def load_frames(path: Path) -> Frames | SceneFrames:
    """Frames saved by :func:`save_frames`: a classifier's, or a detector's (they have boxes)."""
    with np.load(path) as z:
        cls: type[Frames] | type[SceneFrames] = SceneFrames if "box_frame" in z.files else Frames
        return cls(*(z[f.name] for f in fields(cls)))


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(json.dumps(rng.bit_generator.state))  # plain JSON types
    return state


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


@contextlib.contextmanager
def marking_children(ws: Path) -> Iterator[None]:
    """Inside, every process started from here (and every process those start) carries ``DEMO_MARK`` = the
    resolved ``ws`` in its environment, so a resume finds it even when a hard kill left it unnamed in the state."""
    before = os.environ.get(DEMO_MARK)
    os.environ[DEMO_MARK] = str(ws.resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DEMO_MARK, None)
        else:
            os.environ[DEMO_MARK] = before


def stop_leftovers(processes: dict[str, list[Any]], say: Any, *, ws: Path | None = None) -> list[str]:
    """SIGTERM (then SIGKILL) the process group of each leftover still running whose command line holds its
    marker (a pid reused by something else is left alone); then, with ``ws``, of every process still running
    that carries that workspace's ``DEMO_MARK`` (one the state never named); return the names stopped."""
    stopped = []
    for name, (pid, marker) in processes.items():
        try:
            cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone
        if str(marker) not in cmdline:
            continue
        say(f"stopping {name} (pid {pid}), left running by the interrupted demo")
        _stop_group(int(pid))
        stopped.append(name)
    if ws is not None:
        for pgid, what in marked_processes(ws).items():
            say(f"stopping {what} (pid {pgid}), left running by the interrupted demo before its state named it")
            _stop_group(pgid)
            stopped.append(what)
    return stopped


def marked_processes(ws: Path) -> dict[int, str]:
    """The process groups (other than this process's) holding a process marked with ``ws``, each with what its
    leader runs (``flywheel train``, ``label-studio``)."""
    mark = f"{DEMO_MARK}={ws.resolve()}".encode()
    groups: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if mark not in (d / "environ").read_bytes().split(b"\0"):
                continue
            pgid = os.getpgid(int(d.name))
        except OSError:  # gone, or another user's
            continue
        if pgid == os.getpgrp() or _zombie(int(d.name)):
            continue
        if pgid not in groups or int(d.name) == pgid:
            groups[pgid] = _describe(d)
    return groups


def _describe(proc: Path) -> str:
    try:
        argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "a process"
    if "fleet.cli" in argv:  # flywheel hub serve, flywheel agent run, flywheel train rnd-2
        rest = argv[argv.index("fleet.cli") + 1:]
        words = list(itertools.takewhile(lambda w: not w.startswith("-"), rest))[:2]
        if "--out" in rest[:-1]:
            words.append(Path(rest[rest.index("--out") + 1]).name)
        return "flywheel " + " ".join(words)
    return Path(argv[0]).name if argv else "a process"


def _stop_group(pid: int) -> None:
    """SIGTERM the process group ``pid`` leads, then SIGKILL it if any of its members (not only the leader: a
    child that ignores SIGTERM outlives its parent) is still running ``TERM_WAIT_S`` later."""
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
            os.killpg(pid, signal.SIGCONT)  # a stopped process (Ctrl-Z, a debugger) acts on TERM only then
        except ProcessLookupError:
            return
        deadline = time.monotonic() + TERM_WAIT_S
        while time.monotonic() < deadline and _group_running(pid):
            time.sleep(0.2)
        if not _group_running(pid):
            return


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (a zombie is not: it only waits to be reaped)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, group = _stat(d)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if group == pgid and state != "Z":
            return True
    return False


def _stat(proc: Path) -> tuple[str, int]:
    """A process's state letter and process group, from ``/proc/PID/stat`` (after the name, which may hold
    spaces and parentheses)."""
    fields = proc.joinpath("stat").read_text().rsplit(") ", 1)[1].split()
    return fields[0], int(fields[2])


def _zombie(pid: int) -> bool:
    try:
        return _stat(Path(f"/proc/{pid}"))[0] == "Z"
    except (OSError, IndexError, ValueError):
        return True


def _path(v: str | None) -> Path | None:
    return Path(v) if v else None


def _str(p: Path | None) -> str | None:
    return str(p) if p is not None else None
