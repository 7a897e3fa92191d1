"""The demo's trainer: ``flywheel train`` run as its own process for every model, as on a GPU box; its
report read back into a :class:`TrainResult`. Runs may overlap (:meth:`Trainer.start`): each has one CPU thread
(``--threads 1``), so two side by side on two cores compute what they would one after the other. The hub token
travels in the environment, never on the command line (``ps`` shows command lines to every user)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from fleet.protocol import RollbackRequest, RolloutList, RolloutPublic, SignedManifest
from fleet.sim.procs import HubProcess, LoggedRun, flywheel_cmd

if TYPE_CHECKING:
    from fleet.sim.settings import Arm, DemoSettings

EXIT_REJECTED = 3  # `flywheel train` exit code for a candidate the gate rejected


@dataclass
class TrainResult:
    version: str
    out: Path
    checkpoint: Path
    onnx: Path
    manifest: SignedManifest | None
    passed: bool
    published: bool
    rollout_id: str | None
    gate_summary: str
    timings: dict[str, float] = field(default_factory=dict)  # the trainer's own phases


class Trainer:
    def __init__(self, settings: DemoSettings, ws: Path, key: Path, hub: HubProcess, token: str, seed_npz: Path,
                 class_names: list[str]) -> None:
        self.settings, self.ws, self.key, self.hub, self.token = settings, ws, key, hub, token
        self.seed_npz, self.class_names = seed_npz, class_names
        # hears (name, pid, a word its command line holds) when a run starts, so a resume can stop a run a hard
        # kill left behind before it trains the same model again into the same folder
        self.started: Callable[[str, int, str], None] | None = None

    def finished(self, name: str) -> TrainResult | None:
        """The result of ``name``'s run if an earlier, interrupted demo saw it through (its report is written
        last, after publishing, with one of ``FINISHED``); None when it must run (again): a half-written output,
        or the report of a run that failed (a fault the interrupted demo never saw), is removed first."""
        import shutil

        out = self.ws / "models" / name
        if _status(out) in FINISHED:
            return self._result(name, out, publish=None)
        if out.exists():
            shutil.rmtree(out)
        return None

    def name_free_at_hub(self, name: str) -> str:
        """``name``, or when the hub already took a model by that name (an interrupted run published it but never
        wrote its report), the next ``name-rN``; that model's running rollout is rolled back first."""
        n, candidate = 1, name
        while self._at_hub(f"{candidate}-s{self.settings.seed}"):
            self._roll_back(f"{candidate}-s{self.settings.seed}")
            n += 1
            candidate = f"{name}-r{n}"
        return candidate

    def _at_hub(self, version: str) -> bool:
        r = httpx.get(f"{self.hub.url}/v1/models/{version}/manifest", headers=self.hub.admin_headers, timeout=30)
        if r.status_code == 404:
            return False
        r.raise_for_status()
        return True

    def _roll_back(self, version: str) -> None:
        for ro in self.hub.call("GET", "/v1/rollouts", RolloutList).rollouts:
            if ro.version == version and ro.state == "running":
                self.hub.call("POST", f"/v1/rollouts/{ro.rollout_id}/rollback", RolloutPublic, body=RollbackRequest(
                    reason="the demo was interrupted before it recorded this model; it trains the turn again"))

    def train(self, name: str, *, data: str, epochs: int, publish: bool, stages: str, warm: Arm | None) -> TrainResult:
        """Train ``name`` to the end (:meth:`start`, then :meth:`TrainRun.result`)."""
        return self.start(name, data=data, epochs=epochs, publish=publish, stages=stages, warm=warm).result()

    def start(self, name: str, *, data: str, epochs: int, publish: bool, stages: str, warm: Arm | None) -> TrainRun:
        """Start ``flywheel train`` for ``name`` (into ``models/NAME``, its log in ``logs/train-NAME.log``) and
        return at once; the caller must take its :meth:`TrainRun.result` or :meth:`TrainRun.stop` it."""
        s = self.settings
        out = self.ws / "models" / name
        version = f"{name}-s{s.seed}"
        args = ["train", "--task", s.task, "--data", data, "--out", str(out), "--model", s.model,
                "--width", str(s.width),
                "--epochs", str(epochs), "--seed", str(s.seed), "--version", version, "--sign-key", str(self.key),
                "--holdout", "0", "--no-progress", "--threads", "1", "--cache-dir", str(self.ws / "cache"),
                "--class-names", ",".join(self.class_names), "--min-slice-size", "1000000"]
        if data != f"npz:{self.seed_npz}":
            args += ["--base", f"npz:{self.seed_npz}", "--replay-ratio", str(s.replay()),
                     "--new-repeats", str(s.repeats())]
        if warm is not None and warm.checkpoint is not None:
            args += ["--warm-start", str(warm.checkpoint), "--gate-against", str(warm.checkpoint),
                     "--lr", str(s.turn_lr)]
            if s.gate_tolerance is None:
                args += ["--tolerance", "0.01"]
            else:
                args += ["--tolerance", str(s.gate_tolerance), "--slice-tolerance", str(s.gate_tolerance)]
        env = None
        if publish:  # the token goes in the environment: a command line is visible to every user (ps)
            args += ["--publish", self.hub.url, "--rollout-stages", stages]
            env = {**os.environ, "FLYWHEEL_TOKEN": self.token}
        else:
            args += ["--dry-run"]
        hook = self.started
        run = LoggedRun(flywheel_cmd(*args), self.ws / "logs" / f"train-{name}.log", env=env,
                        ok_codes=(0, EXIT_REJECTED),
                        started=None if hook is None else (lambda pid: hook(name, pid, str(out))))
        return TrainRun(self, name, out, publish, run)

    def _result(self, name: str, out: Path, *, publish: bool | None) -> TrainResult:
        """A finished run's TrainResult, read from its report (``publish`` None: whether it was asked to publish
        is read there too)."""
        version = f"{name}-s{self.settings.seed}"
        report = json.loads((out / "report.json").read_text())
        gate = report.get("gate") or {}
        passed = bool(gate.get("passed", True))
        pub = report.get("publish") or {}
        if publish is None:
            publish = not pub.get("dry_run", True)
        manifest = SignedManifest.from_json((out / "manifest.json").read_text()) if (out / "manifest.json").exists() \
            else None
        reasons = "; ".join(str(r) for r in gate.get("reasons", [])[:1])
        summary = f"{name}: gate {'passed' if passed else 'failed'}"
        if reasons and not passed:
            summary += f" ({reasons})"
        return TrainResult(version, out, out / "checkpoint.pt", out / "model.onnx", manifest, passed,
                           bool(pub.get("uploaded") or pub.get("version")) and publish and passed,
                           pub.get("rollout_id") or (pub.get("rollout") or {}).get("rollout_id"), summary,
                           {k: float(v) for k, v in (report.get("timings") or {}).items()})


FINISHED = ("ready", "dry_run", "published", "rejected")  # a report's status once its run has seen it through


def _status(out: Path) -> str | None:
    try:
        status = json.loads((out / "report.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


@dataclass
class TrainRun:
    """A ``flywheel train`` run :meth:`Trainer.start` started."""

    trainer: Trainer
    name: str
    out: Path
    publish: bool
    run: LoggedRun

    def result(self) -> TrainResult:
        """Wait for the run (ProcessFailed when it fails; stopped on Ctrl-C) and read its report."""
        self.run.wait()
        return self.trainer._result(self.name, self.out, publish=self.publish)

    def stop(self) -> None:
        self.run.stop()
