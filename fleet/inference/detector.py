"""Detector outputs on the device: dense per-anchor outputs decoded into the boxes kept on each frame.

A ``task: detect`` model outputs, per frame, every anchor's decoded box and per-class scores plus the image
embedding (``fleet.protocol.model.OUTPUTS["detect"]``). The device thresholds, top-k's and class-wise NMS's
them in numpy as the manifest's :class:`~fleet.protocol.DetectorSpec` says (:func:`trigger.nms.decode_dense`),
so each kept box keeps its whole class distribution for the triggers. What comes out is a
:class:`trigger.boxes.Boxes` (``Detections`` here): ragged arrays over a batch, best box first in each frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.protocol import Box, Detection, DetectorSpec
from trigger.box_scores import box_disagreement
from trigger.boxes import Boxes
from trigger.nms import decode_dense

AGREE_IOU = 0.5  # two boxes are the same object at this IoU or more (the heartbeat's challenger agreement)

Detections = Boxes  # the name the edge has always used for a detector's boxes over a batch


def best_labels(d: Boxes) -> NDArray[Any]:
    """(n,) the class of each frame's best box; -1 where it has none (or its box set is unknown)."""
    out = np.full(d.n, -1, np.int64)
    has = d.counts > 0
    out[has] = d.labels[d.offsets[:-1][has]]
    return out


def to_detection(d: Boxes, f: int) -> Detection:
    """Frame ``f`` as the wire's :class:`~fleet.protocol.Detection`, each box with its class distribution."""
    r = d.rows(f)
    probs = d.probs[r] if d.probs is not None else [None] * (r.stop - r.start)
    return Detection([
        Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), int(lab), float(s),
            None if pr is None else [float(p) for p in pr])
        for b, s, lab, pr in zip(d.boxes[r], d.scores[r], d.labels[r], probs, strict=True)
    ])


def decode(boxes: NDArray[Any], scores: NDArray[Any], spec: DetectorSpec) -> Boxes:
    """A detector's dense outputs as kept boxes per frame, per its manifest's ``spec``.

    ``boxes: (n, A, 4)`` every anchor's normalised x1, y1, x2, y2; ``scores: (n, A, k)`` in [0, 1]. A frame whose
    outputs hold NaN or inf, or scores outside [0, 1], is a model fault: it gets no boxes and is marked unknown
    (``known_mask`` False) instead of failing the batch.
    """
    known = _sound_frames(boxes, scores)
    if not known.all():
        scores = np.where(known[:, None, None], scores, 0.0)
        boxes = np.where(known[:, None, None], boxes, 0.0)
    d = decode_dense(boxes, scores, score_threshold=spec.score_threshold, pre_nms_top_k=spec.pre_nms_top_k,
                     nms_iou=spec.nms_iou, max_detections=spec.max_detections)
    return d if known.all() else dataclasses.replace(d, known=known)


def above(d: Boxes, threshold: float) -> Boxes:
    """The boxes of ``d`` scoring at least ``threshold``, in the same frames (what a detector reports)."""
    keep = d.scores >= threshold
    if keep.all():
        return d
    offsets = np.zeros(d.n + 1, np.int64)
    np.cumsum(np.bincount(d.frame_index[keep], minlength=d.n), out=offsets[1:])
    return Boxes(d.boxes[keep], d.scores[keep], d.labels[keep], offsets,
                 None if d.probs is None else d.probs[keep], d.known)


def box_sets_agree(a: Boxes, b: Boxes, *, a_threshold: float, b_threshold: float,
                   iou: float = AGREE_IOU) -> NDArray[Any]:
    """(n,) int8 per frame: 1 where the boxes ``a`` and ``b`` found at their operating thresholds are the same
    objects (every box matched one to one at IoU >= ``iou`` with the same class: 1 - F1 is 0 in
    :func:`trigger.box_scores.box_disagreement`), 0 where they are not, -1 where either box set is unknown.
    ``a`` and ``b`` cover the same ``n`` frames."""
    if a.n != b.n:
        raise ValueError(f"box sets cover {a.n} and {b.n} frames; expected the same frames")
    differ = box_disagreement(above(a, a_threshold), above(b, b_threshold), iou=iou).score  # NaN: unknown
    return np.where(np.isnan(differ), -1, differ == 0).astype(np.int8)


def _sound_frames(boxes: NDArray[Any], scores: NDArray[Any]) -> NDArray[Any]:
    """(n,) bool: frames whose boxes are finite and scores in [0, 1] (a few reductions on the usual path)."""
    n = boxes.shape[0]
    if np.isfinite(boxes.sum()) and (not scores.size or (scores.min() >= 0.0 and scores.max() <= 1.0)):
        return np.ones(n, bool)  # NaN fails both comparisons
    return (np.isfinite(boxes.reshape(n, -1)).all(axis=1)  # type: ignore[no-any-return]
            & ((scores >= 0.0) & (scores <= 1.0)).reshape(n, -1).all(axis=1))
