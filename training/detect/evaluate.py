"""Detector evaluation: batched inference, COCO mAP overall / per class / per slice, the operating threshold.

mAP is COCO's, computed by pycocotools' ``COCOeval`` (the reference implementation; ``tests`` cross-check it
against faster-coco-eval and against hand-computed numbers): ``map`` is AP averaged over IoU 0.50:0.05:0.95
and the classes present, ``map_50`` the same at IoU 0.5, both with 101-point interpolated precision and up to
``max_detections`` boxes per image, over every object size (COCO's "all" area range). A slice is a
``key=value`` tag (``condition=night``) and gets its own COCOeval over its images. Classes without a true box
in a set are left out of its mean (COCO's rule), so a slice without any true box has no mAP (NaN), and the
gate skips it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from training.data import slice_masks
from training.detect.data import BoxSet
from training.detect.dense import DenseDetector, Detections, detector_spec, device_decode
from training.detect.models import DENSE_MODELS, Detector
from training.evaluate import normalize, stats_tensors

METRICS = ("map", "map_50")  # what the gate checks, primary first


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
            device: torch.device | None = None, batch_size: int = 64,
            amp_dtype: torch.dtype | None = None) -> Detections:
    """The detections for uint8 ``images`` (n, c, h, w), boxes normalised to [0, 1], as the fleet will see them:
    a detector with a dense layout is decoded by the device's rule (:func:`training.detect.dense.device_decode`
    with the manifest's settings); any other model (Faster R-CNN, which does not export) by torchvision's."""
    device = device or next(model.parameters()).device
    m, s = stats_tensors(mean, std, device)
    h, w = images.shape[2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    was_training = model.training
    model.eval()
    is_dense = isinstance(model, Detector) and model.name in DENSE_MODELS
    dense = DenseDetector(model).eval() if is_dense else None
    spec = detector_spec(model) if isinstance(model, Detector) else None
    out = Detections([], [], [])
    for i in range(0, len(images), batch_size):
        batch = np.require(images[i: i + batch_size], requirements=["W"])  # a mapped set's batch is copied
        x = normalize(torch.from_numpy(batch).to(device), m, s)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if dense is not None and spec is not None:
                boxes, scores, _ = dense(x)
                part = device_decode(boxes, scores.clamp(0, 1), spec)
                out.boxes += part.boxes
                out.scores += part.scores
                out.classes += part.classes
                continue
            dets = model(x)
        for d in dets:
            out.boxes.append((d["boxes"].float().cpu() / scale).clamp_(0, 1).numpy())
            out.scores.append(d["scores"].float().cpu().numpy())
            out.classes.append(d["labels"].cpu().numpy().astype(np.int64))
    model.train(was_training)
    return out


def mean_average_precision(
    pred: Detections, true_boxes: Sequence[np.ndarray], true_classes: Sequence[np.ndarray], *, num_classes: int,
    image_size: tuple[int, int] = (1, 1), images: Sequence[int] | None = None, max_detections: int = 100,
) -> dict[str, Any]:
    """COCO mAP of ``pred`` against true boxes (n images; boxes normalised xyxy) over ``images`` (default all).

    Returns ``map``, ``map_50``, ``map_75``, ``ap_per_class`` ({class index: AP@[.5:.95]} for classes with a
    true box), ``n`` images, ``boxes`` true boxes, and ``operating_threshold``: the score at which F1 at IoU 0.5
    peaks (None without detections). ``image_size`` (h, w) scales boxes to pixels for COCO's bookkeeping;
    IoU itself does not depend on it.
    """
    ev = _CocoSet(pred, true_boxes, true_classes, num_classes=num_classes, image_size=image_size)
    return ev.evaluate(range(len(pred)) if images is None else images, max_detections=max_detections)


def detection_metrics(pred: Detections, truth: BoxSet, class_names: Sequence[str], *,
                      max_detections: int = 100) -> dict[str, Any]:
    """mAP overall, per class and per ``key=value`` slice of ``truth`` (one COCO evaluation each), with counts."""
    h, w = truth.shape[1:]
    ev = _CocoSet(pred, truth.boxes, truth.classes, num_classes=len(class_names), image_size=(h, w))
    overall = ev.evaluate(range(len(truth)), max_detections=max_detections)
    per_class = {class_names[k]: {"n": int(n), "ap": overall["ap_per_class"].get(k, float("nan"))}
                 for k, n in enumerate(truth.class_counts(len(class_names))) if n}
    per_slice = {}
    for key, mask in slice_masks(truth.tags).items():
        m = ev.evaluate(np.flatnonzero(mask), max_detections=max_detections)
        per_slice[key] = {"n": int(mask.sum()), "boxes": m["boxes"], "map": m["map"], "map_50": m["map_50"]}
    return {"n": len(truth), "boxes": overall["boxes"], "map": overall["map"], "map_50": overall["map_50"],
            "map_75": overall["map_75"], "operating_threshold": overall["operating_threshold"],
            "per_class": per_class, "per_slice": per_slice}


class _CocoSet:
    """Ground truth and detections as pycocotools COCO objects (built once), evaluated over any subset."""

    def __init__(self, pred: Detections, true_boxes: Sequence[np.ndarray], true_classes: Sequence[np.ndarray], *,
                 num_classes: int, image_size: tuple[int, int]) -> None:
        from pycocotools.coco import COCO

        if len(pred) != len(true_boxes) or len(true_boxes) != len(true_classes):
            raise ValueError(f"need one entry per image: {len(pred)} predictions, {len(true_boxes)} true box sets, "
                             f"{len(true_classes)} true class sets")
        h, w = image_size
        scale = np.array([w, h, w, h], np.float64)
        images = [{"id": i, "width": w, "height": h} for i in range(len(pred))]
        cats = [{"id": k, "name": str(k)} for k in range(num_classes)]
        gt = _annotations(true_boxes, true_classes, None, scale)
        dt = _annotations(pred.boxes, pred.classes, pred.scores, scale)
        self.gt, self.dt = COCO(), COCO()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            for coco, anns in ((self.gt, gt), (self.dt, dt)):
                coco.dataset = {"images": images, "categories": cats, "annotations": anns}
                coco.createIndex()
        self.n_boxes = np.array([len(b) for b in true_boxes], np.int64)

    def evaluate(self, images: Sequence[int] | np.ndarray, *, max_detections: int) -> dict[str, Any]:
        from pycocotools.cocoeval import COCOeval

        ids = [int(i) for i in images]
        result: dict[str, Any] = {"n": len(ids), "boxes": int(self.n_boxes[ids].sum()) if ids else 0,
                                  "map": float("nan"), "map_50": float("nan"), "map_75": float("nan"),
                                  "ap_per_class": {}, "operating_threshold": None}
        if not ids:
            return result
        e = COCOeval(self.gt, self.dt, "bbox")
        e.params.imgIds = ids
        e.params.areaRng, e.params.areaRngLbl = [[0.0, 1e12]], ["all"]
        e.params.maxDets = [max_detections]
        with contextlib.redirect_stdout(io.StringIO()):
            e.evaluate()
            e.accumulate()
        p = e.eval["precision"][:, :, :, 0, 0]  # (iou thresholds, recall points, classes)
        iou = e.params.iouThrs
        result["map"] = _mean_valid(p)
        result["map_50"] = _mean_valid(p[np.isclose(iou, 0.5)])
        result["map_75"] = _mean_valid(p[np.isclose(iou, 0.75)])
        result["ap_per_class"] = {int(k): _mean_valid(p[:, :, j]) for j, k in enumerate(e.params.catIds)
                                  if (p[:, :, j] > -1).any()}
        result["operating_threshold"] = _best_f1_threshold(e)
        return result


def _annotations(boxes: Sequence[np.ndarray], classes: Sequence[np.ndarray], scores: Sequence[np.ndarray] | None,
                 scale: np.ndarray) -> list[dict[str, Any]]:
    anns: list[dict[str, Any]] = []
    for i, (b, c) in enumerate(zip(boxes, classes, strict=True)):
        px = np.asarray(b, np.float64).reshape(-1, 4) * scale
        for j, (x1, y1, x2, y2) in enumerate(px):
            w, h = x2 - x1, y2 - y1
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": int(c[j]), "bbox": [x1, y1, w, h],
                   "area": w * h, "iscrowd": 0}
            if scores is not None:
                ann["score"] = float(scores[i][j])
            anns.append(ann)
    return anns


def _mean_valid(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else float("nan")


def _best_f1_threshold(e: Any) -> float | None:
    """The detection score at which F1 over all classes, matching at IoU 0.5, is highest (COCOeval's matches)."""
    scores, hits, n_true = [], [], 0
    for r in e.evalImgs:
        if r is None:
            continue
        keep = ~r["dtIgnore"][0].astype(bool)
        scores.append(np.asarray(r["dtScores"])[keep])
        hits.append(r["dtMatches"][0][keep] > 0)
        n_true += int((~np.asarray(r["gtIgnore"]).astype(bool)).sum())
    s = np.concatenate(scores) if scores else np.zeros(0)
    if not s.size or not n_true:
        return None
    order = np.argsort(-s, kind="mergesort")
    tp = np.cumsum(np.concatenate(hits)[order])
    k = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (k + n_true)
    return float(s[order][int(np.argmax(f1))])
