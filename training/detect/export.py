"""Export a detector to the fleet's dense layout, prove the device decodes the same boxes as torch, sign it.

The ONNX graph is :class:`training.detect.dense.DenseDetector` (backbone, head and the decoding of every
anchor's box, no NMS; the layout is described there). The device turns its outputs into boxes with
:func:`trigger.nms.decode_dense` and the manifest's :class:`fleet.protocol.DetectorSpec`, the rule the trainer's
mAP gate measured the model with (:func:`training.detect.dense.device_decode`). :func:`export_detector` checks,
on real images, that onnxruntime's outputs match torch's and that the device's boxes from them match the boxes
the gate saw, and refuses to write a manifest when either fails. Faster R-CNN proposes regions through NMS
inside the network, so it has no dense layout and does not export.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fleet.protocol import DetectorSpec, InputSpec, ModelManifest
from fleet.protocol.model import OUTPUTS as LAYOUTS
from training.detect.dense import DenseDetector, channels, detector_spec, device_decode, features
from training.detect.evaluate import mean_average_precision
from training.detect.models import Detector
from training.errors import ParityError
from training.export import ExportResult, export_onnx, normalize_images, parity_check, quantize_int8, write_manifest
from trigger import box_iou

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from training.detect.data import BoxSet

log = logging.getLogger(__name__)

OUTPUTS = LAYOUTS["detect"]
INT8_MAX_MAP_DROP = 0.01  # int8 ships only if its mAP@[.5:.95] is within this of the fp32 model's
DECODE_ATOL = 1e-4  # boxes (normalised) and scores the device decodes from ONNX vs from torch


def compare_dense(onnx: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray], spec: DetectorSpec,
                  *, atol: float = DECODE_ATOL, names: tuple[str, str] = ("onnx", "torch")) -> str | None:
    """None when the device's boxes from two dense outputs (``(boxes (n, A, 4), scores (n, A, k))`` each) agree,
    else what differs.

    Both sides are decoded with :func:`device_decode` and ``spec``, and every box is traced to the anchor it came
    from. An anchor both sides keep must have the same class, score and box (to ``atol``; the class may differ only
    when its two best class scores are within ``atol``). An anchor one side keeps and the other drops must be
    dropped at a rounding boundary the other side's outputs show: a score within ``atol`` of the threshold or of
    the top-k cut, a box clipped to no area, the cap on boxes, or NMS by a box that this side does not keep, does
    not put first, puts in another class, or overlaps at most ``nms_iou`` (an undertrained model scores many
    overlapping anchors alike, and a difference of 1e-7 decides which of them NMS keeps: seen in CI as 91
    detections vs 90). Anything else is a difference.
    """
    sides = [_Decoded(name, *out, spec) for name, out in zip(names, (onnx, reference), strict=True)]
    one, two = sides
    if one.best.shape != two.best.shape:
        return f"outputs of shape {one.best.shape} vs {two.best.shape}"
    for i in range(one.best.shape[0]):
        for side in sides:
            if i in side.untraced:
                return f"image {i}: {side.untraced[i]}"
        union = np.union1d(one.kept[i], two.kept[i])
        gap = float(np.max(np.abs(one.box[i, union] - two.box[i, union]), initial=0.0))
        if gap > atol:
            return f"image {i}: boxes differ by up to {gap:.3g}"
        gap = float(np.max(np.abs(one.best[i, union] - two.best[i, union]), initial=0.0))
        if gap > atol:
            return f"image {i}: scores differ by up to {gap:.3g}"
        flip = union[(one.cls[i, union] != two.cls[i, union]) & (one.margin[i, union] > atol)
                     & (two.margin[i, union] > atol)]
        if len(flip):
            j = int(flip[0])
            return f"image {i}: anchor {j} is class {int(one.cls[i, j])} vs {int(two.cls[i, j])}"
        for side, other in ((one, two), (two, one)):
            mine, theirs = side.kept[i], other.kept[i]
            for j in np.setdiff1d(mine, theirs).tolist():
                if not _dropped_at_a_boundary(other, side, i, j, spec, atol):
                    return (f"image {i}: {side.name} keeps a box (anchor {j}, class {int(side.cls[i, j])}, score "
                            f"{float(side.best[i, j]):.6g}) that {other.name} drops, at no rounding boundary "
                            f"({len(mine)} detections vs {len(theirs)})")
    return None


class _Decoded:
    """One side's dense outputs, its device decoding and the anchor each kept box came from (``kept[i]``: the
    anchors of image ``i``; ``untraced[i]``: why a box of image ``i`` could not be traced, its ``kept`` empty)."""

    def __init__(self, name: str, boxes: np.ndarray, scores: np.ndarray, spec: DetectorSpec) -> None:
        self.name = name
        scores = np.asarray(scores, np.float32)
        self.box = np.clip(np.asarray(boxes, np.float32), 0.0, 1.0)
        top2 = np.sort(scores, axis=2)[..., -2:] if scores.shape[2] > 1 else np.concatenate(
            [np.full_like(scores, -np.inf), scores], axis=2)
        self.best, self.margin = top2[..., -1], top2[..., -1] - top2[..., -2]
        self.cls = scores.argmax(axis=2)
        self.untraced: dict[int, str] = {}
        detections = device_decode(boxes, scores, spec)
        self.kept = [self._trace(i, b, s) for i, (b, s) in enumerate(zip(detections.boxes, detections.scores,
                                                                        strict=True))]

    def _trace(self, i: int, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out: list[int] = []
        for box, score in zip(boxes, scores, strict=True):
            same = np.flatnonzero((self.best[i] == score) & np.all(self.box[i] == box, axis=1))
            same = same[~np.isin(same, out)]
            if not len(same):
                self.untraced[i] = f"{self.name}'s box {box.tolist()} (score {float(score):.6g}) comes from no anchor"
                return np.zeros(0, np.int64)
            out.append(int(same[0]))
        return np.asarray(out, np.int64)

    def before(self, i: int, k: int, j: int) -> bool:
        """Whether NMS takes anchor ``k`` of image ``i`` before anchor ``j`` (higher score, then lower anchor)."""
        return bool(self.best[i, k] > self.best[i, j] or (self.best[i, k] == self.best[i, j] and k < j))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(box_iou(a[None], b[None])[0, 0])


def _dropped_at_a_boundary(other: _Decoded, side: _Decoded, i: int, j: int, spec: DetectorSpec,
                           atol: float) -> bool:
    """Whether ``other`` drops anchor ``j`` of image ``i``, which ``side`` keeps, at a rounding boundary."""
    score = float(other.best[i, j])
    if score < spec.score_threshold:
        return float(side.best[i, j]) < spec.score_threshold + atol
    box = other.box[i, j]
    if box[2] <= box[0] or box[3] <= box[1]:
        return bool(min(side.box[i, j, 2] - side.box[i, j, 0], side.box[i, j, 3] - side.box[i, j, 1]) <= atol)
    candidates = other.best[i][(other.best[i] >= spec.score_threshold) & (other.box[i, :, 2] > other.box[i, :, 0])
                               & (other.box[i, :, 3] > other.box[i, :, 1])]
    if len(candidates) > spec.pre_nms_top_k:
        cut = float(np.partition(candidates, len(candidates) - spec.pre_nms_top_k)[len(candidates)
                                                                                  - spec.pre_nms_top_k])
        if score <= cut:
            return cut - score <= 2 * atol
    theirs, mine = other.kept[i], side.kept[i]
    if len(theirs) >= spec.max_detections and score <= float(other.best[i, theirs].min()):
        return True  # capped: a difference above it moved the cap
    for k in theirs.tolist():
        if (k == j or other.cls[i, k] != other.cls[i, j] or not other.before(i, k, j)
                or _iou(other.box[i, k], other.box[i, j]) <= spec.nms_iou):
            continue  # not what suppressed j over there
        if (k not in mine or not side.before(i, k, j) or side.cls[i, k] != side.cls[i, j]
                or _iou(side.box[i, k], side.box[i, j]) <= spec.nms_iou):
            return True  # over here k is gone, later, of another class or overlaps j at most nms_iou
    return False


def export_detector(
    detector: Detector,
    out_dir: Path,
    *,
    meta: dict[str, Any],
    version: str,
    parent_version: str | None,
    images: np.ndarray,
    truth: BoxSet | None = None,
    metrics: dict[str, float] | None = None,
    operating_threshold: float | None = None,
    data_snapshot: str | None = None,
    key: Ed25519PrivateKey | None = None,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    parity_threshold: float = 1e-3,
) -> ExportResult:
    """Export the dense layout, check it, optionally quantize, then write and sign the manifest (``task: detect``).

    Checks, each a :class:`ParityError` before any manifest is written: onnxruntime vs torch on every output
    (max abs difference <= ``parity_threshold``), and the device's boxes (:func:`device_decode`) from the ONNX
    outputs vs from torch's, the boxes the gate measured (boxes, scores, classes). ``images`` (n, c, h, w) uint8
    are the check batch; ``truth`` (labelled images) measures int8's mAP against fp32's, without it int8 does
    not ship (the result's ``int8_agreement`` then holds int8's mAP@[.5:.95]).
    """
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.from_dict(meta["input"])
    shape = (spec.channels, spec.height, spec.width)
    detector = detector.cpu().float().eval()
    dense = DenseDetector(detector).eval()
    centre_on = calibration if calibration is not None and len(calibration) else images
    if len(centre_on):  # embeddings centred on the training images' mean (DenseDetector.center_embedding)
        dense.center_embedding(torch.from_numpy(normalize_images(centre_on, spec).astype(np.float32)))
    post = detector_spec(detector, operating_threshold=operating_threshold)
    fp32 = out_dir / "model.fp32.onnx"
    export_onnx(dense, fp32, input_shape=shape, outputs=OUTPUTS)
    x = normalize_images(images, spec).astype(np.float32) if len(images) else \
        np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32)
    diff = parity_check(dense, fp32, x, threshold=parity_threshold, outputs=OUTPUTS)
    with torch.inference_mode():
        boxes, scores, _ = dense(torch.from_numpy(x))
    mismatch = compare_dense(_run_onnx(fp32, x), (boxes.numpy(), scores.numpy()), post,
                             atol=max(DECODE_ATOL, parity_threshold))
    if mismatch:
        raise ParityError(f"the device's boxes from {fp32.name} are not the boxes torch's outputs decode to "
                          f"({mismatch}); nothing is published")
    log.info("parity: max abs difference %.2e on %d images; the device decodes the same boxes", diff, len(x))
    shipped, int8_map, note = fp32, None, None
    if int8:
        shipped, int8_map, note = _try_int8(fp32, out_dir, spec, post, truth, calibration, images,
                                            num_classes=len(meta["class_names"]))
        log.info(note)
    final = out_dir / "model.onnx"
    shutil.copyfile(shipped, final)
    data = final.read_bytes()
    manifest = ModelManifest(
        version=version, parent_version=parent_version, onnx_sha256=hashlib.sha256(data).hexdigest(),
        onnx_size=len(data), input=spec, class_names=list(meta["class_names"]),
        embedding_dim=int(meta["embedding_dim"]), task="detect", outputs=list(OUTPUTS), detector=post,
        data_snapshot=data_snapshot, metrics={k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)},
        created_at=time.time(),
    )
    path = write_manifest(manifest, out_dir, key)
    return ExportResult(
        onnx_path=final, shipped="int8" if shipped != fp32 else "fp32", sha256=manifest.onnx_sha256,
        size=manifest.onnx_size, parity_max_abs_diff=diff, parity_threshold=parity_threshold,
        int8_agreement=int8_map, int8_note=note, manifest_path=path, signed=key is not None, manifest=manifest,
        seconds=time.perf_counter() - t0,
    )


def embedding_dim(detector: Detector) -> int:
    """The width of the dense layout's ``embedding`` for this detector."""
    feats = features(detector, torch.zeros(1, channels(detector), *detector.image_size))
    return int(sum(f.shape[1] for f in feats))


def _run_onnx(onnx_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's dense ``boxes`` and ``scores`` for ``x``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    boxes, scores, _ = sess.run(OUTPUTS, {"input": x.astype(np.float32)})
    return boxes, scores


def _try_int8(fp32: Path, out_dir: Path, spec: InputSpec, post: DetectorSpec, truth: BoxSet | None,
              calibration: np.ndarray | None, images: np.ndarray, *,
              num_classes: int) -> tuple[Path, float | None, str]:
    """Quantize; ship int8 only when its mAP on ``truth`` holds within INT8_MAX_MAP_DROP of fp32's."""
    if truth is None or not truth.n_boxes:
        return fp32, None, "int8 not shipped: no labelled images to measure its mAP on; shipping fp32"
    calib = normalize_images(calibration if calibration is not None and len(calibration) else images, spec)
    q = out_dir / "model.int8.onnx"
    quantize_int8(fp32, q, calib.astype(np.float32))
    x = normalize_images(truth.images.images, spec).astype(np.float32)
    maps = {}
    for name, path in (("fp32", fp32), ("int8", q)):
        decoded = device_decode(*_run_onnx(path, x), post)
        maps[name] = mean_average_precision(decoded, truth.boxes, truth.classes,
                                            num_classes=num_classes, image_size=truth.shape[1:])["map"]
    if maps["int8"] >= maps["fp32"] - INT8_MAX_MAP_DROP:
        return q, maps["int8"], (f"int8 shipped: mAP {maps['int8']:.4f} vs fp32 {maps['fp32']:.4f} "
                                 f"(allowed drop {INT8_MAX_MAP_DROP})")
    return fp32, maps["int8"], (f"int8 not shipped: mAP {maps['int8']:.4f} fell more than {INT8_MAX_MAP_DROP} "
                                f"below fp32's {maps['fp32']:.4f}; shipping fp32")
