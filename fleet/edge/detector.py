"""Detector outputs on the device: dense per-anchor outputs decoded into the boxes kept on each frame.

A ``task: detect`` model outputs, per frame, every anchor's decoded box and per-class scores plus the image
embedding (``fleet.protocol.model.OUTPUTS["detect"]``). The device thresholds, top-k's and class-wise NMS's
them in numpy as the manifest's :class:`~fleet.protocol.DetectorSpec` says, so each kept box keeps its whole
class distribution for the triggers. What comes out is a :class:`Detections`: ragged arrays over a batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.protocol import Box, Detection, DetectorSpec

AGREE_IOU = 0.5  # two boxes are the same object at this IoU or more (the heartbeat's challenger agreement)


@dataclass(frozen=True)
class Detections:
    """The boxes a detector kept on ``n`` frames, as ragged arrays: frame ``f`` owns rows
    ``offsets[f]:offsets[f + 1]``, best score first.

    ``boxes: (m, 4)`` normalised x1, y1, x2, y2 (``0 <= x1 < x2 <= 1``, the same for y); ``scores: (m,)`` in
    [0, 1], the box's score for its class; ``labels: (m,)`` int64; ``offsets: (n + 1,)`` int64;
    ``probs: (m, k)``, the box's per-class scores normalised to sum to 1; ``known: (n,)`` bool, False for a
    frame whose model outputs held NaN or inf (it has no boxes, and is neither compared nor passed on).

    The fields, their order and meaning are those of ``trigger.boxes.Boxes`` (branch issue-15-triggers), which
    replaces this class when that branch lands.
    """

    boxes: NDArray[Any]
    scores: NDArray[Any]
    labels: NDArray[Any]
    offsets: NDArray[Any]
    probs: NDArray[Any]
    known: NDArray[Any]

    def __len__(self) -> int:
        return self.n

    @property
    def n(self) -> int:
        """Frames."""
        return len(self.offsets) - 1

    @property
    def counts(self) -> NDArray[Any]:
        """(n,) boxes per frame."""
        return np.diff(self.offsets)

    @property
    def known_mask(self) -> NDArray[Any]:
        """(n,) True where the frame's box set is known (possibly empty)."""
        return self.known

    def rows(self, f: int) -> slice:
        """Frame ``f``'s rows in ``boxes``, ``scores``, ``labels`` and ``probs``."""
        return slice(int(self.offsets[f]), int(self.offsets[f + 1]))

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        """The frames of ``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
        return cls(np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.labels for p in parts]), offsets.astype(np.int64),
                   np.concatenate([p.probs for p in parts]), np.concatenate([p.known_mask for p in parts]))


def best_labels(d: Detections) -> NDArray[Any]:
    """(n,) the class of each frame's best box; -1 where it has none (or its box set is unknown)."""
    out = np.full(d.n, -1, np.int64)
    has = d.counts > 0
    out[has] = d.labels[d.offsets[:-1][has]]
    return out


def to_detection(d: Detections, f: int) -> Detection:
    """Frame ``f`` as the wire's :class:`~fleet.protocol.Detection`, each box with its class distribution."""
    r = d.rows(f)
    return Detection([
        Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), int(lab), float(s), [float(p) for p in pr])
        for b, s, lab, pr in zip(d.boxes[r], d.scores[r], d.labels[r], d.probs[r], strict=True)
    ])


def decode(boxes: NDArray[Any], scores: NDArray[Any], spec: DetectorSpec) -> Detections:
    """A detector's dense outputs as kept boxes per frame, per its manifest's ``spec``.

    ``boxes: (n, A, 4)`` every anchor's normalised x1, y1, x2, y2; ``scores: (n, A, k)`` in [0, 1]. A frame whose
    outputs hold NaN or inf, or scores outside [0, 1], is a model fault: it gets no boxes and is marked unknown
    (``known`` False).
    """
    known = _sound_frames(boxes, scores)
    if not known.all():
        scores = np.where(known[:, None, None], scores, 0.0)
        boxes = np.where(known[:, None, None], boxes, 0.0)
    d = _decode_dense(boxes, scores, score_threshold=spec.score_threshold, pre_nms_top_k=spec.pre_nms_top_k,
                      nms_iou=spec.nms_iou, max_detections=spec.max_detections)
    return dataclasses.replace(d, known=known)


def box_sets_agree(a: Detections, b: Detections, *, a_threshold: float, b_threshold: float,
                   iou: float = AGREE_IOU) -> NDArray[Any]:
    """(n,) int8 per frame: 1 where the boxes ``a`` and ``b`` found at their operating thresholds are the same
    objects (every box matched one to one at IoU >= ``iou``, with the same class), 0 where they are not, -1
    where either box set is unknown. ``a`` and ``b`` cover the same ``n`` frames."""
    if a.n != b.n:
        raise ValueError(f"box sets cover {a.n} and {b.n} frames; expected the same frames")
    out = np.where(a.known_mask & b.known_mask, 1, -1).astype(np.int8)
    a_on, b_on = a.scores >= a_threshold, b.scores >= b_threshold
    na = np.bincount(np.repeat(np.arange(a.n), a.counts)[a_on], minlength=a.n)  # (n,) boxes found
    nb = np.bincount(np.repeat(np.arange(b.n), b.counts)[b_on], minlength=b.n)
    out[(out == 1) & (na != nb)] = 0
    for i in np.flatnonzero((out == 1) & (na > 0)).tolist():
        ra, rb = a.rows(i), b.rows(i)
        ka, kb = a_on[ra], b_on[rb]
        if not _matched(a.boxes[ra][ka], a.labels[ra][ka], b.boxes[rb][kb], b.labels[rb][kb], iou):
            out[i] = 0
    return out


# ---------------------------------------------------------------------------------------------
# TODO(issue-15-triggers): when that branch lands, use trigger.nms.decode_dense (same signature, returns
# trigger.boxes.Boxes, which replaces Detections) and trigger.boxes.match_boxes(..., classes=True) in
# box_sets_agree, and delete everything below.


def _decode_dense(boxes: NDArray[Any], scores: NDArray[Any], *, score_threshold: float, pre_nms_top_k: int,
                  nms_iou: float, max_detections: int) -> Detections:
    """Threshold, top-k and class-wise greedy NMS of dense detector outputs, per frame.

    ``boxes: (n, A, 4)``, ``scores: (n, A, k)``. Each anchor is one candidate: its best class and that class's
    score; anchors scoring under ``score_threshold`` are dropped, the ``pre_nms_top_k`` best kept, boxes are
    clipped to [0, 1] (empty ones dropped), same-class overlaps above ``nms_iou`` suppressed, and at most
    ``max_detections`` kept. Each box's ``probs`` are its anchor's scores over all classes, normalised (uniform
    if all are 0). Every frame is ``known``.
    """
    n, _, k = scores.shape
    labels = scores.argmax(axis=2)  # (n, A)
    best = np.take_along_axis(scores, labels[..., None], axis=2)[..., 0]  # (n, A)
    frame, anchor = np.nonzero(best >= score_threshold)
    bounds = np.searchsorted(frame, np.arange(n + 1))
    kept_frame: list[NDArray[Any]] = []
    kept_anchor: list[NDArray[Any]] = []
    for i in np.flatnonzero(np.diff(bounds)).tolist():
        cand = anchor[bounds[i]:bounds[i + 1]]
        s = best[i, cand]
        if len(cand) > pre_nms_top_k:
            top = np.argpartition(-s, pre_nms_top_k - 1)[:pre_nms_top_k]
            cand, s = cand[top], s[top]
        order = np.argsort(-s, kind="stable")
        cand = cand[order]
        b = np.clip(boxes[i, cand].astype(np.float64), 0.0, 1.0)
        nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        cand, b = cand[nonempty], b[nonempty]
        keep = _nms(b, labels[i, cand], nms_iou, max_detections)
        kept_frame.append(np.full(len(keep), i, np.intp))
        kept_anchor.append(cand[keep])
    f = np.concatenate(kept_frame) if kept_frame else np.zeros(0, np.intp)
    a = np.concatenate(kept_anchor) if kept_anchor else np.zeros(0, np.intp)
    per_class = scores[f, a].astype(np.float32)  # (m, k)
    total = per_class.sum(axis=1, keepdims=True)
    probs = np.divide(per_class, total, out=np.full_like(per_class, 1.0 / k), where=total > 0)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(f, minlength=n), out=offsets[1:])
    return Detections(np.clip(boxes[f, a], 0.0, 1.0).astype(np.float32), best[f, a].astype(np.float32),
                      labels[f, a].astype(np.int64), offsets, probs, np.ones(n, bool))


def _sound_frames(boxes: NDArray[Any], scores: NDArray[Any]) -> NDArray[Any]:
    """(n,) bool: frames whose boxes are finite and scores in [0, 1] (a few reductions on the usual path)."""
    n = boxes.shape[0]
    if np.isfinite(boxes.sum()) and (not scores.size or (scores.min() >= 0.0 and scores.max() <= 1.0)):
        return np.ones(n, bool)  # NaN fails both comparisons
    return (np.isfinite(boxes.reshape(n, -1)).all(axis=1)  # type: ignore[no-any-return]
            & ((scores >= 0.0) & (scores <= 1.0)).reshape(n, -1).all(axis=1))


def _nms(boxes: NDArray[Any], labels: NDArray[Any], iou: float, limit: int) -> NDArray[Any]:
    """Greedy same-class NMS over ``boxes (m, 4)`` sorted best first; indices kept, at most ``limit``."""
    over = _iou_matrix(boxes, boxes) > iou
    over &= labels[:, None] == labels[None, :]
    alive = np.ones(len(boxes), bool)
    keep: list[int] = []
    for i in range(len(boxes)):
        if alive[i]:
            keep.append(i)
            if len(keep) == limit:
                break
            alive &= ~over[i]
    return np.array(keep, np.intp)


def _iou_matrix(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
    """IoU of every box of ``a (p, 4)`` with every box of ``b (q, 4)``: ``(p, q)``."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: NDArray[Any] = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def _matched(a: NDArray[Any], la: NDArray[Any], b: NDArray[Any], lb: NDArray[Any], iou: float) -> bool:
    """Whether greedy IoU matching (``a`` best first) pairs every box of ``a (m, 4)`` with one of ``b (m, 4)``
    of the same class at IoU >= ``iou``."""
    ious = np.where(la[:, None] == lb[None, :], _iou_matrix(a, b), -1.0)
    free = np.ones(len(b), bool)
    for row in ious:
        j = int(np.argmax(np.where(free, row, -1.0)))
        if not free[j] or row[j] < iou:
            return False
        free[j] = False
    return True
