"""COCO mAP of the detector gate: hand-computed reference numbers, a cross-check against faster-coco-eval, per
slice, the F1-best operating threshold, and the gate's decisions on fixed metrics."""

from __future__ import annotations

import numpy as np
import pytest

from training.detect.data import make_boxset
from training.detect.evaluate import Detections, detection_metrics, mean_average_precision
from training.gate import GateConfig, decide

TRUE_BOXES = [np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]], np.float32),
              np.array([[0.2, 0.2, 0.4, 0.4]], np.float32)]
TRUE_CLASSES = [np.array([0, 1]), np.array([0])]


def dets(boxes: list[list[list[float]]], scores: list[list[float]], classes: list[list[int]]) -> Detections:
    return Detections([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
                      [np.asarray(s, np.float32) for s in scores], [np.asarray(c, np.int64) for c in classes])


def test_perfect_detections_score_one() -> None:
    pred = Detections([b.copy() for b in TRUE_BOXES], [np.array([0.9, 0.8]), np.array([0.7])],
                      [c.copy() for c in TRUE_CLASSES])
    m = mean_average_precision(pred, TRUE_BOXES, TRUE_CLASSES, num_classes=2, image_size=(100, 100))
    assert m["map"] == pytest.approx(1.0) and m["map_50"] == pytest.approx(1.0) and m["boxes"] == 3
    assert m["operating_threshold"] == pytest.approx(0.7)  # every detection is right: keep them all


def test_hand_computed_average_precision() -> None:
    # class 0: a false positive scored above both true positives: ranked FP, TP, TP -> precision 1/2 at recall
    # 1/2 and 2/3 at recall 1; COCO's interpolated precision is 2/3 at every recall point, so AP = 2/3 at every
    # IoU threshold (the boxes are exact). Class 1: AP 1. mAP = (2/3 + 1) / 2.
    pred = dets([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9], [0.6, 0.1, 0.8, 0.3]], [[0.2, 0.2, 0.4, 0.4]]],
                [[0.9, 0.8, 0.95], [0.7]], [[0, 1, 0], [0]])
    m = mean_average_precision(pred, TRUE_BOXES, TRUE_CLASSES, num_classes=2)
    assert m["ap_per_class"][0] == pytest.approx(2 / 3) and m["ap_per_class"][1] == pytest.approx(1.0)
    assert m["map"] == pytest.approx(5 / 6) and m["map_50"] == pytest.approx(5 / 6)


def test_a_loose_box_counts_only_at_low_iou_thresholds() -> None:
    # one object, one detection with IoU 0.68 (a 0.2-wide box shifted by 0.02 in x and y): a hit at IoU 0.50..0.65
    # (4 of the 10 thresholds), a miss above, so AP@[.5:.95] = 4/10 and AP@.5 = 1.
    truth = [np.array([[0.2, 0.2, 0.4, 0.4]], np.float32)]
    pred = dets([[[0.22, 0.22, 0.42, 0.42]]], [[0.9]], [[0]])
    iou = (0.18 * 0.18) / (2 * 0.04 - 0.18 * 0.18)
    assert 0.65 < iou < 0.70
    m = mean_average_precision(pred, truth, [np.array([0])], num_classes=1)
    assert m["map_50"] == pytest.approx(1.0) and m["map"] == pytest.approx(0.4)


def test_classes_without_a_true_box_are_left_out_and_empty_sets_have_no_map() -> None:
    truth = [np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), np.zeros((0, 4), np.float32)]
    classes = [np.array([1]), np.zeros(0, np.int64)]
    pred = dets([[[0.1, 0.1, 0.5, 0.5]], [[0.6, 0.6, 0.9, 0.9]]], [[0.9], [0.8]], [[1], [2]])
    m = mean_average_precision(pred, truth, classes, num_classes=3)
    assert m["map"] == pytest.approx(1.0) and set(m["ap_per_class"]) == {1}  # the class-2 box is no class-1 miss
    empty = mean_average_precision(pred, truth, classes, num_classes=3, images=[1])
    assert np.isnan(empty["map"]) and empty["boxes"] == 0


def test_agrees_with_faster_coco_eval_on_random_detections() -> None:
    fce = pytest.importorskip("faster_coco_eval")
    rng = np.random.default_rng(3)
    n, k = 40, 3
    truth_b, truth_c, pred = [], [], Detections([], [], [])
    for _ in range(n):
        m = int(rng.integers(0, 4))
        xy = rng.uniform(0, 0.7, (m, 2))
        wh = rng.uniform(0.05, 0.3, (m, 2))
        truth_b.append(np.hstack([xy, xy + wh]).astype(np.float32))
        truth_c.append(rng.integers(0, k, m))
        jitter = truth_b[-1] + rng.normal(0, 0.02, truth_b[-1].shape)  # found, roughly, plus some noise boxes
        extra = rng.uniform(0, 0.5, (int(rng.integers(0, 3)), 2))
        boxes = np.vstack([jitter, np.hstack([extra, extra + 0.2])]).clip(0, 1)
        pred.boxes.append(boxes.astype(np.float32))
        pred.scores.append(rng.uniform(0, 1, len(boxes)).astype(np.float32))
        pred.classes.append(np.concatenate([np.where(rng.uniform(size=m) < 0.8, truth_c[-1], rng.integers(0, k, m)),
                                            rng.integers(0, k, len(extra))]))
    ours = mean_average_precision(pred, truth_b, truth_c, num_classes=k, image_size=(200, 300))

    scale = np.array([300, 200, 300, 200])
    images = [{"id": i, "width": 300, "height": 200} for i in range(n)]
    gt_anns, dt_anns = [], []
    for i in range(n):
        for b, c in zip(truth_b[i] * scale, truth_c[i], strict=True):
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i, "category_id": int(c), "iscrowd": 0,
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                            "area": float((b[2] - b[0]) * (b[3] - b[1]))})
        for b, s, c in zip(pred.boxes[i] * scale, pred.scores[i], pred.classes[i], strict=True):
            dt_anns.append({"image_id": i, "category_id": int(c), "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    gt = fce.COCO({"images": images, "annotations": gt_anns, "categories": [{"id": c} for c in range(k)]})
    ev = fce.COCOeval_faster(gt, gt.loadRes(dt_anns), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ours["map"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert ours["map_50"] == pytest.approx(ev.stats[1], abs=1e-6)
    assert ours["map_75"] == pytest.approx(ev.stats[2], abs=1e-6)
    assert 0.1 < ours["map"] < 0.9  # a real mix of hits and misses, not a degenerate 0 or 1


def test_detection_metrics_per_slice_and_class() -> None:
    images = np.zeros((3, 1, 32, 32), np.uint8)
    truth = make_boxset(images, [[[0.1, 0.1, 0.5, 0.5]], [[0.5, 0.5, 0.9, 0.9]], []], [[0], [1], []],
                        [{"condition": "day"}, {"condition": "night"}, {"condition": "night"}], num_classes=2)
    pred = dets([[[0.1, 0.1, 0.5, 0.5]], [], [[0.2, 0.2, 0.4, 0.4]]], [[0.9], [], [0.6]], [[0], [], [1]])
    m = detection_metrics(pred, truth, ["cat", "dog"])
    assert m["n"] == 3 and m["boxes"] == 2
    assert m["per_class"] == {"cat": {"n": 1, "ap": pytest.approx(1.0)}, "dog": {"n": 1, "ap": pytest.approx(0.0)}}
    assert m["per_slice"]["condition=day"]["map"] == pytest.approx(1.0)
    assert m["per_slice"]["condition=night"]["map"] == pytest.approx(0.0)  # the dog was missed, a wrong box drawn
    assert m["per_slice"]["condition=night"]["n"] == 2 and m["map"] == pytest.approx(0.5)


def metrics(overall: float, night: float, *, n_night: int = 20) -> dict[str, dict]:
    return {"test": {"n": 100, "map": overall, "map_50": overall + 0.2,
                     "per_slice": {"condition=night": {"n": n_night, "map": night, "map_50": night + 0.2},
                                   "condition=fog": {"n": 30, "map": float("nan"), "map_50": float("nan")}}}}


def test_the_map_gate_holds_overall_and_every_large_enough_slice() -> None:
    config = GateConfig(tolerance=0.01, slice_tolerance=0.02, min_slice_size=10)
    ok = decide(metrics(0.50, 0.40), metrics(0.505, 0.41), config, baseline_name="v1", metrics=("map", "map_50"))
    assert ok.passed and ok.reasons == ["held or improved on all 4 checks against v1"]
    assert {(c.name, c.metric) for c in ok.checks} == {("test", "map"), ("test", "map_50"),
                                                       ("test/condition=night", "map"),
                                                       ("test/condition=night", "map_50")}  # fog has no mAP

    bad = decide(metrics(0.50, 0.30), metrics(0.50, 0.40), config, baseline_name="v1", metrics=("map", "map_50"))
    assert not bad.passed
    assert bad.reasons == [
        "test/condition=night: mAP@[.5:.95] 0.3000 fell below the baseline 0.4000 by 0.1000 (tolerance 0.0200, n=20)",
        "test/condition=night: mAP@.5 0.5000 fell below the baseline 0.6000 by 0.1000 (tolerance 0.0200, n=20)",
    ]
    small = decide(metrics(0.50, 0.30, n_night=5), metrics(0.50, 0.40, n_night=5), config, metrics=("map", "map_50"))
    assert small.passed  # a slice of 5 images is reported, not gated

    floor = decide(metrics(0.20, 0.2), None, GateConfig(min_accuracy=0.25), metrics=("map", "map_50"))
    assert not floor.passed and floor.reasons == ["test: mAP@[.5:.95] 0.2000 is below the required minimum 0.2500"]
