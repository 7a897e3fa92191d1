"""Boxes (ragged per-frame box sets), IoU and greedy matching: hand-worked values, properties and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trigger import Boxes, box_iou, match_boxes
from trigger.boxes import _greedy_match

coord = st.floats(0.0, 0.875, allow_nan=False, allow_subnormal=False, width=32)
side = st.floats(0.0, 0.5, allow_nan=False, allow_subnormal=False, width=32)
box = st.tuples(coord, coord, side, side).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


def test_from_frames_lays_frames_out_one_after_the_other() -> None:
    b = Boxes.from_frames([[[0, 0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.3]], [], [[0.2, 0.2, 0.4, 0.4]]],
                          scores=[[0.9, 0.4], [], [0.7]], labels=[[1, 0], [], [2]])
    assert (b.n, b.m, len(b), b.k) == (3, 3, 3, None)
    assert b.offsets.tolist() == [0, 2, 2, 3] and b.counts.tolist() == [2, 0, 1]
    assert b.frame_index.tolist() == [0, 0, 2]
    assert b.labels[b.rows(2)].tolist() == [2] and b.scores[b.rows(0)].tolist() == [0.9, 0.4]
    assert b.known_mask.tolist() == [True, True, True]
    human = Boxes.from_frames([[[0, 0, 1, 1]], []])  # a human's boxes: score 1, and class 0 unless given
    assert human.scores.tolist() == [1.0] and human.labels.tolist() == [0]
    assert Boxes.empty(4).counts.tolist() == [0, 0, 0, 0]


def test_take_and_concat_keep_boxes_with_their_frames() -> None:
    b = Boxes.from_frames([[[0, 0, 0.1, 0.1]], [[0, 0, 0.2, 0.2], [0, 0, 0.3, 0.3]]],
                          probs=[[[0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]]], labels=[[0], [0, 1]])
    t = b.take([1, -1, 0, 1])
    assert t.counts.tolist() == [2, 0, 1, 2] and t.known_mask.tolist() == [True, False, True, True]
    np.testing.assert_allclose(t.boxes[:, 2], [0.2, 0.3, 0.1, 0.2, 0.3])
    assert t.probs is not None and t.probs.shape == (5, 2) and t.labels.tolist() == [0, 1, 0, 0, 1]
    both = Boxes.concat([b, Boxes.empty(1, known=np.array([False])), b])
    assert both.counts.tolist() == [1, 2, 0, 1, 2] and both.probs is None  # the empty part has no probs
    assert both.known_mask.tolist() == [True, True, False, True, True]


def test_iou_hand_worked() -> None:
    a = [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    b = [[0.5, 0.0, 1.5, 1.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0], [0.25, 0.25, 0.75, 0.75]]
    np.testing.assert_allclose(box_iou(a, b), [[1 / 3, 1.0, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(box, max_size=8), st.lists(box, max_size=8))
def test_iou_is_symmetric_and_in_unit_range(a: list[list[float]], b: list[list[float]]) -> None:
    ab = box_iou(np.reshape(a, (-1, 4)), np.reshape(b, (-1, 4)))
    ba = box_iou(np.reshape(b, (-1, 4)), np.reshape(a, (-1, 4)))
    np.testing.assert_allclose(ab, ba.T)
    assert np.all((ab >= 0) & (ab <= 1 + 1e-12))
    x = np.reshape(a, (-1, 4))
    has_area = (x[:, 2] > x[:, 0]) & (x[:, 3] > x[:, 1])
    np.testing.assert_allclose(np.diag(box_iou(x, x))[has_area], 1.0)


def test_matching_takes_the_best_overlap_first_and_same_class_before_a_flip() -> None:
    model = Boxes.from_frames([[[0, 0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]], labels=[[0, 1]])
    other = Boxes.from_frames([[[0, 0, 0.4, 0.39], [0.0, 0.0, 0.4, 0.3], [0.5, 0.5, 0.9, 0.9]]], labels=[[1, 0, 0]])
    # by IoU alone, model box 0 takes other box 0 (IoU 0.975); same-class first, it takes other box 1 (0.75)
    ma, mb = match_boxes(model, other, iou=0.5)
    assert ma.tolist() == [0, 2] and mb.tolist() == [0, -1, 1]
    ma, mb = match_boxes(model, other, iou=0.5, classes=True)
    assert ma.tolist() == [1, 2] and mb.tolist() == [-1, 0, 1]
    ma, _ = match_boxes(model, other, iou=0.99)
    assert ma.tolist() == [-1, 2]


def test_matching_never_crosses_frames() -> None:
    a = Boxes.from_frames([[[0, 0, 0.5, 0.5]], []])
    b = Boxes.from_frames([[], [[0, 0, 0.5, 0.5]]])
    ma, mb = match_boxes(a, b)
    assert ma.tolist() == [-1] and mb.tolist() == [-1]


def _sequential_greedy(ia: np.ndarray, ib: np.ndarray, key: np.ndarray, na: int, nb: int) -> tuple[list, list]:
    ma, mb = [-1] * na, [-1] * nb
    for e in sorted(range(len(ia)), key=lambda e: (-key[e], ia[e], ib[e])):
        if ma[ia[e]] < 0 and mb[ib[e]] < 0:
            ma[ia[e]], mb[ib[e]] = int(ib[e]), int(ia[e])
    return ma, mb


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 9), st.integers(0, 9), st.data())
def test_round_based_matching_equals_the_sequential_greedy_loop(na: int, nb: int, data: st.DataObject) -> None:
    pairs = data.draw(st.lists(st.tuples(st.integers(0, max(na - 1, 0)), st.integers(0, max(nb - 1, 0))),
                               unique=True, max_size=na * nb)) if na and nb else []
    keys = data.draw(st.lists(st.sampled_from([0.1, 0.5, 0.5, 0.9, 2.5]), min_size=len(pairs), max_size=len(pairs)))
    ia = np.array([p[0] for p in pairs], np.int64)
    ib = np.array([p[1] for p in pairs], np.int64)
    key = np.array(keys, np.float64)
    ma, mb = _greedy_match(ia, ib, key, na, nb)
    want_a, want_b = _sequential_greedy(ia, ib, key, na, nb)
    assert ma.tolist() == want_a and mb.tolist() == want_b


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Boxes(np.zeros((2, 4)), np.ones(2), np.zeros(2, int), [0, 1]),
         r"shape \(1, 4\).*received array of shape \(2, 4\)"),
        (lambda: Boxes([[0.5, 0, 0.1, 1]], [1.0], [0], [0, 1]), r"x1 <= x2 .* received row 0: \[0.5, 0.0, 0.1, 1.0\]"),
        (lambda: Boxes([[0, 0, 1, 1]], [1.5], [0], [0, 1]), r"scores must be in \[0, 1\]; received values in \[1.5"),
        (lambda: Boxes([[0, 0, 1, 1]], [np.nan], [0], [0, 1]), "must be finite"),
        (lambda: Boxes([[0, 0, 1, 1]], [1.0], [-1], [0, 1]), "labels must be >= 0; received -1"),
        (lambda: Boxes([[0, 0, 1, 1]], [1.0], [0.5], [0, 1]), "integer class indices"),
        (lambda: Boxes([[0, 0, 1, 1]], [1.0], [0], [1, 1]), r"start at 0 and never decrease; received \[1, 1\]"),
        (lambda: Boxes([[0, 0, 1, 1]], [1.0], [2], [0, 1], probs=[[0.5, 0.5]]), "below k=2"),
        (lambda: Boxes([[0, 0, 1, 1]], [1.0], [0], [0, 1], probs=[[0.5, 0.6]]), "sum to 1"),
        (lambda: Boxes([[0, 0, 1, 1]], [1.0], [0], [0, 1], known=[1]), r"bool array of shape \(1,\)"),
        (lambda: Boxes.from_frames(np.zeros((2, 1, 4))), "one \\(q, 4\\) array per frame"),
        (lambda: Boxes.from_frames([[[0, 0, 1]]]),
         r"boxes\[0\] must have shape \(q, 4\); received array of shape \(1, 3\)"),
        (lambda: Boxes.from_frames([[[0, 0, 1, 1]]], scores=[[1.0], [1.0]]), "one entry per frame \\(1\\)"),
        (lambda: Boxes.empty(2).take([2]), r"frame indices in \[-1, 2\); received"),
        (lambda: box_iou([[0, 0, 1]], [[0, 0, 1, 1]]), r"shape \(p, 4\)"),
        (lambda: box_iou([[1, 0, 0, 1]], [[0, 0, 1, 1]]), "x1 <= x2"),
        (lambda: match_boxes(Boxes.empty(1), Boxes.empty(2)), "same 1 frames; received Boxes of 2 frames"),
        (lambda: match_boxes(Boxes.empty(1), Boxes.empty(1), iou=0), r"iou must be a number in \(0, 1\]; received 0"),
        (lambda: match_boxes(Boxes.empty(1), [[0, 0, 1, 1]]), "b must be Boxes; received list"),
    ],
)
def test_bad_input_is_refused_with_what_was_received(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()
