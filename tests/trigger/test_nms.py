"""Dense detector outputs to boxes: hand-worked decoding, agreement with torchvision's NMS, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trigger import batched_nms, box_iou, decode_dense


def _dense(rng: np.random.Generator, n: int, a: int, k: int, objects: int = 4,
           spread: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Dense outputs that look like a detector's: clusters of anchors around a few objects, low scores elsewhere."""
    centres = rng.random((n, a, 2)) * 0.8 + 0.1
    sizes = rng.random((n, a, 2)) * 0.2 + 0.02
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1)
    scores = rng.random((n, a, k)) ** 8 * 0.3  # background: mostly near 0
    for f in range(n):
        for _ in range(objects):
            near = rng.choice(a, 12, replace=False)
            boxes[f, near] = boxes[f, near[0]] + rng.normal(0, spread, (12, 4))
            scores[f, near, rng.integers(k)] = rng.uniform(0.3, 1.0, 12)
    return boxes.astype(np.float32), scores.astype(np.float32)


def test_decode_hand_worked() -> None:
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5],     # class 0, 0.9: kept
                       [0.0, 0.0, 0.5, 0.45],    # class 0, 0.8: IoU 0.9 with the first, suppressed
                       [0.0, 0.0, 0.5, 0.5],     # class 1, 0.7: same place, other class: kept
                       [0.6, 0.6, 1.2, 0.9],     # class 0, 0.6: clipped to x2 = y2... kept as (0.6, 0.6, 1, 0.9)
                       [0.2, 0.2, 0.3, 0.3],     # 0.04: under the score threshold
                       [1.1, 0.1, 1.3, 0.2]]],   # 0.5 but outside the image: no area once clipped
                     np.float32)
    scores = np.array([[[0.9, 0.1], [0.8, 0.0], [0.2, 0.7], [0.6, 0.2], [0.04, 0.01], [0.5, 0.0]]], np.float32)
    d = decode_dense(boxes, scores, score_threshold=0.05, nms_iou=0.5)
    assert d.counts.tolist() == [3]
    np.testing.assert_allclose(d.scores, [0.9, 0.7, 0.6], rtol=1e-6)
    assert d.labels.tolist() == [0, 1, 0]
    np.testing.assert_allclose(d.boxes, [[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0.6, 0.6, 1.0, 0.9]], rtol=1e-6)
    assert d.probs is not None
    np.testing.assert_allclose(d.probs, [[0.9, 0.1], [0.2 / 0.9, 0.7 / 0.9], [0.75, 0.25]], rtol=1e-6)
    capped = decode_dense(boxes, scores, max_detections=2)
    np.testing.assert_allclose(capped.scores, [0.9, 0.7], rtol=1e-6)
    top2 = decode_dense(boxes, scores, pre_nms_top_k=2)  # the two best anchors only: one suppresses the other
    np.testing.assert_allclose(top2.scores, [0.9], rtol=1e-6)


def test_ties_at_the_top_k_cut_keep_the_first_anchors() -> None:
    boxes = np.array([[[0.1 * i, 0.0, 0.1 * i + 0.05, 0.05] for i in range(6)]], np.float32)  # apart
    scores = np.array([[[0.5], [0.5], [0.9], [0.5], [0.5], [0.5]]], np.float32)
    d = decode_dense(boxes, scores, pre_nms_top_k=3)
    np.testing.assert_allclose(d.boxes[:, 0], [0.2, 0.0, 0.1], atol=1e-6)  # 0.9, then anchors 0 and 1
    d = decode_dense(np.repeat(boxes, 2, axis=0), np.repeat(scores, 2, axis=0), pre_nms_top_k=4, max_detections=1)
    assert d.counts.tolist() == [1, 1] and d.scores.tolist() == pytest.approx([0.9, 0.9])


def test_decode_keeps_frames_apart_and_in_order() -> None:
    one = np.array([[0.1, 0.1, 0.4, 0.4]], np.float32)
    boxes = np.stack([one, one, one])  # (3, 1, 4)
    scores = np.array([[[0.9]], [[0.01]], [[0.6]]], np.float32)
    d = decode_dense(boxes, scores)
    assert d.counts.tolist() == [1, 0, 1] and d.frame_index.tolist() == [0, 2]
    np.testing.assert_allclose(d.probs, [[1.0], [1.0]])
    assert decode_dense(np.zeros((0, 5, 4)), np.zeros((0, 5, 3))).n == 0


def test_nms_agrees_with_torchvision() -> None:
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(7)
    for _ in range(60):
        m = int(rng.integers(0, 80))
        xy = rng.random((m, 2)) * 0.8
        b = np.c_[xy, xy + rng.random((m, 2)) * 0.3 + 0.01]
        s = rng.random(m)
        g = rng.integers(0, 4, m)
        thr = float(rng.choice([0.3, 0.5, 0.7]))
        want = ops.batched_nms(torch.tensor(b), torch.tensor(s), torch.tensor(g), thr).numpy()
        assert batched_nms(b, s, g, iou=thr).tolist() == want.tolist()


def _reference_decode(boxes: np.ndarray, scores: np.ndarray, thr: float, top_k: int, iou: float, cap: int) -> list:
    """The post-processing DetectorSpec describes, frame by frame, with torchvision's batched_nms."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    out = []
    for f in range(len(scores)):
        best, label = scores[f].max(axis=1), scores[f].argmax(axis=1)
        b = np.clip(boxes[f], 0, 1).astype(np.float64)
        idx = np.flatnonzero((best >= thr) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
        idx = idx[np.argsort(-best[idx], kind="stable")][:top_k]
        b = b[idx]
        keep = ops.batched_nms(torch.tensor(b), torch.tensor(best[idx]).double(), torch.tensor(label[idx]), iou)
        keep = keep[:cap].numpy()
        out.append((b[keep], label[idx][keep]))
    return out


@pytest.mark.parametrize(("thr", "top_k", "iou", "cap", "objects", "spread"), [
    (0.1, 50, 0.45, 7, 12, 0.01),  # top-k binding; the 14 best candidates settle each frame's first 7 boxes
    (0.05, 1000, 0.5, 5, 2, 0.002),  # two clusters of near-copies outscore the rest: the 10 best leave only 2
    # boxes, so the frame needs all its candidates
    (0.0, 300, 0.3, 100, 12, 0.05),  # every anchor a candidate, a cap that never binds
])
def test_decode_agrees_with_a_torchvision_post_processing(thr: float, top_k: int, iou: float, cap: int,
                                                          objects: int, spread: float) -> None:
    rng = np.random.default_rng(3)
    boxes, scores = _dense(rng, 6, 400, 5, objects=objects, spread=spread)
    d = decode_dense(boxes, scores, score_threshold=thr, pre_nms_top_k=top_k, nms_iou=iou, max_detections=cap)
    for f, (want_boxes, want_labels) in enumerate(_reference_decode(boxes, scores, thr, top_k, iou, cap)):
        np.testing.assert_allclose(d.boxes[d.rows(f)], want_boxes, rtol=1e-6)
        assert d.labels[d.rows(f)].tolist() == want_labels.tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.3, 0.5, 0.7]), st.integers(1, 20))
def test_no_two_kept_boxes_of_a_class_overlap_past_the_threshold(seed: int, iou: float, cap: int) -> None:
    boxes, scores = _dense(np.random.default_rng(seed), 3, 120, 3)
    d = decode_dense(boxes, scores, nms_iou=iou, max_detections=cap)
    assert (d.counts <= cap).all()
    assert np.all(d.probs.sum(axis=1) == pytest.approx(1.0))
    for f in range(d.n):
        r = d.rows(f)
        ov = box_iou(d.boxes[r], d.boxes[r])
        same = d.labels[r][:, None] == d.labels[r][None, :]
        np.fill_diagonal(ov, 0.0)
        assert not (ov[same] > iou).any()
        assert np.all(np.diff(d.scores[r]) <= 0)  # best first


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: decode_dense(np.zeros((1, 5, 4)), np.zeros((1, 6, 3))), r"received boxes array of shape \(1, 5, 4\)"),
        (lambda: decode_dense(np.zeros((5, 4)), np.zeros((5, 3))), "must have 3 dimensions"),
        (lambda: decode_dense(np.zeros((1, 2, 4)), np.full((1, 2, 3), 3.0)), r"in \[0, 1\]; received values in \[3"),
        (lambda: decode_dense(np.full((1, 2, 4), np.nan), np.zeros((1, 2, 3))), "must be finite"),
        (lambda: decode_dense(np.zeros((1, 2, 4)), np.zeros((1, 2, 3)), score_threshold=2), "received 2"),
        (lambda: decode_dense(np.zeros((1, 2, 4)), np.zeros((1, 2, 3)), pre_nms_top_k=0), ">= 1; received 0"),
        (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2)), "groups integers"),
    ],
)
def test_bad_input_is_refused_with_what_was_received(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()
