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
from training.detect.dense import DenseDetector, Detections, channels, detector_spec, device_decode, features
from training.detect.evaluate import mean_average_precision
from training.detect.models import Detector
from training.errors import ParityError
from training.export import ExportResult, export_onnx, normalize_images, parity_check, quantize_int8, write_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from training.detect.data import BoxSet

log = logging.getLogger(__name__)

OUTPUTS = LAYOUTS["detect"]
INT8_MAX_MAP_DROP = 0.01  # int8 ships only if its mAP@[.5:.95] is within this of the fp32 model's
DECODE_ATOL = 1e-4  # boxes (normalised) and scores the device decodes from ONNX vs from torch


def compare_detections(a: Detections, b: Detections, *, atol: float = DECODE_ATOL,
                       score_threshold: float | None = None) -> str | None:
    """None when both hold the same detections, else what differs.

    Per image: the same count, the same scores in order (to ``atol``), and for every detection whose score no
    other detection of the image shares (to ``atol``) the same class and box (to ``atol``). Among detections
    of equal score, which one NMS keeps depends on the order of the tie, which neither side defines, so a tie
    is checked by its scores only (ties need a model that is not trained, or identical image regions).
    ``score_threshold``: the decoder's; a detection scoring within ``atol`` of it is kept by one side and dropped
    by the other on rounding alone, so detections under ``score_threshold + atol`` are left out on both sides.
    """
    if len(a) != len(b):
        return f"{len(a)} images vs {len(b)}"
    for i in range(len(a)):
        sa, sb = a.scores[i], b.scores[i]
        if score_threshold is not None:  # scores are best first: keep each side's prefix clear of the threshold
            sa, sb = sa[sa >= score_threshold + atol], sb[sb >= score_threshold + atol]
        if len(sa) != len(sb):
            return f"image {i}: {len(sa)} detections vs {len(sb)}"
        if len(sa) and float(np.max(np.abs(sa - sb))) > atol:
            return f"image {i}: scores differ by up to {float(np.max(np.abs(sa - sb))):.3g}"
        gaps = np.abs(sa[:, None] - sa[None, :]) <= atol
        unique = gaps.sum(axis=1) == 1
        n = len(sa)
        ca, cb = a.classes[i][:n][unique], b.classes[i][:n][unique]
        if not np.array_equal(ca, cb):
            return f"image {i}: classes {ca.tolist()} vs {cb.tolist()}"
        if unique.any():
            gap = float(np.max(np.abs(a.boxes[i][:n][unique] - b.boxes[i][:n][unique])))
            if gap > atol:
                return f"image {i}: boxes differ by up to {gap:.3g}"
    return None


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
    decoded = _run_decoded(fp32, x, post)
    with torch.inference_mode():
        boxes, scores, _ = dense(torch.from_numpy(x))
    reference = device_decode(boxes, scores, post)
    mismatch = compare_detections(decoded, reference, atol=max(DECODE_ATOL, parity_threshold),
                                  score_threshold=post.score_threshold)
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


def _run_decoded(onnx_path: Path, x: np.ndarray, spec: DetectorSpec) -> Detections:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    boxes, scores, _ = sess.run(OUTPUTS, {"input": x.astype(np.float32)})
    return device_decode(boxes, scores, spec)


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
        maps[name] = mean_average_precision(_run_decoded(path, x, post), truth.boxes, truth.classes,
                                            num_classes=num_classes, image_size=truth.shape[1:])["map"]
    if maps["int8"] >= maps["fp32"] - INT8_MAX_MAP_DROP:
        return q, maps["int8"], (f"int8 shipped: mAP {maps['int8']:.4f} vs fp32 {maps['fp32']:.4f} "
                                 f"(allowed drop {INT8_MAX_MAP_DROP})")
    return fp32, maps["int8"], (f"int8 not shipped: mAP {maps['int8']:.4f} fell more than {INT8_MAX_MAP_DROP} "
                                f"below fp32's {maps['fp32']:.4f}; shipping fp32")
