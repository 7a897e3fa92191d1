"""Boxes for label consensus (:mod:`fleet.consensus` states the rule): one-to-one same-class matching by IoU,
box F1, and the annotators' boxes merged into consensus boxes. Pure functions; numpy in, numpy out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.errors import InvalidInput
from fleet.protocol.tasks import Box, Detection
from trigger.boxes import Boxes, match_boxes

__all__ = ["box_f1", "check_box_classes", "detection_f1", "match_same_class", "merge_boxes", "merge_detections"]


def match_same_class(a_boxes: Any, a_labels: Any, b_boxes: Any, b_labels: Any, *,
                     iou: float = 0.5) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Greedy one-to-one matching of boxes of the same class with IoU >= ``iou``, highest IoU first.

    a_boxes: (p, 4) xyxy, a_labels: (p,) int; b_boxes: (q, 4), b_labels: (q,). Returns ``(match_a (p,),
    match_b (q,))``: the index of the partner in the other set, or -1. Boxes of different classes never match.
    """
    a, la = _box_arrays(a_boxes, a_labels, "a")
    b, lb = _box_arrays(b_boxes, b_labels, "b")
    k = 1 + int(max(la.max(initial=0), lb.max(initial=0)))
    # one "frame" per class: trigger.boxes matches within a frame only, so only same-class pairs can match
    oa, ob = np.argsort(la, kind="stable"), np.argsort(lb, kind="stable")
    ma, mb = match_boxes(_per_class(a[oa], la[oa], k), _per_class(b[ob], lb[ob], k), iou=iou)
    match_a = np.full(len(la), -1, np.int64)
    match_b = np.full(len(lb), -1, np.int64)
    match_a[oa] = np.where(ma >= 0, ob[np.maximum(ma, 0)] if len(ob) else -1, -1)
    match_b[ob] = np.where(mb >= 0, oa[np.maximum(mb, 0)] if len(oa) else -1, -1)
    return match_a, match_b


def box_f1(pred_boxes: Any, pred_labels: Any, true_boxes: Any, true_labels: Any, *, iou: float = 0.5) -> float:
    """Box F1 of ``pred`` against ``true``: 2 * matched / (p + q) under :func:`match_same_class`; 1.0 when both
    are empty. pred_boxes: (p, 4), pred_labels: (p,); true_boxes: (q, 4), true_labels: (q,)."""
    match_a, match_b = match_same_class(pred_boxes, pred_labels, true_boxes, true_labels, iou=iou)
    total = len(match_a) + len(match_b)
    return 1.0 if total == 0 else 2.0 * float((match_a >= 0).sum()) / total


def merge_boxes(boxes: Sequence[Any], labels: Sequence[Any], *,
                iou: float = 0.5) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """The boxes a strict majority of annotators drew, each the mean of its matched boxes.

    boxes[i]: (k_i, 4) xyxy and labels[i]: (k_i,) int are annotator i's answer (m annotators, in order).
    Returns ``(boxes (c, 4), labels (c,), support (c,))``: the kept clusters' mean corners, their class, and how
    many annotators drew each (always > m / 2). See the module docstring for the rule.
    """
    if len(boxes) != len(labels):
        raise InvalidInput(f"merge_boxes needs one labels array per boxes array; received {len(boxes)} boxes arrays "
                           f"and {len(labels)} labels arrays")
    m = len(boxes)
    sums: NDArray[np.float64] = np.zeros((0, 4))
    counts: NDArray[np.int64] = np.zeros(0, np.int64)
    cls: NDArray[np.int64] = np.zeros(0, np.int64)
    for i, (bx, lb) in enumerate(zip(boxes, labels, strict=True)):
        b, la = _box_arrays(bx, lb, f"annotator {i}")
        centres = sums / np.maximum(counts, 1)[:, None]
        match, _ = match_same_class(b, la, centres, cls, iou=iou)
        hit = match >= 0
        np.add.at(sums, match[hit], b[hit])
        np.add.at(counts, match[hit], 1)
        sums = np.concatenate([sums, b[~hit]])
        counts = np.concatenate([counts, np.ones(int((~hit).sum()), np.int64)])
        cls = np.concatenate([cls, la[~hit]])
    keep = 2 * counts > m
    return sums[keep] / counts[keep][:, None], cls[keep], counts[keep]


def detection_f1(pred: Detection, truth: Detection, *, iou: float = 0.5) -> float:
    """:func:`box_f1` of two :class:`Detection` answers."""
    return box_f1(*_arrays(pred), *_arrays(truth), iou=iou)


def merge_detections(answers: Sequence[Detection], *, iou: float = 0.5) -> tuple[Detection, float]:
    """The consensus of several annotators' boxes (:func:`merge_boxes`) and the agreement: the mean box F1 of
    the answers against it (nan without answers)."""
    if not answers:
        return Detection([]), float("nan")
    merged, cls, _ = merge_boxes([_arrays(d)[0] for d in answers], [_arrays(d)[1] for d in answers], iou=iou)
    corners = np.clip(merged, 0.0, 1.0).tolist()
    consensus = Detection([Box(x1, y1, x2, y2, int(c)) for (x1, y1, x2, y2), c in zip(corners, cls, strict=True)])
    agreement = float(np.mean([detection_f1(d, consensus, iou=iou) for d in answers]))
    return consensus, agreement


def check_box_classes(d: Detection, n_classes: int, what: str) -> None:
    bad = [b.label for b in d.boxes if not 0 <= b.label < n_classes]
    if bad:
        raise InvalidInput(f"{what} has box class {bad[0]}; expected 0..{n_classes - 1}")


def _arrays(d: Detection) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """A :class:`Detection`'s corners (q, 4) and classes (q,)."""
    if not isinstance(d, Detection):
        raise InvalidInput(f"expected a Detection (boxes); received {type(d).__name__} {d!r:.60}")
    boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in d.boxes], np.float64).reshape(-1, 4)
    return boxes, np.array([b.label for b in d.boxes], np.int64)


def _box_arrays(boxes: Any, labels: Any, what: str) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Checked ``(q, 4)`` finite corners with x1 <= x2, y1 <= y2, and ``(q,)`` class indices >= 0."""
    b = np.asarray(boxes, np.float64)
    if b.size == 0:
        b = b.reshape(0, 4)
    lab = np.asarray(labels)
    if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
        raise InvalidInput(f"{what}: boxes must be a finite (q, 4) array of x1, y1, x2, y2; received shape {b.shape}")
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise InvalidInput(f"{what}: boxes must have x1 <= x2 and y1 <= y2; received {b.tolist()!r:.120}")
    if lab.shape != (b.shape[0],) or (lab.size and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0)):
        raise InvalidInput(f"{what}: labels must be {b.shape[0]} class indices >= 0 (one per box); received "
                           f"shape {lab.shape} dtype {lab.dtype}")
    return b, lab.astype(np.int64)


def _per_class(boxes: NDArray[np.float64], labels: NDArray[np.int64], k: int) -> Boxes:
    """Boxes sorted by class as a :class:`trigger.boxes.Boxes` with one frame per class (k frames)."""
    offsets = np.zeros(k + 1, np.int64)
    np.cumsum(np.bincount(labels, minlength=k), out=offsets[1:])
    return Boxes(boxes, np.ones(len(labels)), labels, offsets)
