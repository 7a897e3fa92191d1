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
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fleet.protocol import CampaignCreate, CampaignReceipt, SignedManifest
from fleet.signing import generate_keypair, read_keypair, write_keypair
from fleet.sim.agents import (
    DEMO_GROUP,
    Progress,
    enroll_agents,
    error_capture,
    evaluate_detector,
    evaluate_onnx,
    finish_rollout,
    labeled_total,
    pool_supply,
    rescore_pool,
    run_agents,
    uploaded_frames,
)
from fleet.sim.data import load_dataset, sample_test
from fleet.sim.detect_world import SceneWorld, build_coco_world, build_scene_world
from fleet.sim.fleet import World, build_world
from fleet.sim.labelers import Labeler, LabelRound, OracleLabeler, shortfall
from fleet.sim.procs import HubProcess, start_hub, stop_process
from fleet.sim.report import METRICS, ArmResult, TurnResult
from fleet.sim.resume import (
    DemoState,
    TurnProgress,
    marking_children,
    rng_state,
    save_frames,
    set_rng_state,
    settings_to_dict,
    stop_leftovers,
)
from fleet.sim.settings import DETECT_TEST_SCENES, NEAR_CHANCE, TEST_CAP, Arm, DemoSettings
from fleet.sim.trainer import Trainer, TrainRun

log = logging.getLogger(__name__)

DETECT_WEAK_MAP = 0.05  # a base detector under this test mAP@[.5:.95] is "weak"


class ShortTurn(RuntimeError):
    """An arm could not spend its label budget for a reason other than the pool's supply."""


def campaign_spec(settings: DemoSettings) -> dict[str, Any]:
    """The fleet's trigger spec: the human disagreeing is the strongest signal; then calibrated uncertainty.

    For a detector, the human's boxes disagreeing with the model's (counted: how many boxes differ at IoU 0.5,
    so frames with more errors go first) is also the signal that sees objects the model missed entirely; then
    the least certain box of a frame (box entropy, calibrated to the upload rate) and boxes scoring near the
    operating threshold."""
    rate = settings.upload_rate
    if settings.task == "detect":
        name, what, leaves = "demo-detect-edge-cases", "the model's boxes disagree with the human's or are unsure", [
            {"trigger": "box_human_disagreement", "count": True, "weight": 1.0},
            {"trigger": "box_challenger_disagreement", "count": True, "weight": 0.8},
            {"trigger": "box_entropy_max", "target_rate": rate, "weight": 0.7},
            {"trigger": "box_ambiguous_count", "target_rate": rate / 2, "weight": 0.5},
        ]
    else:
        name, what, leaves = "demo-edge-cases", "the model disagrees with the human or is unsure", [
            {"trigger": "human_disagreement", "weight": 1.0},
            {"trigger": "challenger_disagreement", "weight": 0.8},
            {"trigger": "entropy", "target_rate": rate, "weight": 0.7},
        ]
    return {"format": "flywheel.trigger/1", "id": name, "version": 1, "expires_at": None,
            "description": f"frames where {what}", "rule": {"any_of": leaves}}


def run_demo(settings: DemoSettings, *, progress: Progress | None = None,
             on_turn: Callable[[list[TurnResult]], None] | None = None,
             resume: bool = False) -> tuple[list[TurnResult], Path]:
    """Run the demo; return the per-turn results and the HTML report's path. ``resume``: carry on with the
    interrupted demo in ``settings.workspace``, with the settings it started with (see fleet.sim.resume). Every
    process it starts carries the workspace's mark, so a resume finds whatever a hard kill left running."""
    with marking_children(settings.workspace):
        return _run_demo(settings, progress=progress, on_turn=on_turn, resume=resume)


def _run_demo(settings: DemoSettings, *, progress: Progress | None,
              on_turn: Callable[[list[TurnResult]], None] | None, resume: bool) -> tuple[list[TurnResult], Path]:
    from fleet.sim.report import write_report

    say = progress or (lambda msg: log.info("%s", msg))
    ws = settings.workspace
    saved: DemoState | None = None
    if resume:
        saved = DemoState.load(ws)
        settings = saved.demo_settings()
        settings.validate()
        done = len(saved.turns) - 1
        if done >= settings.turns and saved.current is None and saved.rollout_id is None:
            say(f"the demo in {ws} finished all {settings.turns} turn(s); nothing to resume")
            stop_leftovers(saved.processes, say, ws=ws)  # what a killed --serve (or run) of it left running
            return saved.turn_results(), ws / "report" / "index.html"
        where = f"; turn {saved.current.turn} stopped after its {saved.current.phase} step" \
            if saved.current and saved.current.phase != "start" else ""
        say(f"resuming the demo in {ws}: {done} of {settings.turns} turn(s) done{where}")
        stop_leftovers(saved.processes, say, ws=ws)
        pair = read_keypair(ws / "keys")
    else:
        settings.validate()
        if ws.exists() and not ws.is_dir():
            raise ValueError(f"workspace {ws} is a file; expected a new folder for this run")
        if ws.exists() and any(ws.iterdir()):
            hint = " (it holds an interrupted demo: add --resume to carry on with it)" \
                if DemoState.path(ws).exists() else ""
            raise ValueError(f"workspace {ws} is not empty; pass a new folder (each run keeps its own){hint}")
        say(f"workspace {ws}")

    world = _world(settings, say)  # a dataset it cannot read is refused before the workspace holds anything
    if saved is None:
        try:
            ws.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot make the workspace {ws}: {exc.strerror or exc}") from None
        pair = generate_keypair()
        write_keypair(pair, ws / "keys")
    key_path = ws / "keys" / "signing.key"
    seed_npz = world.seed_set.save_training(ws / "seed.npz", test=world.test_set, class_names=world.class_names)

    hub = start_hub(ws / "hub", pair, port=saved.hub["port"] if saved else None,
                    keys=saved.hub["keys"] if saved else None,
                    extra_env=None if settings.rescore else {"FLYWHEEL_HUB_SELECTION_SPACE": "capture"})
    say(f"hub on {hub.url} (SQLite in {ws / 'hub'}); its dashboard: {hub.url}/ui, log in with the admin token "
        f"{hub.admin_token}")
    turns: list[TurnResult] = saved.turn_results() if saved else []
    agents_procs: list[Any] = []
    labeler: Labeler | None = None
    try:
        again = "" if saved is None else f"-resumed-{secrets.token_hex(3)}"  # token names are unique at the hub
        trainer_token = hub.token("trainer", "demo-trainer" + again)
        if saved is not None:  # the same labeler as before: Label Studio's project, or the oracle
            settings = replace(settings, labeler="studio" if saved.studio else "oracle", install_studio=False)
        trainer = Trainer(settings, ws, key_path, hub, trainer_token, seed_npz, world.class_names)
        # turn 0's base model trains on one core while Label Studio installs and starts beside it
        t0 = time.monotonic()
        base_run = None if saved is not None else trainer.start(
            "base", data=f"npz:{trainer.seed_npz}", epochs=settings.base_epochs, publish=True, stages="1.0",
            warm=None)
        try:
            labeler = _make_labeler(settings, hub, world, ws, say, session=saved.studio if saved else None,
                                    token_name="demo-labeler" + again)
            say(f"labels from: {labeler.name}")
            processes = {"hub": [hub.process.pid, str(ws / "hub")], **labeler.processes()}
            if saved is not None:
                state = saved
            else:
                assert base_run is not None
                state = _base_turn(settings, ws, world, hub, base_run, say, turns, t0)
        except BaseException:
            if base_run is not None:
                base_run.stop()
            raise
        state.studio, state.processes = labeler.session(), processes
        state.save(ws)
        if on_turn:
            on_turn(turns)

        run = _Turns(settings, ws, world, hub, labeler, trainer, state, agents_procs, say, world.class_names)
        start = state.current.turn if state.current is not None else len(state.turns)
        for turn in range(start, settings.turns + 1):
            result = run.turn(turn)
            turns.append(result)
            say(f"turn {turn}: flywheel {result.flywheel.accuracy:.3f} vs random {result.random.accuracy:.3f} test "
                f"{METRICS[settings.task]} after {result.flywheel.labels} labels each; uploads captured "
                f"{result.error_capture:.0%} of the model's errors")
            if on_turn:
                on_turn(turns)
        if state.rollout_id is not None:
            finish_rollout(hub, state.rollout_id, say)
            state.rollout_id = None
            state.save(ws)
        if settings.turns and run.fly.version == state.base_version and any(t.spent for t in turns):
            say(f"WARNING: every flywheel candidate failed the gate, so the fleet still runs the base model: give "
                f"each turn more labels (--budget, now {settings.budget}) or epochs (--epochs, now "
                f"{settings.turn_epochs}), or a stronger base (--seed-size, --base-epochs)")
    except ShortTurn as exc:  # the turns so far still get their report, with the reason it stopped
        write_report(turns, ws / "report", title=_title(settings), labeler=labeler.name if labeler else "",
                     settings=settings_to_dict(settings), error=str(exc),
                     metric=METRICS[settings.task])
        raise
    finally:
        for p in agents_procs:
            stop_process(p)
        if labeler is not None:
            labeler.close()
        hub.stop()
    examples = None
    if settings.task == "detect" and turns:
        from fleet.sim.pictures import detection_examples

        examples = detection_examples(world, ws / "report", before=ws / "models" / "base" / "model.onnx",
                                      after=run.fly.onnx, random=run.rnd.onnx)
    report = write_report(turns, ws / "report", title=_title(settings), labeler=labeler.name if labeler else "",
                          settings=settings_to_dict(settings), metric=METRICS[settings.task],
                          examples=examples)
    return turns, report


def _title(settings: DemoSettings) -> str:
    return "Flywheel demo (object detection)" if settings.task == "detect" else "Flywheel demo"


def _world(settings: DemoSettings, say: Progress) -> World | SceneWorld:
    """The demo's world: a dataset's images (classify) or scenes of digits with boxes (detect)."""
    if settings.task == "detect":
        test = settings.test_size if settings.test_size is not None else DETECT_TEST_SCENES
        if settings.dataset in (None, "digits"):
            sw = build_scene_world(seed=settings.seed, seed_size=settings.seed_frames(0), test_per_condition=test)
            what = f"{sw.source} with boxes ({sw.size}x{sw.size}, 1-3 objects and clutter)"
        else:
            sw = build_coco_world(settings.dataset, seed=settings.seed, seed_size=settings.seed_size,
                                  test_per_condition=test)
            what = f"{sw.source}, scaled to {sw.size}x{sw.size}"
        say(f"data: {what}, {len(sw.class_names)} classes, seed set {len(sw.seed_set)} (mostly clear, "
            f"{sw.seed_set.n_boxes} boxes), test {len(sw.test_set)} across conditions")
        return sw
    data = load_dataset(settings.dataset, seed=settings.seed)
    k = len(data.class_names)
    data = sample_test(data, settings.test_size if settings.test_size is not None else TEST_CAP, seed=settings.seed)
    world = build_world(data, seed=settings.seed, seed_size=settings.seed_frames(k))
    say(f"data: {data.name}, {len(data.class_names)} classes, images {data.x_train.shape[1:]}, "
        f"seed set {len(world.seed_set)} (mostly clear), test {len(world.test_set)} across conditions")
    return world


def evaluate_arm(settings: DemoSettings, ws: Path, world: World | SceneWorld, onnx: Path | None,
                 manifest: SignedManifest | None = None) -> tuple[float, dict[str, float]]:
    """An arm's exported model on the held-out test set: accuracy (classify) or mAP (detect), overall and per
    condition."""
    if settings.task == "detect":
        return evaluate_detector(onnx, ws / "seed.npz", ws / "logs" / "evaluate.log")
    assert isinstance(world, World)
    return evaluate_onnx(onnx, manifest, world.test_set)


def _base_turn(settings: DemoSettings, ws: Path, world: World | SceneWorld, hub: HubProcess, base_run: TrainRun,
               say: Progress, turns: list[TurnResult], t0: float) -> DemoState:
    """Turn 0 (begun at ``t0``): the base model, trained on the small, mostly clear seed set (``base_run``),
    published and rolled out to the fleet, the campaign, the agents enrolled; then the demo's state, from which it
    can be resumed."""
    k = len(world.class_names)
    base = base_run.result()
    if base.rollout_id is None:
        raise RuntimeError(f"the base model was not published: {base.gate_summary}")
    finish_rollout(hub, base.rollout_id, say)
    hub.call("POST", "/v1/campaigns", CampaignReceipt,
             body=CampaignCreate(spec=campaign_spec(settings), groups=[DEMO_GROUP]))
    enroll_agents(settings, hub, ws)
    acc0 = evaluate_arm(settings, ws, world, base.onnx, base.manifest)
    if settings.task == "detect" and acc0[0] < DETECT_WEAK_MAP:
        say(f"WARNING: the base detector is weak (test mAP {acc0[0]:.3f}): give it more seed scenes (--seed-size, "
            f"now {len(world.seed_set)}) or more epochs (--base-epochs, now {settings.base_epochs})")
    elif settings.task == "classify" and acc0[0] < NEAR_CHANCE / k:
        say(f"WARNING: the base model is near chance (test accuracy {acc0[0]:.3f}, chance {1 / k:.3f} with {k} "
            f"classes): give it more seed frames (--seed-size, now {len(world.seed_set)}), more epochs "
            f"(--base-epochs, now {settings.base_epochs}) or another model (--model, now {settings.model})")
    turns.append(TurnResult(0, ArmResult(*acc0, labels=0, model_version=base.version),
                            ArmResult(*acc0, labels=0, model_version=base.version),
                            seconds=time.monotonic() - t0, gate="base"))
    state = DemoState(settings=settings_to_dict(settings), hub={"port": hub.port, "keys": hub.keys},
                      base_version=base.version, arms={}, rng=rng_state(world.rng),
                      turns=[asdict(t) for t in turns])
    for name in ("flywheel", "random"):
        state.set_arms(Arm(name, checkpoint=base.checkpoint, version=base.version, onnx=base.onnx))
    return state


class _Turns:
    """The loop's turns, each in steps; the demo's state is saved after every step that must not be done twice,
    so a resumed turn skips the steps it already took (fleet.sim.resume)."""

    def __init__(self, settings: DemoSettings, ws: Path, world: World | SceneWorld, hub: HubProcess,
                 labeler: Labeler,
                 trainer: Trainer, state: DemoState, agents_procs: list[Any], say: Progress,
                 class_names: list[str]) -> None:
        self.settings, self.ws, self.world, self.hub, self.labeler = settings, ws, world, hub, labeler
        self.trainer, self.state, self.agents_procs, self.say, self.class_names = (
            trainer, state, agents_procs, say, class_names)
        self.fly, self.rnd = state.arm("flywheel", ws), state.arm("random", ws)
        trainer.started = self._train_started
        for turn, start in enumerate(state.starts[:len(state.turns) - 1], 1):  # resumed: the world's frames so far
            set_rng_state(world.rng, start)
            world.stream(turn, settings.devices * settings.frames_per_device)

    def turn(self, turn: int) -> TurnResult:
        s, ws, state, say = self.settings, self.ws, self.state, self.say
        cur = state.current
        if cur is None or cur.turn != turn:
            set_rng_state(self.world.rng, state.rng)
            cur = state.current = TurnProgress(turn, state.rng)
            state.starts.append(state.rng)
            state.save(ws)
        else:  # a resumed turn: the same frames, shards and random pick as the uninterrupted run
            set_rng_state(self.world.rng, cur.rng)
        frames = self.world.stream(turn, s.devices * s.frames_per_device)

        if cur.phase == "start":  # the fleet streams its shards; canary devices pick the candidate up by OTA
            t = time.monotonic()
            configs = sorted((ws / "agents").glob("*/agent.toml"))
            shards = run_agents(s, ws, configs, frames, turn, self.agents_procs, started=self._agents_started)
            cur.parts["fleet"] = time.monotonic() - t
            if state.rollout_id is not None:
                cur.gate_note = finish_rollout(self.hub, state.rollout_id, say)
                state.rollout_id = None
            t = time.monotonic()
            uploaded = uploaded_frames(self.hub, self.labeler)
            cur.model_errors, cur.errors_captured = error_capture(self.hub, ws, shards, uploaded)
            cur.uploads = len(uploaded)
            cur.parts["measure"] = time.monotonic() - t
            cur.phase = "fleet"
            state.processes = {k: v for k, v in state.processes.items() if not k.startswith("agent ")}
            state.save(ws)

        # control arm: the same budget on frames drawn uniformly at random from what the fleet saw; nothing
        # outside the workspace changes, so a resumed turn does this again from the turn's random state (the fleet
        # and the labeling draw nothing from it). Its retrain runs while the flywheel arm is labeled and retrained
        # (each retrain on one core)
        t = time.monotonic()
        pick = self.world.rng.choice(len(frames), size=min(s.budget, len(frames)), replace=False)
        picked = frames.take(pick)
        picks_file = f"random-picks-{turn}.npz"
        save_frames(picked, ws / picks_file)
        rnd = self.rnd
        rnd_labeled, rnd_labels = [*rnd.labeled, picked], rnd.labels + len(pick)
        random_npz = type(picked).concat(rnd_labeled).save_training(  # type: ignore[arg-type]
            ws / f"random-{turn}.npz", class_names=self.class_names)
        done = self.trainer.finished(f"rnd-{turn}")
        ctrl_run = None if done is not None else self.trainer.start(
            f"rnd-{turn}", data=f"npz:{random_npz}", epochs=s.turn_epochs, publish=False, stages="", warm=rnd)
        cur.parts["control"] = time.monotonic() - t
        try:
            if cur.phase in ("fleet", "labeling"):  # the hub selects within the budget, the labeler labels
                self._label(cur)
            round_ = LabelRound(**{**(cur.label_round or {}), "problems": tuple((cur.label_round or {}).get(
                "problems", ()))})

            if cur.phase == "labeled":  # the flywheel arm retrains on the hub's labels
                self._train(cur, round_)
            t = time.monotonic()
            ctrl = ctrl_run.result() if ctrl_run is not None else done
        except BaseException:
            if ctrl_run is not None:
                ctrl_run.stop()
            raise
        assert ctrl is not None
        cand = cur.candidate or {}
        rnd.labeled, rnd.labels = rnd_labeled, rnd_labels
        if ctrl.passed:
            rnd.checkpoint, rnd.version, rnd.onnx = ctrl.checkpoint, ctrl.version, ctrl.onnx
        # the control arm's time beyond the flywheel's retrain (the turn's parts add up to its wall time); its
        # whole retrain, as the trainer saw it, beside
        cur.parts["control"] += time.monotonic() - t
        cur.parts.update({f"control.{k}": v for k, v in ctrl.timings.items()})

        t = time.monotonic()
        fly_onnx = Path(cand["onnx"]) if cand.get("passed") else self.fly.onnx
        fly_acc = evaluate_arm(s, ws, self.world, fly_onnx)
        rnd_acc = evaluate_arm(s, ws, self.world, rnd.onnx)
        cur.parts["evaluate"] = time.monotonic() - t
        result = TurnResult(
            turn, ArmResult(*fly_acc, labels=self.fly.labels, model_version=self.fly.version),
            ArmResult(*rnd_acc, labels=rnd.labels, model_version=rnd.version),
            frames_seen=len(frames), uploads=cur.uploads, model_errors=cur.model_errors,
            errors_captured=cur.errors_captured, seconds=sum(v for k, v in cur.parts.items() if "." not in k),
            parts=cur.parts, gate=cur.gate_note, spent=round_.labeled, budget=s.budget, short=cur.short,
            short_fault=cur.short_fault, launched=dict(cur.launched),
        )
        state.turns.append(asdict(result))
        state.random_picks.append(picks_file)
        state.set_arms(self.fly, rnd)
        state.current, state.rng = None, rng_state(self.world.rng)
        state.save(ws)
        return result

    def _train_started(self, name: str, pid: int, marker: str) -> None:
        """Name the trainer run in the state, so a resume after a hard kill stops it if it still runs (two run at
        once: the flywheel's and the control arm's; runs that ended are dropped), and note when the turn launched it
        (a trainer's report stamps its start only once torch is imported, which takes a varying while)."""
        kept = {k: v for k, v in self.state.processes.items()
                if not k.startswith("train ") or Path(f"/proc/{int(v[0])}").exists()}
        self.state.processes = {**kept, f"train {name}": [pid, marker]}
        if self.state.current is not None:
            self.state.current.launched[name] = time.time()
        self.state.save(self.ws)

    def _agents_started(self, procs: list[Any]) -> None:
        """Name the agents in the state, so a resume after a hard kill stops any still running."""
        for cfg, p in procs:
            self.state.processes[f"agent {cfg.parent.name}"] = [p.pid, str(cfg)]
        self.state.save(self.ws)

    def _label(self, cur: TurnProgress) -> None:
        s, state, labeler = self.settings, self.state, self.labeler
        t = time.monotonic()
        if s.rescore:  # after an OTA the pool is scored in the new active model's space
            rescore_pool(self.hub, self.say)
            cur.parts["rescore"] = time.monotonic() - t
            t = time.monotonic()
        supply = pool_supply(self.hub, labeler)
        if cur.labeled_before is None:
            cur.labeled_before = labeled_total(self.hub, labeler)
            cur.phase = "labeling"
            state.save(self.ws)
        labeled = labeler.label(s.budget, cur.turn, before=cur.labeled_before)
        cur.parts["label"] = cur.parts.get("label", 0.0) + time.monotonic() - t
        short, fault = shortfall(labeled, budget=s.budget, supply=supply)
        if fault:
            message = f"turn {cur.turn}: the flywheel arm could not spend its budget through {labeler.name}: {short}"
            if not s.allow_short:
                raise ShortTurn(message + " (pass --allow-short to carry on regardless)")
            self.say(f"WARNING: {message}")
        elif short:
            self.say(f"turn {cur.turn}: {short}")
        self.fly.labels += labeled.labeled
        cur.label_round = asdict(labeled)
        cur.short, cur.short_fault, cur.phase = short, fault, "labeled"
        state.set_arms(self.fly)
        state.save(self.ws)

    def _train(self, cur: TurnProgress, round_: LabelRound) -> None:
        s, fly, state = self.settings, self.fly, self.state
        t = time.monotonic()
        note = ""
        if round_.labeled:
            name = f"fw-{cur.turn}"  # an interrupted demo may have trained it already, or half
            cand = self.trainer.finished(name) or self.trainer.train(
                self.trainer.name_free_at_hub(name), data=f"hub:{self.hub.url}", epochs=s.turn_epochs, publish=True,
                stages="0.5,1.0", warm=fly)
            cur.parts.update({f"train.{k}": v for k, v in cand.timings.items()})
            if cand.published:
                fly.checkpoint, fly.version, fly.onnx = cand.checkpoint, cand.version, cand.onnx
                state.rollout_id = cand.rollout_id
            note = cand.gate_summary
            if not cand.passed:
                self.say(f"{cand.gate_summary}: the fleet keeps {fly.version}")
            cur.candidate = {"version": cand.version, "onnx": str(cand.onnx), "passed": cand.passed}
        else:
            note = f"fw-{cur.turn}: no new labels, no retrain; the fleet keeps {fly.version}"
            self.say(note)
        cur.parts["train"] = time.monotonic() - t
        cur.gate_note = (cur.gate_note + "; " if cur.gate_note else "") + note
        cur.phase = "trained"
        state.set_arms(fly)
        state.save(self.ws)


def _make_labeler(settings: DemoSettings, hub: HubProcess, world: World | SceneWorld, ws: Path, say: Progress, *,
                  session: dict[str, Any] | None = None, token_name: str = "demo-labeler") -> Labeler:
    """Label Studio with simulated annotators (installed into ./.venv-studio the first time, unless told not
    to), or the oracle when asked, or when Label Studio cannot be had: then one line says why."""
    token = hub.token("labeler", token_name)
    if settings.annotate:  # a person labels: Label Studio or nothing
        settings = replace(settings, labeler="studio")
    if settings.labeler in ("auto", "studio"):
        from fleet.sim.labelers import studio_available
        from fleet.sim.procs import ProcessFailed
        from fleet.sim.studio import (
            find_studio_bin,
            install_studio,
            studio_pins_met,
            studio_requirement,
            studio_requirements,
        )

        why = studio_available()
        sdk = importlib.util.find_spec("label_studio_sdk") is not None  # the bridge's client, in our own venv
        venv = Path.cwd() / ".venv-studio"
        found = find_studio_bin()
        if why is not None and sdk and found is None and settings.install_studio:
            say(f"installing {studio_requirement()} into {venv} (once; a minute or two)")
            try:
                install_studio(venv)
                why = studio_available()
            except ProcessFailed as exc:
                why = str(exc).splitlines()[0]
        elif (why is None and found == venv / "bin" / "label-studio" and settings.install_studio
              and not os.environ.get("FLYWHEEL_STUDIO_URL") and not studio_pins_met(venv)):
            say(f"bringing {venv} to the studio extra's pins ({', '.join(studio_requirements())})")
            try:  # one made before a pin was added: Label Studio 1.23 beside sentry-sdk 3 exits as it starts
                install_studio(venv)
            except ProcessFailed as exc:
                why = str(exc).splitlines()[0]
        if why is None:
            from fleet.sim.labelers import StudioLabeler

            try:
                return StudioLabeler(hub, token, world, ws, strategy=settings.strategy, balance=settings.balanced(),
                                     seed=settings.seed, say=say, annotate=settings.annotate, session=session)
            except ProcessFailed as exc:
                if settings.labeler == "studio":
                    raise RuntimeError(f"--labeler studio: {exc}") from exc
                why = f"it did not start: {str(exc).splitlines()[0]}"
        if settings.labeler == "studio":
            raise RuntimeError(f"--labeler studio: {why}")
        say(f"Label Studio not used ({why}); the built-in oracle labels instead")
    return OracleLabeler(hub.url, token, world, strategy=settings.strategy, balance=settings.balanced(),
                         seed=settings.seed)
