"""``flywheel demo``: the whole loop on one machine, measured against random labeling.

Real processes throughout: the hub (SQLite, loopback), N edge agents running the real agent code on
disjoint shards of a stream with edge conditions, the trainer CLI for every retrain. Labels come
from Label Studio with simulated annotators when it is available, otherwise from a built-in oracle.
The control arm spends the same label budget on frames drawn uniformly at random from everything
the fleet saw, and is trained by the same trainer with the same seeds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fleet.protocol import CampaignCreate, CampaignReceipt, DeviceList, PoolPage, RolloutPublic, SignedManifest
from fleet.signing import generate_keypair, write_keypair
from fleet.sim.data import load_dataset, sample_test
from fleet.sim.fleet import Frames, World, build_world
from fleet.sim.labelers import Labeler, OracleLabeler, shortfall
from fleet.sim.procs import HubProcess, flywheel_cmd, run_logged, start_hub, start_logged, stop_process, tail
from fleet.sim.report import ArmResult, TurnResult

log = logging.getLogger(__name__)

DEMO_GROUP = "demo"
EXIT_REJECTED = 3  # `flywheel train` exit code for a candidate the gate rejected
SEED_PER_CLASS = 15  # the default seed set: this many frames a class (a many-class set needs more than digits)
TEST_CAP = 500  # the default test set: at most this many images a condition (stratified), so turns stay short
NEAR_CHANCE = 1.5  # a model below this many times chance accuracy is "near chance"


@dataclass
class DemoSettings:
    workspace: Path
    turns: int = 4
    devices: int = 4
    budget: int = 40  # labels per turn, for each arm
    seed: int = 0
    dataset: str | None = None
    frames_per_device: int = 300  # per turn
    seed_size: int | None = None  # None: SEED_PER_CLASS frames a class (150 for digits)
    test_size: int | None = None  # test images per condition, stratified by class; None: all, up to TEST_CAP
    base_epochs: int = 30
    turn_epochs: int = 20
    turn_lr: float = 0.05  # fine-tuning rate from the current model's checkpoint (both arms)
    upload_rate: float = 0.08  # calibrated uncertainty trigger's target rate per device
    strategy: str = "uncertainty+diversity"
    labeler: str = "auto"  # auto | oracle | studio
    install_studio: bool = True  # auto/studio: install Label Studio into ./.venv-studio when it is missing
    annotate: bool = False  # a person labels each turn in Label Studio's UI (needs Label Studio)
    model: str = "smallcnn"
    width: int = 16
    allow_short: bool = False  # a turn whose labels fall short of the budget is an error unless this is set

    def validate(self) -> None:
        for name in ("turns", "devices", "budget", "frames_per_device", "seed_size", "test_size", "base_epochs",
                     "turn_epochs", "width"):
            value = getattr(self, name)
            if value is None and name in ("seed_size", "test_size"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; received {value!r}")
        if not 0 < self.upload_rate < 1:
            raise ValueError(f"--upload-rate must be in (0, 1); received {self.upload_rate}")
        if self.labeler not in ("auto", "oracle", "studio"):
            raise ValueError(f"--labeler must be auto, oracle or studio; received {self.labeler!r}")
        if self.annotate and self.labeler == "oracle":
            raise ValueError("--annotate has you label in Label Studio; it cannot go with --labeler oracle")

    def seed_frames(self, classes: int) -> int:
        """The seed set's size: ``seed_size`` if given, else SEED_PER_CLASS frames a class."""
        return self.seed_size if self.seed_size is not None else SEED_PER_CLASS * classes


class ShortTurn(RuntimeError):
    """An arm could not spend its label budget for a reason other than the pool's supply."""


@dataclass
class Arm:
    """One arm's state across turns: its current checkpoint, version, and labels spent."""

    name: str
    checkpoint: Path | None = None
    version: str | None = None
    onnx: Path | None = None
    labels: int = 0
    labeled: list[Frames] = field(default_factory=list)


Progress = Callable[[str], None]


def campaign_spec(settings: DemoSettings) -> dict[str, Any]:
    """The fleet's trigger spec: the human disagreeing is the strongest signal; then calibrated uncertainty."""
    return {
        "format": "flywheel.trigger/1",
        "id": "demo-edge-cases",
        "version": 1,
        "expires_at": None,
        "description": "frames where the model disagrees with the human or is unsure",
        "rule": {"any_of": [
            {"trigger": "human_disagreement", "weight": 1.0},
            {"trigger": "challenger_disagreement", "weight": 0.8},
            {"trigger": "entropy", "target_rate": settings.upload_rate, "weight": 0.7},
        ]},
    }


def run_demo(settings: DemoSettings, *, progress: Progress | None = None,
             on_turn: Callable[[list[TurnResult]], None] | None = None) -> tuple[list[TurnResult], Path]:
    """Run the demo; return the per-turn results and the HTML report's path."""
    from fleet.sim.report import write_report

    settings.validate()
    say = progress or (lambda msg: log.info("%s", msg))
    ws = settings.workspace
    ws.mkdir(parents=True, exist_ok=True)
    if any(ws.iterdir()):
        raise ValueError(f"workspace {ws} is not empty; pass a new folder (each run keeps its own)")
    say(f"workspace {ws}")
    pair = generate_keypair()
    key_path, _ = write_keypair(pair, ws / "keys")

    data = load_dataset(settings.dataset, seed=settings.seed)
    k = len(data.class_names)
    data = sample_test(data, settings.test_size if settings.test_size is not None else TEST_CAP, seed=settings.seed)
    world = build_world(data, seed=settings.seed, seed_size=settings.seed_frames(k))
    say(f"data: {data.name}, {len(data.class_names)} classes, images {data.x_train.shape[1:]}, "
        f"seed set {len(world.seed_set)} (mostly clear), test {len(world.test_set)} across conditions")
    seed_npz = world.seed_set.save_training(ws / "seed.npz", test=world.test_set, class_names=data.class_names)

    hub = start_hub(ws / "hub", pair)
    say(f"hub on {hub.url} (SQLite in {ws / 'hub'})")
    turns: list[TurnResult] = []
    agents_procs: list[Any] = []
    labeler: Labeler | None = None
    try:
        trainer_token = hub.token("trainer", "demo-trainer")
        labeler = _make_labeler(settings, hub, world, ws, say)
        say(f"labels from: {labeler.name}")
        trainer = Trainer(settings, ws, key_path, hub, trainer_token, seed_npz, data.class_names)

        # turn 0: the base model, trained on the small, mostly clear seed set, published and rolled out
        t0 = time.monotonic()
        fly, rnd = Arm("flywheel"), Arm("random")
        base = trainer.train("base", data=f"npz:{seed_npz}", epochs=settings.base_epochs, publish=True,
                             stages="1.0", warm=None)
        for arm in (fly, rnd):
            arm.checkpoint, arm.version, arm.onnx = base.checkpoint, base.version, base.onnx
        if base.rollout_id is None:
            raise RuntimeError(f"the base model was not published: {base.gate_summary}")
        _finish_rollout(hub, base.rollout_id, say)
        hub.call("POST", "/v1/campaigns", CampaignReceipt,
                 body=CampaignCreate(spec=campaign_spec(settings), groups=[DEMO_GROUP]))
        configs = _enroll_agents(settings, hub, ws)
        acc0 = evaluate_onnx(base.onnx, base.manifest, world.test_set)
        if acc0[0] < NEAR_CHANCE / k:
            say(f"WARNING: the base model is near chance (test accuracy {acc0[0]:.3f}, chance {1 / k:.3f} with {k} "
                f"classes): give it more seed frames (--seed-size, now {len(world.seed_set)}), more epochs "
                f"(--base-epochs, now {settings.base_epochs}) or another model (--model, now {settings.model})")
        turns.append(TurnResult(0, ArmResult(*acc0, labels=0, model_version=base.version),
                                ArmResult(*acc0, labels=0, model_version=base.version),
                                seconds=time.monotonic() - t0, gate="base"))
        if on_turn:
            on_turn(turns)

        rollout_id: str | None = None
        for turn in range(1, settings.turns + 1):
            t_turn = time.monotonic()
            parts: dict[str, float] = {}
            frames = world.stream(turn, settings.devices * settings.frames_per_device)

            # the fleet streams its shards; canary devices pick the candidate up by OTA
            t = time.monotonic()
            shards = _run_agents(settings, ws, configs, frames, turn, agents_procs)
            parts["fleet"] = time.monotonic() - t
            if rollout_id is not None:
                gate_note = _finish_rollout(hub, rollout_id, say)
                rollout_id = None
            else:
                gate_note = ""
            t = time.monotonic()
            uploaded = _uploaded_frames(hub, labeler)
            errors, captured = _error_capture(hub, ws, shards, uploaded)
            parts["measure"] = time.monotonic() - t

            # flywheel arm: the hub selects within the budget, the labeler labels, the trainer retrains
            t = time.monotonic()
            supply = _pool_supply(hub, labeler)
            labeled = labeler.label(settings.budget, turn)
            fly.labels += labeled.labeled
            parts["label"] = time.monotonic() - t
            short, fault = shortfall(labeled, budget=settings.budget, supply=supply)
            if fault:
                message = f"turn {turn}: the flywheel arm could not spend its budget through {labeler.name}: {short}"
                if not settings.allow_short:
                    raise ShortTurn(message + " (pass --allow-short to carry on regardless)")
                say(f"WARNING: {message}")
            elif short:
                say(f"turn {turn}: {short}")
            t = time.monotonic()
            cand: TrainResult | None = None
            if labeled.labeled:
                cand = trainer.train(f"fw-{turn}", data=f"hub:{hub.url}", epochs=settings.turn_epochs,
                                     publish=True, stages="0.5,1.0", warm=fly)
                parts.update({f"train.{k}": v for k, v in cand.timings.items()})
                if cand.published:
                    fly.checkpoint, fly.version, fly.onnx = cand.checkpoint, cand.version, cand.onnx
                    rollout_id = cand.rollout_id
                note = cand.gate_summary
                if not cand.passed:
                    say(f"{cand.gate_summary}: the fleet keeps {fly.version}")
            else:
                note = f"fw-{turn}: no new labels, no retrain; the fleet keeps {fly.version}"
                say(note)
            parts["train"] = time.monotonic() - t
            gate_note = (gate_note + "; " if gate_note else "") + note

            # control arm: the same budget on frames drawn uniformly at random from what the fleet saw
            t = time.monotonic()
            pick = world.rng.choice(len(frames), size=min(settings.budget, len(frames)), replace=False)
            rnd.labeled.append(frames.take(pick))
            rnd.labels += len(pick)
            random_npz = _concat(rnd.labeled).save_training(ws / f"random-{turn}.npz", class_names=data.class_names)
            ctrl = trainer.train(f"rnd-{turn}", data=f"npz:{random_npz}", epochs=settings.turn_epochs,
                                 publish=False, stages="", warm=rnd)
            if ctrl.passed:
                rnd.checkpoint, rnd.version, rnd.onnx = ctrl.checkpoint, ctrl.version, ctrl.onnx
            parts["control"] = time.monotonic() - t

            t = time.monotonic()
            fly_acc = evaluate_onnx(cand.onnx if cand is not None and cand.passed else fly.onnx, None, world.test_set)
            rnd_acc = evaluate_onnx(rnd.onnx, None, world.test_set)
            parts["evaluate"] = time.monotonic() - t
            result = TurnResult(
                turn, ArmResult(*fly_acc, labels=fly.labels, model_version=fly.version),
                ArmResult(*rnd_acc, labels=rnd.labels, model_version=rnd.version),
                frames_seen=len(frames), uploads=len(uploaded), model_errors=errors, errors_captured=captured,
                seconds=time.monotonic() - t_turn, parts=parts, gate=gate_note, spent=labeled.labeled,
                budget=settings.budget, short=short, short_fault=fault,
            )
            turns.append(result)
            say(f"turn {turn}: flywheel {result.flywheel.accuracy:.3f} vs random {result.random.accuracy:.3f} "
                f"after {fly.labels} labels each; uploads captured {result.error_capture:.0%} of the model's errors")
            if on_turn:
                on_turn(turns)
        if rollout_id is not None:
            _finish_rollout(hub, rollout_id, say)
        if settings.turns and fly.version == base.version and any(t.spent for t in turns):
            say(f"WARNING: every flywheel candidate failed the gate, so the fleet still runs the base model: give "
                f"each turn more labels (--budget, now {settings.budget}) or epochs (--epochs, now "
                f"{settings.turn_epochs}), or a stronger base (--seed-size, --base-epochs)")
    except ShortTurn as exc:  # the turns so far still get their report, with the reason it stopped
        write_report(turns, ws / "report", title="Flywheel demo", labeler=labeler.name if labeler else "",
                     settings={k: str(v) for k, v in asdict(settings).items()}, error=str(exc))
        raise
    finally:
        for p in agents_procs:
            stop_process(p)
        if labeler is not None:
            labeler.close()
        hub.stop()
    report = write_report(turns, ws / "report", title="Flywheel demo", labeler=labeler.name if labeler else "",
                          settings={k: str(v) for k, v in asdict(settings).items()})
    return turns, report


# ---------------------------------------------------------------------------------------------
# the trainer, run as its own process
# ---------------------------------------------------------------------------------------------


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

    def train(self, name: str, *, data: str, epochs: int, publish: bool, stages: str, warm: Arm | None) -> TrainResult:
        s = self.settings
        out = self.ws / "models" / name
        version = f"{name}-s{s.seed}"
        args = ["train", "--data", data, "--out", str(out), "--model", s.model, "--width", str(s.width),
                "--epochs", str(epochs), "--seed", str(s.seed), "--version", version, "--sign-key", str(self.key),
                "--holdout", "0", "--no-progress", "--threads", "1", "--cache-dir", str(self.ws / "cache"),
                "--class-names", ",".join(self.class_names), "--min-slice-size", "1000000"]
        if data != f"npz:{self.seed_npz}":
            args += ["--base", f"npz:{self.seed_npz}", "--replay-ratio", "0.5"]
        if warm is not None and warm.checkpoint is not None:
            args += ["--warm-start", str(warm.checkpoint), "--gate-against", str(warm.checkpoint),
                     "--tolerance", "0.01", "--lr", str(s.turn_lr)]
        env = None
        if publish:  # the token goes in the environment: a command line is visible to every user (ps)
            args += ["--publish", self.hub.url, "--rollout-stages", stages]
            env = {**os.environ, "FLYWHEEL_TOKEN": self.token}
        else:
            args += ["--dry-run"]
        run_logged(flywheel_cmd(*args), self.ws / "logs" / f"train-{name}.log", env=env,
                   ok_codes=(0, EXIT_REJECTED))
        report = json.loads((out / "report.json").read_text())
        gate = report.get("gate") or {}
        passed = bool(gate.get("passed", True))
        pub = report.get("publish") or {}
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


# ---------------------------------------------------------------------------------------------
# the fleet
# ---------------------------------------------------------------------------------------------


def _enroll_agents(settings: DemoSettings, hub: HubProcess, ws: Path) -> list[Path]:
    configs = []
    for i in range(settings.devices):
        dev = f"dev-{i:03d}"
        d = ws / "agents" / dev
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "agent.toml"
        cfg.write_text(
            f'device_id = "{dev}"\ndata_dir = "data"\n\n[hub]\nurl = "{hub.url}"\ngroup = "{DEMO_GROUP}"\n'
            f'fleet_secret = "{hub.fleet_secret}"\n\n[source]\nkind = "npz"\npath = "shard.npz"\n\n'
            "[runtime]\nthreads = 1\nbatch_size = 16\ntrigger_window = 32\n\n"
            "[uplink]\ndrain_timeout_s = 60\nbackoff_base_s = 0.2\nbackoff_max_s = 2\n\n"
            "[heartbeat]\ninterval_s = 1\n\n[ota]\npoll_interval_s = 1\n"
        )
        run_logged(flywheel_cmd("agent", "enroll", "--config", str(cfg)), d / "agent.log")
        configs.append(cfg)
    return configs


def _run_agents(settings: DemoSettings, ws: Path, configs: list[Path], frames: Frames, turn: int,
                procs: list[Any]) -> dict[str, Frames]:
    """Give each device a disjoint shard and run all agents at once, as separate processes."""
    shards: dict[str, Frames] = {}
    procs.clear()
    per = len(frames) // len(configs)
    for i, cfg in enumerate(configs):
        shard = frames.take(np.arange(i * per, (i + 1) * per))
        shard.save_shard(cfg.parent / "shard.npz")
        shards[cfg.parent.name] = shard
        procs.append(start_logged(flywheel_cmd("agent", "run", "--config", str(cfg), "--max-frames", str(per)),
                                  cfg.parent / "agent.log"))
    deadline = time.monotonic() + 600
    for cfg, p in zip(configs, procs, strict=True):
        code = p.wait(max(1.0, deadline - time.monotonic()))
        if code != 0:
            raise RuntimeError(f"agent {cfg.parent.name} exited with {code} in turn {turn}:\n"
                               f"{tail(cfg.parent / 'agent.log')}")
    procs.clear()
    return shards


def _pool_supply(hub: HubProcess, labeler: Labeler) -> int:
    """Cases the hub could give the labeler now: unlabeled, or queued (selected, not yet labeled)."""
    total = 0
    for state in ("unlabeled", "queued"):
        r = httpx.get(hub.url + "/v1/pool", params={"state": state, "limit": 1}, headers=labeler.headers, timeout=60)
        r.raise_for_status()
        total += int(r.json()["total"])
    return total


def _uploaded_frames(hub: HubProcess, labeler: Labeler) -> dict[str, str]:
    """frame id -> case id, for every case the fleet has uploaded so far."""
    out: dict[str, str] = {}
    for state in ("unlabeled", "queued", "labeled", "held", "duplicate"):
        offset = 0
        while True:
            r = httpx.get(hub.url + "/v1/pool", params={"state": state, "limit": 1000, "offset": offset},
                          headers=labeler.headers, timeout=60)
            if r.status_code == 422:
                break
            r.raise_for_status()
            cases = PoolPage.from_json(r.content).cases
            for c in cases:
                frame = c.case.tags.get("frame")
                if frame:
                    out[frame] = c.case_id
            if len(cases) < 1000:
                break
            offset += 1000
    return out


def _error_capture(hub: HubProcess, ws: Path, shards: dict[str, Frames], uploaded: dict[str, str]) -> tuple[int, int]:
    """How many frames each device's model got wrong this turn, and how many of those it uploaded."""
    versions = {d.device_id: d.model_version for d in hub.call("GET", "/v1/devices", DeviceList).devices}
    errors = captured = 0
    cache: dict[str, Any] = {}
    for dev, shard in shards.items():
        version = versions.get(dev)
        if not version:
            continue
        if version not in cache:
            cache[version] = _load_model(hub, version, ws)
        pred = cache[version].run(list(shard.images)).logits.argmax(1)
        wrong = pred != shard.labels
        errors += int(wrong.sum())
        captured += sum(1 for f in shard.frame_ids[wrong] if str(f) in uploaded)
    return errors, captured


def _load_model(hub: HubProcess, version: str, ws: Path) -> Any:
    from fleet.edge.runtime import ModelRuntime

    d = ws / "cache" / "models"
    d.mkdir(parents=True, exist_ok=True)
    signed = hub.call("GET", f"/v1/models/{version}/manifest", SignedManifest)
    path = d / f"{version}.onnx"
    if not path.exists():
        o = httpx.get(f"{hub.url}/v1/models/{version}/onnx", headers=hub.admin_headers, timeout=60)
        o.raise_for_status()
        path.write_bytes(o.content)
    return ModelRuntime(path, signed.manifest, threads=2)


def evaluate_onnx(onnx: Path | None, manifest: SignedManifest | None, test: Frames) -> tuple[float, dict[str, float]]:
    """Accuracy overall and per condition of an exported model on the test frames (onnxruntime)."""
    from fleet.edge.runtime import ModelRuntime

    if onnx is None:
        raise ValueError("no model to evaluate")
    if manifest is None:
        manifest = SignedManifest.from_json((onnx.parent / "manifest.json").read_text())
    rt = ModelRuntime(onnx, manifest.manifest, threads=2)
    preds = np.concatenate([rt.run(list(test.images[i:i + 512])).logits.argmax(1)
                            for i in range(0, len(test), 512)])
    ok = preds == test.labels
    per = {str(c): float(ok[test.conditions == c].mean()) for c in np.unique(test.conditions)}
    return float(ok.mean()), per


def _finish_rollout(hub: HubProcess, rollout_id: str, say: Progress) -> str:
    """After a canary turn: take the rollout to the whole fleet unless the hub rolled it back already."""
    status = hub.call("GET", f"/v1/rollouts/{rollout_id}", RolloutPublic)
    if status.state != "running":
        say(f"rollout of {status.version} ended as {status.state}: {status.reason or ''}")
        return f"rollout of {status.version} {status.state}"
    for _ in range(len(status.stages) + 1):
        status = hub.call("POST", f"/v1/rollouts/{rollout_id}/advance", RolloutPublic)
        if status.state != "running":
            break
    say(f"canary of {status.version} held; now active on the whole fleet")
    return f"canary ok, {status.version} active"


def _concat(parts: list[Frames]) -> Frames:
    return Frames(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                    ("images", "labels", "conditions", "frame_ids", "human")))


def _make_labeler(settings: DemoSettings, hub: HubProcess, world: World, ws: Path, say: Progress) -> Labeler:
    """Label Studio with simulated annotators (installed into ./.venv-studio the first time, unless told not
    to), or the oracle when asked, or when Label Studio cannot be had: then one line says why."""
    token = hub.token("labeler", "demo-labeler")
    if settings.annotate:  # a person labels: Label Studio or nothing
        settings = replace(settings, labeler="studio")
    if settings.labeler in ("auto", "studio"):
        from fleet.sim.labelers import studio_available
        from fleet.sim.procs import ProcessFailed
        from fleet.sim.studio import find_studio_bin, install_studio, studio_requirement

        why = studio_available()
        if why is not None and find_studio_bin() is None and settings.install_studio \
                and "label-studio-sdk" not in why:
            venv = Path.cwd() / ".venv-studio"
            say(f"installing {studio_requirement()} into {venv} (once; a minute or two)")
            try:
                install_studio(venv)
                why = studio_available()
            except ProcessFailed as exc:
                why = str(exc).splitlines()[0]
        if why is None:
            from fleet.sim.labelers import StudioLabeler

            try:
                return StudioLabeler(hub, token, world, ws, strategy=settings.strategy, say=say,
                                     annotate=settings.annotate)
            except ProcessFailed as exc:
                if settings.labeler == "studio":
                    raise RuntimeError(f"--labeler studio: {exc}") from exc
                why = f"it did not start: {str(exc).splitlines()[0]}"
        if settings.labeler == "studio":
            raise RuntimeError(f"--labeler studio: {why}")
        say(f"Label Studio not used ({why}); the built-in oracle labels instead")
    return OracleLabeler(hub.url, token, world, strategy=settings.strategy)
