"""The end of a turn on rank 0: evaluate, gate against the baseline, export, publish, write report.json."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fleet.errors import InvalidInput
from training.bank import write_bank
from training.checkpoint import load_checkpoint
from training.data import ImageSet
from training.evaluate import accuracy_metrics, predict, recommended_thresholds
from training.export import ExportResult, export_model
from training.gate import GateConfig, decide, metrics_from_report
from training.models import build_model
from training.publish import publish

if TYPE_CHECKING:
    from training.config import TrainArgs
    from training.prepare import ClientFactory, Prepared

log = logging.getLogger(__name__)

REPORT = "report.json"
PARITY_IMAGES = 256


def finish_turn(
    args: TrainArgs, model: torch.nn.Module, data: Prepared, meta: dict[str, Any], warm: dict[str, Any] | None,
    key: Any, factory: ClientFactory, report: dict[str, Any], t_start: float, *, device: torch.device,
) -> dict[str, Any]:
    timings = report["timings"]
    t = time.perf_counter()
    spec = meta["input"]
    candidate, logits = evaluate_sets(model, data.eval_sets, data.class_names, spec["mean"], spec["std"], device)
    baseline, baseline_name = _baseline(args, warm, data, device)
    timings["evaluate"] = time.perf_counter() - t
    report["metrics"] = candidate
    report["baseline"] = None if baseline is None else {"name": baseline_name, "metrics": baseline}

    if gate_turn(args, candidate, baseline, baseline_name, report):
        t = time.perf_counter()
        test = data.eval_sets["test"]
        pick = np.random.default_rng(args.seed).choice(len(test), min(PARITY_IMAGES, len(test)), replace=False)
        result = export_model(
            model, args.out, meta=meta, version=str(args.version), parent_version=meta["parent_version"],
            images=test.images[np.sort(pick)],
            metrics={**manifest_metrics(candidate), **training_counts(data.pool.labels, data.class_names)},
            thresholds=recommended_thresholds(logits["test"]), data_snapshot=snapshot_name(args, data),
            key=key, int8=args.int8, calibration=meta["calibration"].numpy(), parity_threshold=args.parity_threshold,
        )
        timings["export"] = time.perf_counter() - t
        publish_export(args, result, factory, report, bank_images=data.pool.images, bank_labels=data.pool.labels)
    timings["total"] = time.perf_counter() - t_start
    write_report(args.out, report)
    return report


def gate_turn(args: TrainArgs, candidate: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]] | None,
              baseline_name: str | None, report: dict[str, Any], *, metrics: tuple[str, ...] = ("accuracy",)) -> bool:
    """Decide with the run's gate settings; record the decision (``report["gate"]``, status ``rejected``)."""
    t = time.perf_counter()
    config = GateConfig(tolerance=args.tolerance, slice_tolerance=args.slice_tolerance,
                        slice_tolerances=args.slice_tolerances, min_slice_size=args.min_slice_size,
                        min_accuracy=args.min_accuracy)
    decision = decide(candidate, baseline, config, baseline_name=baseline_name, metrics=metrics)
    report["timings"]["gate"] = time.perf_counter() - t
    report["gate"] = decision.to_dict()
    report["published"] = False
    if not decision.passed:
        report["status"] = "rejected"
        log.warning("gate rejected %s: %s", args.version, "; ".join(decision.reasons))
    else:
        log.info("gate passed: %s", "; ".join(decision.reasons))
    return decision.passed


def publish_export(args: TrainArgs, result: ExportResult, factory: ClientFactory, report: dict[str, Any], *,
                   bank_images: np.ndarray, bank_labels: np.ndarray | None) -> None:
    """Record an export (status ``ready``) with its novelty bank, built by the exported model from
    ``bank_images: (n, c, h, w)`` uint8 (the training pool; ``bank_labels: (n,)`` or None), and, with
    ``--publish``, upload both and start the rollout."""
    report["export"] = result.to_dict()
    t = time.perf_counter()
    bank_path = write_bank(args.out, result.onnx_path, result.manifest, bank_images, bank_labels, seed=args.seed)
    report["timings"]["novelty_bank"] = time.perf_counter() - t
    report["novelty_bank"] = str(bank_path)
    report["status"] = "ready"
    if args.publish:
        t = time.perf_counter()
        client = None if args.dry_run else factory(args.publish)
        report["publish"] = publish(client, result.onnx_path, result.manifest_path, stages=args.rollout_stages,
                                    stage_seconds=args.stage_seconds, dry_run=args.dry_run, bank_path=bank_path)
        report["timings"]["publish"] = time.perf_counter() - t
        report["published"] = not args.dry_run
        report["status"] = "dry_run" if args.dry_run else "published"


def evaluate_sets(
    model: torch.nn.Module, sets: dict[str, ImageSet], class_names: list[str], mean: list[float], std: list[float],
    device: torch.device,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Metrics per evaluation set (fp32, so they describe what ONNX will compute) and the test logits."""
    metrics, logits = {}, {}
    for name, s in sets.items():
        lo, _ = predict(model, s.images, mean=mean, std=std, device=device)
        metrics[name] = accuracy_metrics(lo, s.labels, s.tags, class_names)
        logits[name] = lo
    return metrics, logits


def evaluate_checkpoint(
    ckpt: dict[str, Any], sets: dict[str, ImageSet], class_names: list[str], device: torch.device
) -> dict[str, dict[str, Any]]:
    """Rebuild a checkpoint's model and measure it on ``sets`` with its own normalization."""
    meta = ckpt["meta"]
    spec = meta["input"]
    shape = (spec["channels"], spec["height"], spec["width"])
    any_set = next(iter(sets.values()))
    if tuple(shape) != any_set.shape:
        raise InvalidInput(f"the baseline model takes input {tuple(shape)}; the evaluation images are {any_set.shape}")
    model = build_model(meta["model"], num_classes=meta["num_classes"], in_channels=shape[0],
                        image_size=shape[1:], width=meta["width"])
    model.load_state_dict(ckpt["model"])
    model.to(device)
    metrics, _ = evaluate_sets(model, sets, class_names, spec["mean"], spec["std"], device)
    return metrics


TRAIN_N_CLASS = "train_n/class="  # fleet.hub.selection reads these to tell which classes are in the cold start
MAX_CLASS_COUNTS = 256  # a manifest holds at most 1000 metrics: more classes give only the total


def training_counts(labels: np.ndarray, class_names: list[str], *, frames: int | None = None) -> dict[str, float]:
    """What a model trained on, for the manifest: ``train_n``, its frames (``frames``, else one a label), and per
    class ``train_n/class=<name>``, the ``labels`` of that class: a classifier's frames, a detector's objects (each
    class, zeros too; only the total for more than :data:`MAX_CLASS_COUNTS` classes or a name too long for a
    metric's 128 characters)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    out = {"train_n": float(len(y) if frames is None else frames)}
    names = [f"{TRAIN_N_CLASS}{c}" for c in class_names]
    if len(names) <= MAX_CLASS_COUNTS and all(len(n) <= 128 for n in names):
        counts = np.bincount(y[(y >= 0) & (y < len(names))], minlength=len(names))
        out.update({n: float(c) for n, c in zip(names, counts, strict=True)})
    return out


def manifest_metrics(metrics: dict[str, dict[str, Any]], *, keys: tuple[str, ...] = ("accuracy",),
                     max_items: int = 64) -> dict[str, float]:
    """Flatten ``{set: metrics}`` for the manifest: ``test_accuracy`` (each of ``keys``), ``test_n``, and per slice
    the first key: ``test/condition=night``, ..."""
    out: dict[str, float] = {}
    for set_name, m in metrics.items():
        for key in keys:
            out[f"{set_name}_{key}"] = m[key]
        out[f"{set_name}_n"] = float(m["n"])
    for set_name, m in metrics.items():
        for slice_name, sm in m.get("per_slice", {}).items():
            name = f"{set_name}/{slice_name}"
            if len(out) < max_items and len(name) <= 128:
                out[name] = sm[keys[0]]
    return {k: round(float(v), 6) for k, v in out.items() if v is not None and math.isfinite(v)}


def write_report(out: Path, report: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    report["artifacts"] = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    if REPORT not in report["artifacts"]:
        report["artifacts"].append(REPORT)
    path = out / REPORT
    tmp = path.with_name(f".{REPORT}.tmp")
    tmp.write_text(json.dumps(_clean(report), indent=2, sort_keys=False))
    tmp.replace(path)
    return path


def _baseline(
    args: TrainArgs, warm: dict[str, Any] | None, data: Prepared, device: torch.device
) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    return baseline_metrics(args, warm, lambda ckpt: evaluate_checkpoint(ckpt, data.eval_sets, data.class_names,
                                                                          device))


def baseline_metrics(
    args: TrainArgs, warm: dict[str, Any] | None, evaluate: Any
) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """What the candidate must hold: ``--gate-against`` (a report.json, or a checkpoint ``evaluate(ckpt)``
    measures now), else the warm start measured now, else nothing."""
    if args.gate_against:
        path = Path(args.gate_against)
        if path.suffix == ".json":
            return metrics_from_report(path)
        ckpt = load_checkpoint(path)
        return evaluate(ckpt), f"checkpoint {path} (version {ckpt['meta'].get('version')})"
    if warm is not None:
        return evaluate(warm), f"warm start {args.warm_start} (version {warm['meta'].get('version')})"
    return None, None


def snapshot_name(args: TrainArgs, data: Prepared) -> str:
    if data.snapshot_id:
        return f"hub-snapshot:{data.snapshot_id}"
    return f"{Path(args.data.split(':', 1)[-1]).name}@sha256:{data.info['fingerprint'][:16]}"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
