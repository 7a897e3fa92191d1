"""``flywheel demo``: run the whole flywheel on one machine with live progress, then write a report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False)


@app.command()
def demo(
    ctx: typer.Context,
    turns: int = typer.Option(4, "--turns", min=1, help="Loop turns after the base model."),
    devices: int = typer.Option(4, "--devices", min=1, help="Edge agents, each its own process."),
    budget: int = typer.Option(40, "--budget", min=1, help="Labels per turn, for each arm."),
    seed: int = typer.Option(0, "--seed", help="Seeds the data split, the stream and every training run."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="'digits' (default, scikit-learn's bundled digits), an .npz with "
        "x_train/y_train/x_test/y_test, or a folder with one subfolder of images per class; with --task detect, "
        "'digits' (scenes of digits) or a COCO-format folder (annotations.json and its images)."),
    workspace: Path | None = typer.Option(
        None, "--workspace", help="A new folder for this run (default: ./flywheel-demo/<time>)."),
    frames: int = typer.Option(300, "--frames-per-device", min=10, help="Frames each device sees per turn."),
    labeler: str = typer.Option(
        "auto", "--labeler", help="auto (Label Studio, installed into ./.venv-studio on first use; the oracle if it "
        "cannot be had), studio (Label Studio or fail), oracle (the built-in oracle)."),
    annotate: bool = typer.Option(
        False, "--annotate", help="You label each turn's tasks in Label Studio's UI; the demo waits, shows "
        "progress, and ends a turn early when you touch <workspace>/finish-turn."),
    install_studio: bool = typer.Option(
        True, "--install-studio/--no-install-studio", help="Install Label Studio into ./.venv-studio when missing."),
    seed_size: int | None = typer.Option(
        None, "--seed-size", min=1, help="Frames in the base model's seed set (default: 15 a class)."),
    test_size: int | None = typer.Option(
        None, "--test-size", min=1, help="Test images a condition, stratified by class (default: all, up to 500)."),
    task: str = typer.Option(
        "classify", "--task", help="classify (image classifiers) or detect (an object detector on scenes of digits "
        "with boxes: per-box triggers, boxes in Label Studio, mAP)."),
    model: str | None = typer.Option(
        None, "--model", help="The model `flywheel train` builds (default smallcnn; detect: fcos_tiny)."),
    width: int = typer.Option(16, "--width", min=1, help="The model's width."),
    base_epochs: int | None = typer.Option(
        None, "--base-epochs", min=1, help="Epochs for the base model (default 30; detect: 36)."),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Epochs for each turn's retrain, both arms (default 20; detect: 6)."),
    strategy: str | None = typer.Option(
        None, "--strategy",
        help="The hub's selection strategy (default uncertainty+diversity; detect: uncertainty+random)."),
    balance: str | None = typer.Option(
        None, "--balance", help="A frame tag the hub splits each turn's selection evenly over, or 'none' (over the "
        "whole pool; default condition; detect: condition)."),
    rescore: bool = typer.Option(True, "--rescore/--no-rescore", help="Re-score the pool with each new active "
                                 "model before the hub selects (--no-rescore: the scores of capture, for comparison)."),
    replay_ratio: float | None = typer.Option(
        None, "--replay-ratio", min=0.0, max=1.0, help="The seed set's share of each turn's retraining epochs, both "
        "arms (`flywheel train --replay-ratio`; default 1, both tasks: the whole seed set every epoch beside every "
        "label so far)."),
    new_repeats: int | None = typer.Option(
        None, "--new-repeats", min=1, help="Each label's copies in each turn's retraining epoch, beside the seed set, "
        "both arms (`flywheel train --new-repeats`; default 2; detect: 1)."),
    gate_tolerance: float | None = typer.Option(
        None, "--gate-tolerance", min=0.0, max=1.0, help="How far a turn's candidate may fall below the model the "
        "fleet runs (test accuracy, or mAP) and still ship (default 0.01)."),
    allow_short: bool = typer.Option(
        False, "--allow-short", help="Carry on when a turn cannot spend its label budget (by default that is an "
        "error, unless the fleet's pool held too few cases)."),
    resume: bool = typer.Option(
        False, "--resume", help="Carry on with the interrupted demo in --workspace, where it stopped, with the "
        "settings it started with."),
    serve: bool = typer.Option(
        False, "--serve", help="Start the hub and Label Studio of the demo in --workspace again, after it stopped, "
        "to browse its dashboard and annotations (the same logins); Ctrl-C stops them. Nothing is trained."),
) -> None:
    """Turn the whole flywheel on this machine: hub, agents, labels, retraining, OTA, and a random control arm."""
    import logging
    import signal

    from rich.console import Console
    from rich.live import Live

    from fleet.sim.demo import DemoSettings, run_demo
    from fleet.sim.report import METRICS, render_conditions, render_table
    from fleet.sim.settings import TASK_DEFAULTS

    console = Console()
    if serve:
        _serve(ctx, workspace)
        return
    if resume and workspace is None:
        raise typer.BadParameter("--resume needs --workspace: the folder of the demo to carry on with")
    ws = workspace or Path("flywheel-demo") / time.strftime("%Y%m%d-%H%M%S")
    if task not in TASK_DEFAULTS:
        raise typer.BadParameter(f"--task must be one of {', '.join(TASK_DEFAULTS)}; received {task!r}")
    chosen = TASK_DEFAULTS[task]
    model = model or str(chosen["model"])
    base_epochs = base_epochs or int(chosen["base_epochs"])  # type: ignore[call-overload]
    epochs = epochs or int(chosen["turn_epochs"])  # type: ignore[call-overload]
    strategy = strategy or str(chosen["strategy"])
    settings = DemoSettings(workspace=ws, turns=turns, devices=devices, budget=budget, seed=seed, dataset=dataset,
                            frames_per_device=frames, labeler=labeler, strategy=strategy, balance=balance,
                            rescore=rescore,
                            allow_short=allow_short, gate_tolerance=gate_tolerance, replay_ratio=replay_ratio,
                            new_repeats=new_repeats,
                            install_studio=install_studio, annotate=annotate, seed_size=seed_size,
                            test_size=test_size, model=model, width=width, base_epochs=base_epochs,
                            turn_epochs=epochs, task=task, turn_lr=float(chosen["turn_lr"]))  # type: ignore[arg-type]
    try:
        settings.validate()
        if resume:
            _check_resume(ctx, settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    logging.getLogger().setLevel(logging.WARNING)
    t0 = time.monotonic()
    labeler_name = {"value": ""}

    def say(msg: str) -> None:
        if msg.startswith("labels from: "):
            labeler_name["value"] = msg.removeprefix("labels from: ")
        console.log(msg)

    with Live(console=console, refresh_per_second=2, transient=False) as live:
        def on_turn(results: list) -> None:  # type: ignore[type-arg]
            live.update(render_table(results, labeler=labeler_name["value"], metric=METRICS[task]))

        # Ctrl-C and a TERM stop the demo cleanly, even when it was started with SIGINT ignored (as a shell
        # starts a background job): the resume command is printed either way
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            results, report = run_demo(settings, progress=say, on_turn=on_turn, resume=resume)
        except (ValueError, RuntimeError) as exc:
            console.print(f"[red]demo failed:[/red] {exc}")
            raise typer.Exit(1) from exc
        except KeyboardInterrupt:
            console.print(f"[yellow]demo interrupted[/yellow]; carry on where it stopped with: flywheel demo --resume "
                          f"--workspace {ws}")
            raise typer.Exit(130) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    last = results[-1]
    console.print()
    metric = METRICS[settings.task]
    console.print(render_conditions(last, metric=metric))
    console.print(
        f"after {last.flywheel.labels} labels: flywheel {last.flywheel.accuracy:.3f} vs random "
        f"{last.random.accuracy:.3f} test {metric}; {time.monotonic() - t0:.0f}s in all"
    )
    console.print(f"report: {report}")
    console.print(f"its hub's dashboard and Label Studio, again: flywheel demo --serve --workspace {ws}",
                  soft_wrap=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(ctx: typer.Context, workspace: Path | None) -> None:
    """``--serve``: the demo's hub and Label Studio from ``workspace``, up until Ctrl-C or a TERM (exit 0); a
    server that stops on its own is exit 1. Each line goes out plain and at once, for a script that reads them."""
    import signal

    from fleet.sim.serve import serving, wait

    if workspace is None:
        raise typer.BadParameter("--serve needs --workspace: the folder of the demo whose servers to start")
    given = [p.opts[0] for p in _given(ctx, {"ctx", "workspace", "serve"})]
    if given:
        raise typer.BadParameter(f"--serve starts a stopped demo's servers as they were and runs nothing, so it takes "
                                 f"only --workspace; received {', '.join(given)}")

    def say(msg: str) -> None:
        typer.echo(msg)

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serving(workspace, say) as served:
            say("serving until Ctrl-C")
            wait(served)
    except KeyboardInterrupt:
        say("stopped")
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _given(ctx: typer.Context, free: set[str]) -> list[Any]:
    """The options of this command line that were given (not left at their defaults), other than ``free``."""

    def source(name: str) -> str:  # typer carries its own click: compare the source by name
        return getattr(ctx.get_parameter_source(name), "name", "")

    return [p for p in ctx.command.params if p.name and p.name not in free
            and source(p.name) not in ("DEFAULT", "DEFAULT_MAP")]


# what a resumed demo may be told again: the rest of its settings are its own
_RESUME_FREE = {"ctx", "workspace", "resume", "install_studio"}


def _check_resume(ctx: typer.Context, asked: object) -> None:
    """A resumed demo keeps the settings it started with: refuse any option given on this command line that
    would change one (repeating the same value is fine)."""
    from fleet.sim.resume import DemoState

    given = _given(ctx, _RESUME_FREE)
    if not given:
        return
    saved = DemoState.load(asked.workspace).demo_settings()  # type: ignore[attr-defined]
    attrs = {"frames": "frames_per_device", "epochs": "turn_epochs"}  # option -> DemoSettings field
    changed = []
    for p in given:
        attr = attrs.get(str(p.name), str(p.name))
        new, old = getattr(asked, attr), getattr(saved, attr)
        if attr == "replay_ratio":  # unset is the task's default: compare what each retrain gets
            new, old = asked.replay(), saved.replay()  # type: ignore[attr-defined]
        if attr == "new_repeats":
            new, old = asked.repeats(), saved.repeats()  # type: ignore[attr-defined]
        if attr == "balance":
            new, old = asked.balanced() or "none", saved.balanced() or "none"  # type: ignore[attr-defined]
        if new != old:
            changed.append(f"{p.opts[0]} {new} (it started with {old})")
    if changed:
        raise ValueError("--resume carries on with the settings the demo started with; this command line would "
                         "change " + ", ".join(changed) + ": drop those options, or start a new demo in a new "
                         "--workspace")
