"""``flywheel demo``: the whole loop on one machine, measured against random labeling.

Real processes throughout: the hub (SQLite, loopback), N edge agents running the real agent code on
disjoint shards of a stream with edge conditions, the trainer CLI for every retrain. Labels come
from Label Studio with simulated annotators when it is available, otherwise from a built-in oracle.
The control arm spends the same label budget on frames drawn uniformly at random from everything
the fleet saw, and is trained by the same trainer with the same seeds.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from fleet.protocol import CampaignCreate, CampaignReceipt
from fleet.signing import generate_keypair, write_keypair
from fleet.sim.agents import (
    DEMO_GROUP,
    Progress,
    enroll_agents,
    error_capture,
    evaluate_onnx,
    finish_rollout,
    pool_supply,
    run_agents,
    uploaded_frames,
)
from fleet.sim.data import load_dataset, sample_test
from fleet.sim.fleet import Frames, World, build_world
from fleet.sim.labelers import Labeler, OracleLabeler, shortfall
from fleet.sim.procs import HubProcess, start_hub, stop_process
from fleet.sim.report import ArmResult, TurnResult
from fleet.sim.settings import NEAR_CHANCE, TEST_CAP, Arm, DemoSettings
from fleet.sim.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

class ShortTurn(RuntimeError):
    """An arm could not spend its label budget for a reason other than the pool's supply."""


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
    say(f"hub on {hub.url} (SQLite in {ws / 'hub'}); its dashboard: {hub.url}/ui, log in with the admin token "
        f"{hub.admin_token}")
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
        finish_rollout(hub, base.rollout_id, say)
        hub.call("POST", "/v1/campaigns", CampaignReceipt,
                 body=CampaignCreate(spec=campaign_spec(settings), groups=[DEMO_GROUP]))
        configs = enroll_agents(settings, hub, ws)
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
            shards = run_agents(settings, ws, configs, frames, turn, agents_procs)
            parts["fleet"] = time.monotonic() - t
            if rollout_id is not None:
                gate_note = finish_rollout(hub, rollout_id, say)
                rollout_id = None
            else:
                gate_note = ""
            t = time.monotonic()
            uploaded = uploaded_frames(hub, labeler)
            errors, captured = error_capture(hub, ws, shards, uploaded)
            parts["measure"] = time.monotonic() - t

            # flywheel arm: the hub selects within the budget, the labeler labels, the trainer retrains
            t = time.monotonic()
            supply = pool_supply(hub, labeler)
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
            finish_rollout(hub, rollout_id, say)
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
        sdk = importlib.util.find_spec("label_studio_sdk") is not None  # the bridge's client, in our own venv
        if why is not None and sdk and find_studio_bin() is None and settings.install_studio:
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
