"""A detector as the fleet's dense layout, and the device's decoding of it: what the gate measures is what ships.

:class:`DenseDetector` is the backbone, the head and the decoding of every anchor's box, with no NMS
(:data:`fleet.protocol.model.OUTPUTS` ``["detect"]``):

* ``boxes (n, A, 4)``: each anchor's box, normalised x1, y1, x2, y2 clipped to [0, 1]. FCOS: the anchor's
  centre minus/plus its ltrb regression times the anchor's size (torchvision's ``BoxLinearCoder``); SSDlite: the
  anchor moved by its (dx, dy, dw, dh) regression (``BoxCoder``, weights 10, 10, 5, 5);
* ``scores (n, A, k)``: each anchor's score per class. FCOS: ``sqrt(sigmoid(cls_logits) * sigmoid(centerness))``,
  the formula of torchvision's ``FCOS.postprocess_detections``; SSDlite: ``softmax(cls_logits)`` without the
  background column;
* ``embedding (n, d)``: the global average of every feature map the head sees, concatenated.

:func:`device_decode` turns them into boxes exactly as the device does: :func:`trigger.nms.decode_dense` (each
anchor once, with its best class and its whole class distribution; threshold, top-k over the frame, NMS within
each class, a cap) with the manifest's :class:`fleet.protocol.DetectorSpec`. torchvision's own post-processing
differs in two places: it keeps every (anchor, class) pair above the threshold (an anchor may give boxes of
several classes) and takes its top-k per pyramid level (FCOS) or per class (SSD). The trainer's mAP gate and
reports decode with the device's rule (:func:`training.detect.evaluate.predict`), so the number that lets a
model ship is the number of the boxes the fleet will see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fleet.errors import InvalidInput
from fleet.protocol import DetectorSpec
from training.detect.models import DENSE_MODELS, Detector


@dataclass
class Detections:
    """Per image: ``boxes[i]`` (m_i, 4) normalised xyxy, ``scores[i]`` (m_i,), ``classes[i]`` (m_i,) int64."""

    boxes: list[np.ndarray]
    scores: list[np.ndarray]
    classes: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.boxes)


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
        device = next(detector.parameters()).device
        dummy = torch.zeros(1, channels(detector), h, w, device=device)
        anchors = detector.net.anchor_generator(ImageList(dummy, [(h, w)]), features(detector, dummy))[0]
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("scale", torch.tensor([w, h, w, h], dtype=torch.float32, device=device),
                             persistent=False)
        self.image_size = (h, w)
        with torch.no_grad():
            width = sum(int(f.shape[1]) for f in features(detector, dummy))
        self.register_buffer("embedding_center", torch.zeros(width, device=device), persistent=False)

    @torch.no_grad()
    def center_embedding(self, x: torch.Tensor, *, batch: int = 64) -> None:
        """Subtract, from every embedding this module outputs, the mean embedding of the normalised images ``x``
        (the training images). Pooled feature maps share a large common part (the background's response), so
        uncentred, any two scenes lie within a few thousandths of cosine distance and the hub's dedup and
        diversity see every scene as a near-duplicate; centred, cosine distance tells scenes apart."""
        parts = [torch.cat([f.mean(dim=(2, 3)) for f in self.detector.backbone_features(x[i:i + batch])], dim=1)
                 for i in range(0, len(x), batch)]
        self.embedding_center.copy_(torch.cat(parts).mean(dim=0))

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from torchvision.ops import boxes as box_ops

        net = self.detector.net
        feats = self.detector.backbone_features(x)
        embedding = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1) - self.embedding_center
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
    """The manifest's post-processing settings: the model's own, and the operating point (F1-best) if known.
    ``pre_nms_top_k`` is torchvision's per-group top-k times its groups, so the device's top-k over the whole
    frame never cuts a box torchvision's would keep."""
    post = detector.post
    op = 0.5 if operating_threshold is None else operating_threshold
    return DetectorSpec(score_threshold=post.score_thresh, nms_iou=post.nms_thresh,
                        pre_nms_top_k=min(100_000, post.topk_candidates * detector.topk_groups),
                        max_detections=post.detections_per_img,
                        operating_threshold=round(float(min(1.0, max(post.score_thresh, op))), 6))


def device_decode(boxes: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor,
                  spec: DetectorSpec) -> Detections:
    """The device's boxes for dense outputs ``boxes (n, A, 4)``, ``scores (n, A, k)``: per image, boxes
    normalised, scores and classes, best first (:func:`trigger.nms.decode_dense` with ``spec``)."""
    from trigger.nms import decode_dense

    def host(a: np.ndarray | torch.Tensor) -> np.ndarray:
        return (a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.float32)

    kept = decode_dense(host(boxes), host(scores), score_threshold=spec.score_threshold,
                        pre_nms_top_k=spec.pre_nms_top_k, nms_iou=spec.nms_iou, max_detections=spec.max_detections)
    off = np.asarray(kept.offsets)
    b, s, c = np.asarray(kept.boxes, np.float32), np.asarray(kept.scores, np.float32), np.asarray(kept.labels)
    rows = [slice(int(off[i]), int(off[i + 1])) for i in range(len(off) - 1)]
    return Detections([b[r] for r in rows], [s[r] for r in rows], [c[r].astype(np.int64) for r in rows])


def channels(detector: Detector) -> int:
    """The detector's input channels."""
    return int(next(detector.net.backbone.parameters()).shape[1])


@torch.no_grad()
def features(detector: Detector, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps for ``x`` in eval mode (batch norm on running statistics), the mode left as it was."""
    was_training = detector.training
    detector.eval()
    try:
        return detector.backbone_features(x.to(next(detector.parameters()).device))
    finally:
        detector.train(was_training)
