"""Box consensus: same-class IoU matching, box F1, majority merge and the box path of ``decide``, checked
against numbers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.consensus import (
    AnnotatorScore,
    Rules,
    Vote,
    box_f1,
    decide,
    detection_f1,
    match_same_class,
    merge_boxes,
    merge_detections,
    score_annotators,
)
from fleet.errors import InvalidInput
from fleet.protocol import Box, Detection


def det(*boxes: tuple[float, float, float, float, int]) -> Detection:
    return Detection([Box(x1, y1, x2, y2, c) for x1, y1, x2, y2, c in boxes])


def test_boxes_match_at_iou_one_half_and_only_within_their_class() -> None:
    # IoU of [0, 0, .5, .5] and [0, 0, .5, .25]: .125 / .25 = 0.5 exactly (binary fractions), which matches
    ma, mb = match_same_class([[0, 0, .5, .5]], [0], [[0, 0, .5, .25]], [0])
    assert ma.tolist() == [0] and mb.tolist() == [0]
    ma, _ = match_same_class([[0, 0, .5, .5]], [0], [[0, 0, .5, .24]], [0])  # IoU .48
    assert ma.tolist() == [-1]
    ma, _ = match_same_class([[0, 0, .5, .5]], [0], [[0, 0, .5, .5]], [1])  # same place, another class
    assert ma.tolist() == [-1]


def test_matching_is_greedy_highest_iou_first_and_one_to_one() -> None:
    a = [[0.0, 0.0, 0.5, 0.5], [0.05, 0.0, 0.55, 0.5]]
    b = [[0.06, 0.0, 0.56, 0.5]]  # IoU with a[1] (.98) beats IoU with a[0] (.79)
    ma, mb = match_same_class(a, [0, 0], b, [0])
    assert ma.tolist() == [-1, 0] and mb.tolist() == [1]
    ma, mb = match_same_class(np.zeros((0, 4)), np.zeros(0, int), b, [0])
    assert ma.tolist() == [] and mb.tolist() == [-1]


def test_box_f1_by_hand() -> None:
    truth = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.8, 0.0, 1.0, 0.2]]
    pred = [[0.01, 0.0, 0.21, 0.2], [0.5, 0.5, 0.7, 0.7]]
    # the second predicted box has the wrong class: 1 match; F1 = 2 * 1 / (2 + 3)
    assert box_f1(pred, [0, 2], truth, [0, 1, 2]) == pytest.approx(0.4)
    assert box_f1(pred, [0, 1], truth, [0, 1, 2]) == pytest.approx(0.8)  # 2 * 2 / 5
    assert box_f1(np.zeros((0, 4)), [], np.zeros((0, 4)), []) == 1.0  # both say: nothing here
    assert box_f1(np.zeros((0, 4)), [], truth, [0, 1, 2]) == 0.0


def test_a_box_is_kept_when_a_majority_drew_it_at_the_mean_of_their_corners() -> None:
    a = det((0.10, 0.10, 0.30, 0.30, 0), (0.5, 0.5, 0.9, 0.9, 1))
    b = det((0.12, 0.10, 0.32, 0.30, 0))
    c = det((0.10, 0.12, 0.30, 0.32, 0), (0.5, 0.5, 0.9, 0.9, 2))  # same place as a's second box, another class
    boxes, labels, support = merge_boxes([[[x.x1, x.y1, x.x2, x.y2] for x in d.boxes] for d in (a, b, c)],
                                         [[x.label for x in d.boxes] for d in (a, b, c)])
    np.testing.assert_allclose(boxes, [[0.32 / 3, 0.32 / 3, 0.92 / 3, 0.92 / 3]])
    assert labels.tolist() == [0] and support.tolist() == [3]
    consensus, agreement = merge_detections([a, b, c])
    assert [bx.label for bx in consensus.boxes] == [0]
    # each answer's F1 against the one consensus box: a 2/3, b 1, c 2/3
    assert agreement == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


def test_with_two_annotators_a_box_needs_both() -> None:
    a = det((0.1, 0.1, 0.3, 0.3, 0), (0.6, 0.6, 0.8, 0.8, 1))
    b = det((0.1, 0.1, 0.3, 0.3, 0))
    consensus, agreement = merge_detections([a, b])
    assert len(consensus.boxes) == 1 and consensus.boxes[0].label == 0
    assert agreement == pytest.approx((2 / 3 + 1) / 2)
    empty, agree_empty = merge_detections([Detection([]), Detection([])])
    assert empty.boxes == [] and agree_empty == 1.0


def test_decide_holds_dissenting_box_answers_and_accepts_the_majority() -> None:
    a = det((0.10, 0.10, 0.30, 0.30, 0), (0.5, 0.5, 0.9, 0.9, 1))
    b = det((0.12, 0.10, 0.32, 0.30, 0))
    c = det((0.10, 0.12, 0.30, 0.32, 0))
    rulings = decide([Vote(1, "a", a), Vote(2, "b", b), Vote(3, "c", c)], n_classes=3, required=3)
    assert [r.status for r in rulings] == ["held", "accepted", "accepted"]  # a's F1 2/3 < 0.8
    assert rulings[0].agreement == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert "dissents" in rulings[0].reason
    waiting = decide([Vote(1, "a", a)], n_classes=3, required=2)
    assert waiting[0].status == "held" and "waiting for 1" in waiting[0].reason
    assert decide([Vote(1, "a", a)], n_classes=3)[0].status == "accepted"  # a single annotator


def test_low_box_agreement_holds_every_answer() -> None:
    a = det((0.1, 0.1, 0.3, 0.3, 0))
    b = det((0.6, 0.6, 0.8, 0.8, 0))
    rulings = decide([Vote(1, "a", a), Vote(2, "b", b)], n_classes=1, required=2)
    # no box has a majority: the consensus is empty and each answer's F1 against it is 0
    assert [r.status for r in rulings] == ["held", "held"] and rulings[0].agreement == 0.0
    assert "below" in rulings[0].reason


def test_gold_box_tasks_score_answers_by_box_f1() -> None:
    gold = det((0.1, 0.1, 0.3, 0.3, 0), (0.5, 0.5, 0.7, 0.7, 1), (0.8, 0.8, 0.95, 0.95, 2))
    full = det((0.11, 0.1, 0.31, 0.3, 0), (0.5, 0.5, 0.7, 0.7, 1), (0.8, 0.8, 0.95, 0.95, 2))
    missed = det((0.1, 0.1, 0.3, 0.3, 0), (0.5, 0.5, 0.7, 0.7, 1))  # F1 2*2/5 = 0.8: at the bar
    poor = det((0.1, 0.1, 0.3, 0.3, 0))  # F1 2*1/4 = 0.5
    rulings = decide([Vote(1, "x", full), Vote(2, "y", missed), Vote(3, "z", poor)], n_classes=3,
                     gold_label=gold)
    assert [r.status for r in rulings] == ["gold", "gold", "held"]
    assert rulings[2].agreement == pytest.approx((1 + 0.8 + 0.5) / 3) and "0.50" in rulings[2].reason
    truth = decide([Vote(1, "x", poor), Vote(9, "reviewer", gold, ground_truth=True)], n_classes=3)
    assert [r.status for r in truth] == ["held", "gold"]  # a ground-truth annotation is the gold answer
    assert decide([Vote(2, "y", missed)], n_classes=3, gold_label=gold,
                  rules=Rules(min_box_f1=0.9))[0].status == "held"


def test_annotators_are_scored_on_gold_boxes_by_f1() -> None:
    gold = det((0.1, 0.1, 0.3, 0.3, 0), (0.5, 0.5, 0.7, 0.7, 1))
    scores = score_annotators([("x", gold, gold), ("x", det((0.1, 0.1, 0.3, 0.3, 0)), gold), ("y", 2, 2)])
    assert scores["x"] == AnnotatorScore("x", pytest.approx(1 + 2 / 3), 2)  # type: ignore[arg-type]
    assert scores["y"] == AnnotatorScore("y", 1.0, 1)
    assert detection_f1(Detection([]), gold) == 0.0


def test_bad_box_inputs_are_refused_with_what_was_received() -> None:
    a = det((0.1, 0.1, 0.3, 0.3, 0))
    with pytest.raises(InvalidInput, match="all be boxes or all be classes; vote 2 is int"):
        decide([Vote(1, "a", a), Vote(2, "b", 1)], n_classes=2)
    with pytest.raises(InvalidInput, match="box class 5; expected 0..1"):
        decide([Vote(1, "a", det((0.1, 0.1, 0.3, 0.3, 5)))], n_classes=2)
    with pytest.raises(InvalidInput, match="must be a Detection"):
        decide([Vote(1, "a", a)], n_classes=2, gold_label=1)
    with pytest.raises(InvalidInput, match=r"x1 <= x2"):
        box_f1([[0.5, 0.0, 0.1, 0.2]], [0], [[0, 0, 1, 1]], [0])
    with pytest.raises(InvalidInput, match=r"shape \(1, 3\)"):
        box_f1([[0.5, 0.0, 0.1]], [0], [[0, 0, 1, 1]], [0])
    with pytest.raises(InvalidInput, match="box_iou"):
        Rules(box_iou=0.0)
