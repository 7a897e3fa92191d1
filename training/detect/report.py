"""The end of a detector's turn on rank 0: evaluate (mAP), gate against the baseline, export, publish, report.

The report has the classifier's shape (``metrics`` per evaluation set, ``baseline``, ``gate`` with its checks
and reasons, ``export``, ``publish``), with mAP@[.5:.95] (``map``) and mAP@.5 (``map_50``) where a classifier
has accuracy. A model without a dense layout (Faster R-CNN) is evaluated and gated but not exported; the report
says so (status ``evaluated``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fleet.errors import InvalidInput
from training.detect.evaluate import METRICS, detection_metrics, predict
from training.detect.models import DENSE_MODELS, Detector, Postprocess, build_detector
from training.report import (
    PARITY_IMAGES,
    baseline_metrics,
    gate_turn,
    manifest_metrics,
    publish_export,
    snapshot_name,
    training_counts,
    write_report,
)

if TYPE_CHECKING:
    from training.config import TrainArgs
    from training.detect.data import BoxSet
    from training.detect.prepare import BoxPrepared
    from training.prepare import ClientFactory

log = logging.getLogger(__name__)


def finish_detect_turn(
    args: TrainArgs, model: torch.nn.Module, data: BoxPrepared, meta: dict[str, Any], warm: dict[str, Any] | None,
    key: Any, factory: ClientFactory, report: dict[str, Any], t_start: float, *, device: torch.device,
) -> dict[str, Any]:
    timings = report["timings"]
    t = time.perf_counter()
    spec = meta["input"]
    candidate = evaluate_box_sets(model, data.eval_sets, data.class_names, spec["mean"], spec["std"], device)
    baseline, baseline_name = baseline_metrics(
        args, warm, lambda ckpt: evaluate_detector_checkpoint(ckpt, data.eval_sets, data.class_names, device))
    timings["evaluate"] = time.perf_counter() - t
    report["metrics"] = candidate
    report["baseline"] = None if baseline is None else {"name": baseline_name, "metrics": baseline}

    if gate_turn(args, candidate, baseline, baseline_name, report, metrics=METRICS):
        assert isinstance(model, Detector)
        if model.name not in DENSE_MODELS:
            report["status"] = "evaluated"
            report["export"] = {"skipped": f"{model.name} has no dense layout (its region proposals need NMS inside "
                                           f"the network), so it is not exported for the fleet; models that export: "
                                           f"{list(DENSE_MODELS)}"}
        else:
            from training.detect.export import export_detector

            t = time.perf_counter()
            test = data.eval_sets["test"]
            pick = np.sort(np.random.default_rng(args.seed).choice(len(test), min(PARITY_IMAGES, len(test)),
                                                                   replace=False))
            result = export_detector(
                model, args.out, meta=meta, version=str(args.version), parent_version=meta["parent_version"],
                images=test.images.images[pick], truth=test,
                metrics={**manifest_metrics(candidate, keys=METRICS), **box_counts(data.pool, data.class_names)},
                operating_threshold=candidate["test"]["operating_threshold"],
                data_snapshot=snapshot_name(args, data), key=key, int8=args.int8,
                calibration=meta["calibration"].numpy(), parity_threshold=args.parity_threshold,
            )
            timings["export"] = time.perf_counter() - t
            publish_export(args, result, factory, report, bank_images=data.pool.images.images, bank_labels=None)
    timings["total"] = time.perf_counter() - t_start
    write_report(args.out, report)
    return report


def box_counts(pool: BoxSet, class_names: list[str]) -> dict[str, float]:
    """The manifest's training counts for a detector: its frames, and its objects (boxes) of each class."""
    classes = np.concatenate(pool.classes) if pool.n_boxes else np.zeros(0, np.int64)
    return training_counts(classes, class_names, frames=len(pool))


def evaluate_box_sets(model: torch.nn.Module, sets: dict[str, BoxSet], class_names: list[str], mean: list[float],
                      std: list[float], device: torch.device) -> dict[str, dict[str, Any]]:
    """mAP per evaluation set (fp32 inference, the boxes the device decodes: :func:`predict`)."""
    out = {}
    for name, s in sets.items():
        pred = predict(model, s.images.images, mean=mean, std=std, device=device)
        out[name] = detection_metrics(pred, s, class_names)
    return out


def rebuild_detector(meta: dict[str, Any], state: dict[str, Any]) -> Detector:
    """A checkpoint's detector, with the post-processing it was trained and exported with."""
    spec = meta["input"]
    model = build_detector(meta["model"], num_classes=meta["num_classes"], in_channels=spec["channels"],
                           image_size=(spec["height"], spec["width"]), width=meta["width"],
                           post=Postprocess(**meta["postprocess"]))
    model.load_state_dict(state)
    return model


def evaluate_detector_checkpoint(ckpt: dict[str, Any], sets: dict[str, BoxSet], class_names: list[str],
                                 device: torch.device) -> dict[str, dict[str, Any]]:
    """Rebuild a detector checkpoint and measure it on ``sets`` with its own normalization."""
    meta = ckpt["meta"]
    if meta.get("task") != "detect":
        raise InvalidInput(f"the baseline checkpoint is a {meta.get('task', 'classify')!r} model, not a detector")
    spec = meta["input"]
    shape = (spec["channels"], spec["height"], spec["width"])
    any_set = next(iter(sets.values()))
    if tuple(shape) != any_set.shape:
        raise InvalidInput(f"the baseline detector takes input {shape}; the evaluation images are {any_set.shape}")
    model = rebuild_detector(meta, ckpt["model"]).to(device)
    return evaluate_box_sets(model, sets, class_names, spec["mean"], spec["std"], device)
