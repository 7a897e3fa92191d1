"""``flywheel train`` and ``flywheel export``. torch is imported inside the commands, never at import time.

Exit codes of ``flywheel train``: 0 the candidate passed the gate (and was published, if asked);
3 the gate rejected it (nothing published); 1 a fault (bad snapshot, parity failure, hub refused);
2 bad arguments. The run report is ``OUT/report.json`` in every case but 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from fleet.errors import FlywheelError

EXIT_REJECTED = 3

train_app = typer.Typer(add_completion=False, help="Retrain, gate, export and publish a model.")
export_app = typer.Typer(add_completion=False, help="Export a checkpoint to signed ONNX.")
evaluate_app = typer.Typer(add_completion=False, help="Evaluate an exported model on labeled images.")


@train_app.command("train")
def train_command(
    data: str = typer.Option(
        ..., "--data",
        help="New labeled data: npz:PATH | folder:PATH | hub:URL (pulls a snapshot) | coco:PATH (detect).",
    ),
    task: str = typer.Option("classify", "--task", help="classify | detect (boxes: npz, coco:PATH or hub:URL)."),
    out: Path = typer.Option(
        ..., "--out", "-o",
        help="Run folder: checkpoint.pt, report.json, model.onnx, manifest.json.",
    ),
    base: str | None = typer.Option(
        None, "--base",
        help="Base training set replayed beside the new data: npz:PATH | folder:PATH | coco:PATH (detect).",
    ),
    replay_ratio: float = typer.Option(
        0.5, "--replay-ratio", help="Share of each epoch drawn from --base (0..1; 1: all of --base every epoch, beside "
        "all the new data)."),
    new_repeats: int = typer.Option(
        1, "--new-repeats", help="Each new image this many times an epoch, beside the base that --replay-ratio "
        "replays (needs --base): weighs a turn's few edge cases against a large base without dropping any of it."),
    snapshot: str | None = typer.Option(
        None, "--snapshot",
        help="Use this existing hub snapshot id instead of creating one.",
    ),
    holdout: float = typer.Option(
        0.2, "--holdout",
        help="Share of new data held out for testing when it has no test split.",
    ),
    class_names: str | None = typer.Option(
        None, "--class-names",
        help="Comma-separated class names (default: from the data).",
    ),
    image_size: str | None = typer.Option(None, "--image-size", help="Resize to N or HxW (default: the data's size)."),
    channels: int | None = typer.Option(None, "--channels", help="1 (grayscale) or 3 (RGB); default: the data's."),
    balance: str | None = typer.Option(
        None, "--balance", help="Class balancing: none | loss (weighted loss; the classifier default) | sampler.",
    ),
    augment: str = typer.Option(
        "light", "--augment", help="Augmentation preset: none | light | standard | robust (detect: none | light | "
        "robust, which keep boxes in place).",
    ),
    model: str | None = typer.Option(
        None, "--model",
        help="smallcnn | mobilenet_v3_small | resnet18; detect: fcos_tiny | ssdlite320_mobilenet_v3_large | "
        "fasterrcnn_mobilenet_v3_large_320_fpn (default: the warm start's, else smallcnn / fcos_tiny).",
    ),
    width: int | None = typer.Option(None, "--width", help="smallcnn base width (default 32); fcos_tiny's (16)."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Default 64 (classify), 16 (detect)."),
    lr: float | None = typer.Option(
        None, "--lr",
        help="Peak one-cycle learning rate (default: 0.1 sgd, 0.005 adamw, x sqrt(batch/64); detect: 0.01 sgd, "
        "0.003 adamw, x sqrt(batch/16); x 0.1 with --warm-start).",
    ),
    optimizer: str | None = typer.Option(None, "--optimizer", help="sgd | adamw (default: sgd; detect: adamw)."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing"),
    seed: int = typer.Option(0, "--seed"),
    warm_start: Path | None = typer.Option(
        None, "--warm-start",
        help="Start from this checkpoint.pt (the current model); it is also the gate's baseline.",
    ),
    init_weights: Path | None = typer.Option(
        None, "--init-weights",
        help="detect: start from this torchvision state dict (.pth) of the same architecture; tensors of another "
        "shape (the class layers) stay random. Never downloaded.",
    ),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue OUT/checkpoint.pt if present (after a crash or kill).",
    ),
    regression_set: list[str] = typer.Option(
        [], "--regression-set",
        help="Past edge cases: npz:PATH | folder:PATH | snapshot:ID; repeatable.",
    ),
    gate_against: Path | None = typer.Option(
        None, "--gate-against",
        help="Baseline: a checkpoint.pt (evaluated now) or a previous report.json.",
    ),
    tolerance: float = typer.Option(
        0.0, "--tolerance",
        help="Allowed drop of overall test accuracy against the baseline.",
    ),
    slice_tolerance: list[str] = typer.Option(
        [], "--slice-tolerance",
        help="Allowed drop per slice: NUMBER (default 0.02) or SLICE:NUMBER, e.g. condition=night:0.05; repeatable.",
    ),
    min_slice_size: int = typer.Option(
        10, "--min-slice-size",
        help="Slices with fewer images are reported but not gated.",
    ),
    min_accuracy: float = typer.Option(
        0.0, "--min-accuracy", help="Absolute floor for test accuracy (detect: test mAP@[.5:.95]).",
    ),
    version: str | None = typer.Option(None, "--version", help="Model version (default: MODEL-UTCTIME)."),
    parent: str | None = typer.Option(None, "--parent", help="Parent version (default: the warm start's version)."),
    sign_key: str | None = typer.Option(
        None, "--sign-key",
        help="ed25519 private key (PEM file); default: $FLYWHEEL_SIGNING_KEY.",
    ),
    int8: bool = typer.Option(
        False, "--int8/--no-int8",
        help="Also quantize to int8; shipped only with >= 99% top-1 agreement (detect: mAP within 0.01 of fp32).",
    ),
    parity_threshold: float = typer.Option(
        1e-3, "--parity-threshold",
        help="Max abs difference allowed between torch and ONNX.",
    ),
    publish: str | None = typer.Option(None, "--publish", help="Hub URL: upload the model and start a staged rollout."),
    token: str | None = typer.Option(None, "--token", envvar="FLYWHEEL_TOKEN", help="Trainer-scope hub token."),
    rollout_stages: str = typer.Option("0.1,0.5,1.0", "--rollout-stages", help="Rollout fractions, ending at 1.0."),
    stage_seconds: float | None = typer.Option(
        None, "--stage-seconds",
        help="Seconds per rollout stage (hub default if unset).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Do everything but the upload and rollout."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
    threads: int | None = typer.Option(
        None, "--threads",
        help="CPU threads for torch (default: cores / local processes).",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir",
        help="Blob cache (default: $FLYWHEEL_CACHE or ~/.cache/flywheel/blobs).",
    ),
    stream: bool = typer.Option(
        False, "--stream/--no-stream",
        help="Decode the data into memory-mapped files beside the blob cache and read each batch from them, so "
             "the snapshot and replay set need disk, not memory.",
    ),
    object_store: str | None = typer.Option(
        None, "--object-store",
        help="s3://BUCKET/PREFIX/: read the hub snapshot's manifest and blobs from the hub's object store "
             "(endpoint and credentials: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).",
    ),
    eval_each_epoch: bool = typer.Option(False, "--eval-each-epoch", help="Record test accuracy after every epoch."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri",
        help="Log parameters, per-epoch metrics, the gate report and the ONNX model to this MLflow store, e.g. "
        "sqlite:///runs/mlflow.db or http://HOST:5000 (the tracking extra); checked before training starts.",
    ),
    experiment: str = typer.Option("flywheel", "--experiment", help="MLflow experiment (created if missing)."),
) -> None:
    """Retrain on new labels (+ replayed base data), gate against the current model, export, sign, publish."""
    _logging()
    from training.config import TrainArgs, parse_image_size
    from training.gate import parse_slice_tolerances
    from training.publish import parse_stages

    try:
        default_tol, named_tol = parse_slice_tolerances(slice_tolerance)
        args = TrainArgs(
            data=data, out=out, task=task, base=base, replay_ratio=replay_ratio, new_repeats=new_repeats,
            snapshot=snapshot, holdout=holdout,
            class_names=[c.strip() for c in class_names.split(",")] if class_names else None,
            image_size=parse_image_size(image_size), channels=channels, balance=balance, augment=augment,
            model=model, width=width, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
            weight_decay=weight_decay, label_smoothing=label_smoothing, seed=seed, warm_start=warm_start,
            init_weights=init_weights, resume=resume, regression_sets=list(regression_set),
            gate_against=gate_against, tolerance=tolerance,
            slice_tolerance=0.02 if default_tol is None else default_tol, slice_tolerances=named_tol,
            min_slice_size=min_slice_size, min_accuracy=min_accuracy, version=version, parent=parent,
            sign_key=sign_key, int8=int8, parity_threshold=parity_threshold, publish=publish, token=token,
            rollout_stages=parse_stages(rollout_stages), stage_seconds=stage_seconds, dry_run=dry_run,
            device=device, amp=amp, threads=threads, cache_dir=cache_dir, stream=stream,
            object_store=object_store, eval_each_epoch=eval_each_epoch,
            tracking_uri=tracking_uri, experiment=experiment,
        ).validate()
    except FlywheelError as exc:
        raise typer.BadParameter(str(exc)) from exc
    report = _run_with_progress(lambda hook: _train_main(args, hook), enabled=progress)
    if report.get("status") == "worker-done":
        return
    gate = report.get("gate", {})
    typer.echo(f"{report['status']}: {report['version']} - " + "; ".join(gate.get("reasons", [])))
    typer.echo(f"report: {args.out / 'report.json'}")
    if report["status"] == "rejected":
        raise typer.Exit(EXIT_REJECTED)


@export_app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint.pt written by flywheel train."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.onnx and manifest.json."),
    version: str | None = typer.Option(None, "--version", help="Model version (default: the checkpoint's)."),
    parent: str | None = typer.Option(None, "--parent", help="Parent version (default: the checkpoint's)."),
    sign_key: str | None = typer.Option(
        None, "--sign-key",
        help="ed25519 private key (PEM file); default: $FLYWHEEL_SIGNING_KEY.",
    ),
    int8: bool = typer.Option(
        False, "--int8/--no-int8",
        help="Quantize to int8; shipped only with >= 99% top-1 agreement.",
    ),
    eval_data: str | None = typer.Option(
        None, "--eval-data",
        help="npz:PATH|folder:PATH whose test split checks parity and int8 agreement (default: the checkpoint's"
        " calibration images).",
    ),
    parity_threshold: float = typer.Option(1e-3, "--parity-threshold"),
) -> None:
    """Export a trained checkpoint to ONNX (logits + embedding), check parity, sign the manifest."""
    _logging()
    import json
    import os

    from fleet.errors import check_folder
    from fleet.signing import PRIVATE_KEY_ENV, load_private_key
    from training.checkpoint import load_checkpoint
    from training.export import export_model
    from training.models import build_model

    try:
        check_folder(out, "--out", "model.onnx and manifest.json")
        ckpt = load_checkpoint(checkpoint)
        meta = ckpt["meta"]
        if meta.get("task") == "detect":
            result = _export_detector(ckpt, out, version=version, parent=parent, sign_key=sign_key, int8=int8,
                                      eval_data=eval_data, parity_threshold=parity_threshold)
            (out / "export.json").write_text(json.dumps(result.to_dict(), indent=2))
            typer.echo(f"exported {result.manifest.version} ({result.shipped}, {result.size} bytes, parity "
                       f"{result.parity_max_abs_diff:.2e}) -> {result.onnx_path}, {result.manifest_path}")
            return
        spec = meta["input"]
        shape = (spec["channels"], spec["height"], spec["width"])
        model = build_model(meta["model"], num_classes=meta["num_classes"], in_channels=shape[0],
                            image_size=shape[1:], width=meta["width"])
        model.load_state_dict(ckpt["model"])
        key = load_private_key(sign_key) if (sign_key or os.environ.get(PRIVATE_KEY_ENV)) else None
        calib = meta["calibration"].numpy()
        images = _eval_images(eval_data, shape) if eval_data else calib
        result = export_model(
            model, out, meta=meta, version=version or meta["version"],
            parent_version=parent if parent is not None else meta.get("parent_version"), images=images,
            data_snapshot=meta.get("data_snapshot"), key=key, int8=int8, calibration=calib,
            parity_threshold=parity_threshold,
        )
    except FlywheelError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc
    (out / "export.json").write_text(json.dumps(result.to_dict(), indent=2))
    typer.echo(f"exported {result.manifest.version} ({result.shipped}, {result.size} bytes, parity "
               f"{result.parity_max_abs_diff:.2e}) -> {result.onnx_path}, {result.manifest_path}")


@evaluate_app.command("evaluate")
def evaluate_command(
    model: Path = typer.Option(..., "--model", help="An exported model.onnx (its signed manifest.json beside it)."),
    data: str = typer.Option(..., "--data", help="Labeled images: npz:PATH (detect: boxes) or coco:PATH (detect)."),
    manifest: Path | None = typer.Option(None, "--manifest", help="The signed manifest (default: beside --model)."),
    split: str = typer.Option("test", "--split", help="test | train: which split of --data."),
    max_images: int | None = typer.Option(None, "--max-images", min=1, help="Evaluate at most this many images."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
) -> None:
    """Run an exported model as the fleet does (onnxruntime, the device's decoding) over labeled images: top-1
    accuracy (classifier) or COCO mAP (detector), overall and per slice."""
    _logging()
    import json

    from training.evaluate_onnx import evaluate_exported

    try:
        result = evaluate_exported(model, data, manifest=manifest, split=split, max_images=max_images)
    except FlywheelError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True, default=float))
        return
    head = "accuracy" if result["task"] == "classify" else "map"
    typer.echo(f"{result['model_version']}: {head} {result[head]:.4f} on {result['n']} images")
    for key, m in sorted(result["per_slice"].items()):
        typer.echo(f"  {key}: {head} {m[head]:.4f} (n={m['n']})")


def _export_detector(ckpt: dict[str, Any], out: Path, *, version: str | None, parent: str | None,
                     sign_key: str | None, int8: bool, eval_data: str | None, parity_threshold: float) -> Any:
    """``flywheel export`` of a detector checkpoint: the dense layout; ``--eval-data`` (boxes) for parity and int8."""
    import os

    import numpy as np

    from fleet.signing import PRIVATE_KEY_ENV, load_private_key
    from training.detect.export import export_detector
    from training.detect.report import rebuild_detector

    meta = ckpt["meta"]
    spec = meta["input"]
    shape = (spec["channels"], spec["height"], spec["width"])
    truth = None
    if eval_data:
        from training.data import parse_source
        from training.detect.data import conform_boxes, load_box_npz, load_coco

        src = parse_source(eval_data, what="--eval-data")
        if src.kind not in ("npz", "coco"):
            raise typer.BadParameter(f"--eval-data for a detector must be npz:PATH or coco:PATH; received {eval_data}")
        splits = load_box_npz(src.location) if src.kind == "npz" else \
            load_coco(src.location, channels=shape[0], size=shape[1:], class_names=meta["class_names"])
        truth = conform_boxes(splits.test if splits.test is not None else splits.train, shape)
        truth = truth.subset(np.arange(min(len(truth), 512)))
    calib = meta["calibration"].numpy()
    key = load_private_key(sign_key) if (sign_key or os.environ.get(PRIVATE_KEY_ENV)) else None
    return export_detector(
        rebuild_detector(meta, ckpt["model"]), out, meta=meta, version=version or meta["version"],
        parent_version=parent if parent is not None else meta.get("parent_version"),
        images=truth.images.images if truth is not None else calib, truth=truth,
        data_snapshot=meta.get("data_snapshot"), key=key, int8=int8, calibration=calib,
        parity_threshold=parity_threshold,
    )


def _train_main(args: Any, hook: Any) -> dict[str, Any]:
    from training.train import main

    try:
        return main(args, progress=hook)
    except FlywheelError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _eval_images(spec: str, shape: tuple[int, int, int]) -> Any:
    from training.data import conform, load_folder, load_npz, parse_source

    src = parse_source(spec, what="--eval-data")
    if src.kind == "npz":
        splits = load_npz(src.location)
    else:
        splits = load_folder(src.location, channels=shape[0], size=shape[1:])
    images = conform(splits.test if splits.test is not None else splits.train, shape).images
    return images[:512]


def _run_with_progress(fn: Any, *, enabled: bool) -> dict[str, Any]:
    """Call ``fn(hook)``; the hook drives one rich progress bar per phase."""
    if not enabled or not sys.stderr.isatty():
        result: dict[str, Any] = fn(None)
        return result
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        tasks: dict[str, Any] = {}

        def hook(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        result = fn(hook)
        return result


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
