"""Export a detector to the fleet's dense layout, prove the device's decoding matches torchvision, sign it.

The ONNX graph (:class:`DenseDetector`) is the backbone, the head and the decoding of every anchor's box, with
no NMS (:data:`fleet.protocol.model.OUTPUTS` ``["detect"]``):

* ``boxes (n, A, 4)``: each anchor's box, normalised x1, y1, x2, y2 clipped to [0, 1]. FCOS: the anchor's
  centre minus/plus its ltrb regression times the anchor's size (torchvision's ``BoxLinearCoder``); SSDlite: the
  anchor moved by its (dx, dy, dw, dh) regression (``BoxCoder``, weights 10, 10, 5, 5);
* ``scores (n, A, k)``: each anchor's score per class. FCOS: ``sqrt(sigmoid(cls_logits) * sigmoid(centerness))``,
  the formula of torchvision's ``FCOS.postprocess_detections``; SSDlite: ``softmax(cls_logits)`` without the
  background column;
* ``embedding (n, d)``: the global average of every feature map the head sees, concatenated.

The device (and :func:`decode_dense` here) turns them into boxes with the manifest's
:class:`fleet.protocol.DetectorSpec`: keep every (anchor, class) pair whose score is strictly above
``score_threshold`` (an anchor may give boxes of several classes), the ``pre_nms_top_k`` best pairs, then NMS
within each class (a box goes when its IoU with a better box of its class exceeds ``nms_iou``) and the
``max_detections`` best, by score. This is
torchvision's post-processing exactly, with one difference in where top-k applies: torchvision takes the top
``topk_candidates`` per pyramid level (FCOS) or per class (SSD), the device over all pairs; the two agree
whenever no level or class has more candidates above the threshold than that (always, when
``pre_nms_top_k >= A * k``). :func:`export_detector` checks this agreement on real images and refuses to
write a manifest when it fails. Faster R-CNN proposes regions through NMS inside the network, so it has no
dense layout and does not export.
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
from torch import nn

from fleet.errors import InvalidInput
from fleet.protocol import DetectorSpec, InputSpec, ModelManifest
from fleet.protocol.model import OUTPUTS as LAYOUTS
from training.detect.evaluate import Detections, mean_average_precision
from training.detect.models import DENSE_MODELS, Detector
from training.errors import ParityError
from training.export import ExportResult, export_onnx, normalize_images, parity_check, quantize_int8, write_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from training.detect.data import BoxSet

log = logging.getLogger(__name__)

OUTPUTS = LAYOUTS["detect"]
INT8_MAX_MAP_DROP = 0.01  # int8 ships only if its mAP@[.5:.95] is within this of the fp32 model's
DECODE_ATOL = 1e-4  # boxes (normalised) and scores of the device's decoding vs torchvision's post-processing


class DenseDetector(nn.Module):
    """A trained :class:`Detector` as the dense layout: ``x (n, c, h, w)`` -> ``boxes, scores, embedding``."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        if detector.name not in DENSE_MODELS:
            raise InvalidInput(f"{detector.name} has no dense layout (its region proposals need NMS inside the "
                               f"network); models that export: {list(DENSE_MODELS)}")
        from torchvision.models.detection.image_list import ImageList

        self.detector = detector
        self.kind = "fcos" if detector.name.startswith("fcos") else "ssd"
        h, w = detector.image_size
        dummy = torch.zeros(1, _channels(detector), h, w)
        anchors = detector.net.anchor_generator(ImageList(dummy, [(h, w)]), _features(detector, dummy))[0]
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("scale", torch.tensor([w, h, w, h], dtype=torch.float32), persistent=False)
        self.image_size = (h, w)

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from torchvision.ops import boxes as box_ops

        net = self.detector.net
        feats = self.detector.backbone_features(x)
        embedding = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)
        out = net.head(feats)
        reg = out["bbox_regression"]
        if self.kind == "fcos":
            boxes = net.box_coder.decode(reg, self.anchors.unsqueeze(0))
            scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        else:
            n, a = reg.shape[0], reg.shape[1]
            anchors = self.anchors.unsqueeze(0).expand(n, a, 4).reshape(-1, 4)
            boxes = net.box_coder.decode_single(reg.reshape(-1, 4), anchors).reshape(n, a, 4)
            scores = torch.softmax(out["cls_logits"], dim=-1)[..., 1:]
        boxes = box_ops.clip_boxes_to_image(boxes, self.image_size) / self.scale
        return boxes, scores, embedding


def detector_spec(detector: Detector, *, operating_threshold: float | None = None) -> DetectorSpec:
    """The manifest's post-processing settings: the model's own, and the operating point (F1-best) if known."""
    post = detector.post
    op = 0.5 if operating_threshold is None else operating_threshold
    return DetectorSpec(score_threshold=post.score_thresh, nms_iou=post.nms_thresh,
                        pre_nms_top_k=min(100_000, post.topk_candidates * detector.topk_groups),
                        max_detections=post.detections_per_img,
                        operating_threshold=round(float(min(1.0, max(post.score_thresh, op))), 6))


def decode_dense(boxes: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor,
                 spec: DetectorSpec) -> Detections:
    """The device's decoding of dense outputs ``boxes (n, A, 4)``, ``scores (n, A, k)`` (see the module doc),
    with torchvision's NMS: per image, boxes normalised, scores, classes."""
    from torchvision.ops import batched_nms

    b_all, s_all = torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32)
    out = Detections([], [], [])
    k = s_all.shape[2]
    for b, s in zip(b_all, s_all, strict=True):
        flat = s.flatten()
        idx = torch.nonzero(flat > spec.score_threshold).flatten()
        top = flat[idx].topk(min(spec.pre_nms_top_k, len(idx)))
        idx = idx[top.indices]
        anchor, cls = idx // k, idx % k
        keep = batched_nms(b[anchor], top.values, cls, spec.nms_iou)[: spec.max_detections]
        out.boxes.append(b[anchor[keep]].numpy())
        out.scores.append(top.values[keep].numpy())
        out.classes.append(cls[keep].numpy().astype(np.int64))
    return out


def compare_detections(a: Detections, b: Detections, *, atol: float = DECODE_ATOL) -> str | None:
    """None when both hold the same detections, else what differs.

    Per image: the same count, the same scores in order (to ``atol``), and for every detection whose score no
    other detection of the image shares (to ``atol``) the same class and box (to ``atol``). Among detections
    of equal score, which one NMS keeps depends on the order of the tie, which neither side defines, so a tie
    is checked by its scores only (ties need a model that is not trained, or identical image regions).
    """
    if len(a) != len(b):
        return f"{len(a)} images vs {len(b)}"
    for i in range(len(a)):
        sa, sb = a.scores[i], b.scores[i]
        if len(sa) != len(sb):
            return f"image {i}: {len(sa)} detections vs {len(sb)}"
        if len(sa) and float(np.max(np.abs(sa - sb))) > atol:
            return f"image {i}: scores differ by up to {float(np.max(np.abs(sa - sb))):.3g}"
        gaps = np.abs(sa[:, None] - sa[None, :]) <= atol
        unique = gaps.sum(axis=1) == 1
        if not np.array_equal(a.classes[i][unique], b.classes[i][unique]):
            return f"image {i}: classes {a.classes[i][unique].tolist()} vs {b.classes[i][unique].tolist()}"
        if unique.any():
            gap = float(np.max(np.abs(a.boxes[i][unique] - b.boxes[i][unique])))
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
    (max abs difference <= ``parity_threshold``), and :func:`decode_dense` of the ONNX outputs vs torchvision's
    post-processing of the same images (boxes, scores, classes). ``images`` (n, c, h, w) uint8 are the check
    batch; ``truth`` (labelled images) measures int8's mAP against fp32's, without it int8 does not ship (the
    result's ``int8_agreement`` then holds int8's mAP@[.5:.95]).
    """
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.from_dict(meta["input"])
    shape = (spec.channels, spec.height, spec.width)
    detector = detector.cpu().float().eval()
    dense = DenseDetector(detector).eval()
    post = detector_spec(detector, operating_threshold=operating_threshold)
    fp32 = out_dir / "model.fp32.onnx"
    export_onnx(dense, fp32, input_shape=shape, outputs=OUTPUTS)
    x = normalize_images(images, spec).astype(np.float32) if len(images) else \
        np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32)
    diff = parity_check(dense, fp32, x, threshold=parity_threshold, outputs=OUTPUTS)
    decoded = _run_decoded(fp32, x, post)
    with torch.inference_mode():
        reference = _torchvision_detections(detector, torch.from_numpy(x))
    mismatch = compare_detections(decoded, reference, atol=max(DECODE_ATOL, parity_threshold))
    if mismatch:
        raise ParityError(f"the device's decoding of {fp32.name} does not reproduce torchvision's post-processing "
                          f"({mismatch}); nothing is published")
    log.info("parity: max abs difference %.2e on %d images; decoded detections match torchvision's", diff, len(x))
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
    feats = _features(detector, torch.zeros(1, _channels(detector), *detector.image_size))
    return int(sum(f.shape[1] for f in feats))


def _channels(detector: Detector) -> int:
    return int(next(detector.net.backbone.parameters()).shape[1])


@torch.no_grad()
def _features(detector: Detector, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps for ``x`` in eval mode (batch norm on running statistics), the mode left as it was."""
    was_training = detector.training
    detector.eval()
    try:
        return detector.backbone_features(x.to(next(detector.parameters()).device))
    finally:
        detector.train(was_training)


def _torchvision_detections(detector: Detector, x: torch.Tensor) -> Detections:
    h, w = detector.image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    dets = detector.eval()(x)
    return Detections([(d["boxes"] / scale).numpy() for d in dets], [d["scores"].numpy() for d in dets],
                      [d["labels"].numpy().astype(np.int64) for d in dets])


def _run_decoded(onnx_path: Path, x: np.ndarray, spec: DetectorSpec) -> Detections:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    boxes, scores, _ = sess.run(OUTPUTS, {"input": x.astype(np.float32)})
    return decode_dense(boxes, scores, spec)


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
