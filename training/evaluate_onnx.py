"""``flywheel evaluate``: an exported model (``model.onnx`` with its signed ``manifest.json``) run by the
device's own runtime (:class:`fleet.inference.runtime.ModelRuntime`, onnxruntime, the device's preprocessing and,
for a detector, its decoding) over labeled images; the metrics the gate uses, overall and per slice.

A classifier gets top-1 accuracy; a detector COCO mAP@[.5:.95] and mAP@.5 (:mod:`training.detect.evaluate`).
A slice is a ``key=value`` tag of the images (``condition=night``). What is measured is what the fleet runs,
not the torch model it was exported from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fleet.errors import InvalidInput

BATCH = 64


def evaluate_exported(model: Path, data: str, *, manifest: Path | None = None, split: str = "test",
                      max_images: int | None = None) -> dict[str, Any]:
    """Metrics of the exported ``model`` on ``data`` (``npz:PATH``, or for a detector ``coco:PATH``); ``split``:
    test or train (an npz without a test split has only train)."""
    import json

    from fleet.errors import ProtocolError
    from fleet.inference.runtime import ModelRuntime
    from fleet.protocol import ModelManifest, SignedManifest
    from training.data import parse_source

    if not model.is_file():
        raise InvalidInput(f"--model {model} is not a file; expected an exported model.onnx")
    if manifest is None:  # what flywheel train/export write beside the model: signed, or unsigned without a key
        manifest = next((p for p in (model.parent / "manifest.json", model.parent / "manifest.unsigned.json")
                         if p.is_file()), model.parent / "manifest.json")
    if not manifest.is_file():
        raise InvalidInput(f"no manifest at {manifest}; pass --manifest with the model's manifest.json")
    if split not in ("test", "train"):
        raise InvalidInput(f"--split must be test or train; received {split!r}")
    try:
        raw = json.loads(manifest.read_text())
        m = SignedManifest.from_dict(raw).manifest if "signature" in raw else ModelManifest.from_dict(raw)
    except (ValueError, ProtocolError) as exc:
        raise InvalidInput(f"{manifest} is not a model manifest (signed or unsigned): {exc}") from exc
    runtime = ModelRuntime(model, m, threads=2)
    src = parse_source(data, what="--data")
    shape = (m.input.channels, m.input.height, m.input.width)
    if m.task == "detect":
        return _detector(runtime, src, shape, m.class_names, split=split, max_images=max_images)
    return _classifier(runtime, src, shape, split=split, max_images=max_images)


def _pick(splits: Any, split: str, data: str) -> Any:
    chosen = splits.test if split == "test" else splits.train
    if chosen is None:
        raise InvalidInput(f"{data} has no {split} split")
    return chosen


def _frames(images: np.ndarray) -> list[np.ndarray]:
    """uint8 (n, c, h, w) as the frames a device sees: (h, w) or (h, w, c)."""
    return [im[0] if im.shape[0] == 1 else np.ascontiguousarray(im.transpose(1, 2, 0)) for im in images]


def _detector(runtime: Any, src: Any, shape: tuple[int, int, int], class_names: list[str], *, split: str,
              max_images: int | None) -> dict[str, Any]:
    from training.detect.data import conform_boxes, load_box_npz, load_coco
    from training.detect.dense import Detections
    from training.detect.evaluate import detection_metrics

    if src.kind not in ("npz", "coco"):
        raise InvalidInput(f"--data for a detector must be npz:PATH or coco:PATH; received {src.kind}:{src.location}")
    splits = load_box_npz(src.location) if src.kind == "npz" else \
        load_coco(src.location, channels=shape[0], size=shape[1:], class_names=class_names)
    truth = _pick(splits, split, f"{src.kind}:{src.location}")
    if max_images is not None:
        truth = truth.subset(np.arange(min(len(truth), max_images)))
    truth = conform_boxes(truth, shape)
    pred = Detections([], [], [])
    frames = _frames(truth.images.images)
    for i in range(0, len(frames), BATCH):
        d = runtime.run(frames[i:i + BATCH]).detections
        for f in range(d.n):
            r = d.rows(f)
            pred.boxes.append(d.boxes[r].astype(np.float32))
            pred.scores.append(d.scores[r].astype(np.float32))
            pred.classes.append(d.labels[r].astype(np.int64))
    metrics = detection_metrics(pred, truth, class_names)
    return {"task": "detect", "model_version": runtime.manifest.version, **metrics}


def _classifier(runtime: Any, src: Any, shape: tuple[int, int, int], *, split: str,
                max_images: int | None) -> dict[str, Any]:
    from training.data import conform, load_npz, slice_masks

    if src.kind != "npz":
        raise InvalidInput(f"--data for a classifier must be npz:PATH; received {src.kind}:")
    images = _pick(load_npz(src.location), split, f"npz:{src.location}")
    if max_images is not None:
        images = images.subset(np.arange(min(len(images), max_images)))
    images = conform(images, shape)
    frames = _frames(images.images)
    pred = np.concatenate([runtime.run(frames[i:i + BATCH]).logits.argmax(1) for i in range(0, len(frames), BATCH)]) \
        if frames else np.zeros(0, np.int64)
    ok = pred == images.labels
    per_slice = {k: {"n": int(mask.sum()), "accuracy": float(ok[mask].mean())}
                 for k, mask in slice_masks(images.tags).items() if mask.any()}
    return {"task": "classify", "model_version": runtime.manifest.version, "n": len(ok),
            "accuracy": float(ok.mean()) if len(ok) else float("nan"), "per_slice": per_slice}
