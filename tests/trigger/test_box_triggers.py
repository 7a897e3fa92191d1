"""Detector batches through specs and the Evaluator: the box triggers by name, the wrong kind of batch refused,
flicker across batches, and novelty, dedup, calibration and budgets working as for classifiers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from trigger import TRIGGERS, Boxes, Evaluator, FrameBatch, NoveltyBank, SpecError, decode_dense, parse_spec
from trigger.frames import BOX_BASE_SCORES

K, D, A = 4, 16, 60

BOX_TRIGGERS = sorted(name for name in TRIGGERS if name.startswith("box_"))


def spec(rule: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "det", "version": 1, "rule": rule, **extra}


def detections(n: int, seed: int = 0) -> tuple[Boxes, np.ndarray]:
    """A detector's boxes for n frames (from dense outputs, as on a device) and their embeddings."""
    rng = np.random.default_rng(seed)
    xy = rng.random((n, A, 2)) * 0.7
    boxes = np.concatenate([xy, xy + rng.random((n, A, 2)) * 0.25 + 0.02], axis=-1).astype(np.float32)
    scores = (rng.random((n, A, K)) ** 6).astype(np.float32)
    return decode_dense(boxes, scores, max_detections=8), np.abs(rng.normal(0, 1, (n, D))).astype(np.float32)


def test_every_box_trigger_is_a_detector_trigger_usable_in_a_spec() -> None:
    assert len(BOX_TRIGGERS) == 18
    for name in BOX_TRIGGERS:
        tdef = TRIGGERS[name]
        assert tdef.task == "detect" and tdef.direction == "above" and "boxes" in tdef.needs, name
        parsed = parse_spec(spec({"trigger": name, "above": 0.5}))
        assert parsed.task == "detect" and parse_spec(parsed.to_dict()) == parsed
    doc = spec({"any_of": [
        {"trigger": "box_entropy_max", "normalize": True, "floor": 0.3, "target_rate": 0.05},
        {"trigger": "box_ambiguous_share", "threshold": 0.4, "band": 0.15, "above": 0.5},
        {"trigger": "box_human_disagreement", "iou": 0.6, "classes": False},
        {"trigger": "box_flicker", "iou": 0.4, "max_gap": 0.5, "above": 0.4},
        {"trigger": "novelty", "k": 3, "above": 0.5},
    ]})
    leaves = parse_spec(doc).leaves
    assert leaves[0].params == {"normalize": True, "floor": 0.3}
    assert leaves[2].mode == "above" and leaves[2].threshold == 0.0  # fires whenever the human disagrees
    with pytest.raises(SpecError, match=r"rule.band: expected a number in \[0, 0.5\]; received 0.9"):
        parse_spec(spec({"trigger": "box_ambiguous_share", "band": 0.9, "above": 0.5}))
    with pytest.raises(SpecError, match="unknown key 'top_k'.*valid keys for trigger 'box_flicker'"):
        parse_spec(spec({"trigger": "box_flicker", "top_k": 2, "above": 0.5}))


def test_a_spec_is_for_one_kind_of_model() -> None:
    with pytest.raises(SpecError, match=r"rule: mixes classifier triggers \(entropy\) and detector triggers "
                                        r"\(box_entropy_max\)"):
        parse_spec(spec({"any_of": [{"trigger": "entropy", "above": 1}, {"trigger": "box_entropy_max", "above": 1}]}))
    assert parse_spec(spec({"trigger": "entropy", "above": 1})).task == "classify"
    assert parse_spec(spec({"trigger": "random", "below": 0.1})).task is None
    with pytest.raises(ValueError, match="uses classify triggers \\(entropy\\) and cannot run on a 'detect' model"):
        Evaluator(spec({"trigger": "entropy", "above": 1}), task="detect")
    with pytest.raises(ValueError, match="task must be 'classify', 'detect' or None; received 'segment'"):
        Evaluator(spec({"trigger": "random", "below": 0.1}), task="segment")
    Evaluator(spec({"trigger": "random", "below": 0.1}), task="detect")  # either kind


def test_the_wrong_kind_of_batch_is_refused_clearly() -> None:
    boxes, _ = detections(3)
    logits = np.zeros((3, K))
    with pytest.raises(ValueError, match=r"uses classify triggers \(entropy\) and needs a classifier's batch "
                                         r"\(FrameBatch.logits\); received a detector's"):
        Evaluator(spec({"trigger": "entropy", "above": 1})).evaluate(FrameBatch(boxes=boxes))
    with pytest.raises(ValueError, match=r"uses detect triggers \(box_flicker\) and needs a detector's batch"):
        Evaluator(spec({"trigger": "box_flicker", "above": 0.1})).evaluate(FrameBatch(logits=logits))
    with pytest.raises(ValueError, match="logits or a detector's boxes, not both"):
        Evaluator(spec({"trigger": "random", "below": 0.1})).evaluate(FrameBatch(logits=logits, boxes=boxes))
    with pytest.raises(ValueError, match="needs logits .* or boxes .*; received neither"):
        Evaluator(spec({"trigger": "random", "below": 0.1})).evaluate(FrameBatch(embeddings=np.zeros((3, D))))
    ev = Evaluator(spec({"trigger": "box_human_disagreement"}))
    with pytest.raises(ValueError, match="FrameBatch.boxes must be trigger.Boxes .*received array of shape"):
        ev.evaluate(FrameBatch(boxes=np.zeros((3, 4))))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="FrameBatch.human_boxes must describe the batch's 3 frames; received Boxes "
                                         "of 2 frames"):
        ev.evaluate(FrameBatch(boxes=boxes, human_boxes=Boxes.empty(2)))
    no_probs = Boxes(boxes.boxes, boxes.scores, boxes.labels, boxes.offsets)
    with pytest.raises(ValueError, match=r"needs each box's class distribution \(Boxes.probs, for box_margin_mean\)"):
        Evaluator(spec({"trigger": "box_margin_mean", "above": 0.5})).evaluate(FrameBatch(boxes=no_probs))
    Evaluator(spec({"trigger": "box_low_score_mean", "above": 0.5})).evaluate(FrameBatch(boxes=no_probs))
    with pytest.raises(ValueError, match=r"operating_threshold must be a number in \[0, 1\]; received 2"):
        ev.evaluate(FrameBatch(boxes=boxes, operating_threshold=2))


def test_human_box_disagreement_fires_where_the_model_misses_and_stays_silent_where_unknown() -> None:
    obj = [0.2, 0.2, 0.5, 0.6]
    model = Boxes.from_frames([[obj], [], [obj], [], [obj]], scores=[[0.9], [], [0.9], [], [0.3]],
                              labels=[[1], [], [0], [], [1]], probs=[[[0.1, 0.9]], [], [[0.5, 0.5]], [], [[0.2, 0.8]]])
    human = Boxes.from_frames([[obj], [obj], [], [], [obj]], labels=[[1], [0], [], [], [1]],
                              known=np.array([True, True, True, False, True]))
    ev = Evaluator(spec({"trigger": "box_human_disagreement"}))
    d = ev.evaluate(FrameBatch(boxes=model, human_boxes=human))
    # agree; model found nothing (missed); model found a box the human did not draw; unknown; the model's box
    # scores 0.3, under the operating threshold: not found, so the human's box is missed
    assert d.keep.tolist() == [False, True, True, False, True]
    np.testing.assert_array_equal(d.scores["box_human_disagreement"], [0.0, 1.0, 1.0, np.nan, 1.0])
    assert d.fired[1] == ["box_human_disagreement"] and d.values[1] == {"box_human_disagreement": 1.0}
    assert d.predicted.tolist() == [1, -1, 0, -1, 1]  # the best box's class, -1 without a box
    assert list(d.scores)[:4] == list(BOX_BASE_SCORES)
    np.testing.assert_allclose(d.scores["box_low_score_mean"], [0.1, 0.0, 0.1, 0.0, 0.0])  # floor 0.5: not 0.3
    low = Evaluator(spec({"trigger": "box_human_disagreement", "floor": 0.2}))
    assert low.evaluate(FrameBatch(boxes=model, human_boxes=human)).keep.tolist()[4] is False
    # without the human's boxes at all the trigger cannot say (NaN), and keeps nothing
    d = ev.evaluate(FrameBatch(boxes=model))
    assert not d.keep.any() and np.isnan(d.scores["box_human_disagreement"]).all()



def test_human_box_disagreement_can_count_the_boxes_that_differ() -> None:
    """With ``count``, a frame scores how many boxes differ (missed + extra + class flips), so frames rank by how
    many errors they hold (bench_error_capture_detect.py: 0.762 of the oracle at 5% against 1 - F1's 0.469)."""
    a, b, c = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.9]
    model = Boxes.from_frames([[a], [], [a, b], [a]], scores=[[0.9], [], [0.9, 0.9], [0.9]],
                              labels=[[1], [], [0, 1], [0]], probs=[[[0.1, 0.9]], [], [[0.9, 0.1], [0.1, 0.9]],
                                                                    [[0.9, 0.1]]])
    human = Boxes.from_frames([[a], [a, b, c], [a, c], [a]], labels=[[1], [0, 1, 0], [1, 0], [0]],
                              known=np.array([True, True, True, False]))
    ev = Evaluator(spec({"trigger": "box_human_disagreement", "count": True}))
    d = ev.evaluate(FrameBatch(boxes=model, human_boxes=human))
    # agree; three missed; a class flip, an extra and a missed box; unknown
    np.testing.assert_array_equal(d.scores["box_human_disagreement"], [0.0, 3.0, 3.0, np.nan])
    assert d.keep.tolist() == [False, True, True, False]
    f1 = Evaluator(spec({"trigger": "box_human_disagreement"})).evaluate(FrameBatch(boxes=model, human_boxes=human))
    assert f1.scores["box_human_disagreement"][1] == 1.0 and f1.scores["box_human_disagreement"][2] == 1.0
    with pytest.raises(ValueError, match="count"):
        Evaluator(spec({"trigger": "box_human_disagreement", "count": "yes"}))


def test_the_operating_threshold_of_the_batch_sets_the_defaults() -> None:
    b = Boxes.from_frames([[[0, 0, 1, 1]] * 3], scores=[[0.3, 0.35, 0.8]])
    ev = Evaluator(spec({"trigger": "box_ambiguous_share", "above": 0.5}))
    assert ev.evaluate(FrameBatch(boxes=b)).scores["box_ambiguous_share"][0] == 0.0  # band 0.4..0.6
    d = ev.evaluate(FrameBatch(boxes=b, operating_threshold=0.3))  # band 0.2..0.4: two of three
    assert d.scores["box_ambiguous_share"][0] == pytest.approx(2 / 3) and d.keep[0]


def test_filters_on_class_keep_frames_showing_the_class() -> None:
    b = Boxes.from_frames([[[0, 0, 1, 1], [0, 0, 0.5, 0.5]], [[0, 0, 1, 1]], [[0, 0, 1, 1]]],
                          scores=[[0.9, 0.7], [0.9], [0.2]], labels=[[0, 3], [0], [3]])
    ev = Evaluator(spec({"trigger": "random", "below": 1.0}, filters={"classes": [3]}))
    assert ev.evaluate(FrameBatch(boxes=b)).keep.tolist() == [True, False, False]  # frame 2's box is too weak


def test_flicker_is_the_same_one_frame_at_a_time_as_in_a_batch() -> None:
    rng = np.random.default_rng(5)
    n = 40
    base = np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.8, 0.7]])
    frames, labels, scores = [], [], []
    for i in range(n):
        keep = rng.random(2) > 0.15  # boxes drop out now and then
        jitter = rng.normal(0, 0.02 if i % 7 else 0.1, (2, 4))
        frames.append(np.sort((base + jitter)[keep].reshape(-1, 2, 2), axis=1).reshape(-1, 4))
        labels.append(rng.integers(0, 2, int(keep.sum())))
        scores.append(rng.uniform(0.55, 1.0, int(keep.sum())))
    boxes = Boxes.from_frames(frames, labels=labels, scores=scores)
    stream = np.array(["a", "b"])[np.arange(n) % 2]
    doc = spec({"any_of": [{"trigger": "box_flicker", "above": 0.3}, {"trigger": "box_instability", "above": 0.4}]})
    whole = Evaluator(doc).evaluate(FrameBatch(boxes=boxes, stream=stream))
    one = Evaluator(doc)
    parts = [one.evaluate(FrameBatch(boxes=boxes.take([i]), stream=stream[i : i + 1])) for i in range(n)]
    for label in ("box_flicker", "box_instability"):
        np.testing.assert_array_equal(np.concatenate([p.scores[label] for p in parts]), whole.scores[label])
    assert np.isnan(whole.scores["box_flicker"][:2]).all() and np.isfinite(whole.scores["box_flicker"][2:]).all()
    assert whole.keep.any() and not whole.keep.all()
    assert np.concatenate([p.keep for p in parts]).tolist() == whole.keep.tolist()
    # without stream ids the device is not running video: flicker cannot say
    assert np.isnan(Evaluator(doc).evaluate(FrameBatch(boxes=boxes)).scores["box_flicker"]).all()


def test_novelty_dedup_calibration_and_budgets_work_on_detector_batches() -> None:
    bank = NoveltyBank.from_embeddings(np.abs(np.random.default_rng(9).normal(0, 1, (500, D))))
    doc = spec({"any_of": [
        {"trigger": "box_entropy_max", "target_rate": 0.1, "window": 400},
        {"trigger": "novelty", "k": 3, "target_rate": 0.05, "window": 400},
    ]}, dedup={"embedding_threshold": 0.0001, "memory": 64}, budgets={"global": {"rate_per_s": 1, "burst": 10}})
    clock = [0.0]
    ev = Evaluator(doc, bank=bank, clock=lambda: clock[0])
    kept = fired = 0
    for i in range(20):
        boxes, emb = detections(100, seed=i)
        d = ev.evaluate(FrameBatch(boxes=boxes, embeddings=emb))
        kept += int(d.keep.sum())
        fired += int(d.qualified.sum())
        clock[0] += 2.0  # 2 tokens a batch after the first burst of 10
        assert np.isfinite(d.scores["novelty"][d.keep]).all()
    assert kept <= 10 + 2 * 19 and kept > 0  # the budget holds
    assert ev.stats["over_budget"] > 0 and ev.stats["kept"] == kept
    rate = ev.fired_counts["box_entropy_max"] / ev.stats["frames"]
    assert 0.05 < rate < 0.15  # calibrated to about 10%
    state = ev.state_dict()
    again = Evaluator(doc, bank=bank, clock=lambda: clock[0])
    again.load_state_dict(state)
    assert again.calibration_state() == ev.calibration_state()


def test_the_learned_box_trigger_runs_in_a_spec_on_a_detector_s_batch() -> None:
    """``learned_box_error`` through parse_spec and the Evaluator, as an agent runs it: the hub's weights and
    floor from the spec, the human's boxes from the batch; its score is the logistic model over
    trigger.learned.box_error_features, and it fires where the human drew a box the model did not report."""
    from trigger.learned import BOX_FEATURES, box_error_features, error_probability

    obj, other = [0.2, 0.2, 0.5, 0.6], [0.6, 0.6, 0.9, 0.9]
    model = Boxes.from_frames([[obj, other], [obj], [obj]], scores=[[0.9, 0.45], [0.9], [0.9]],
                              labels=[[1, 0], [1], [1]])
    human = Boxes.from_frames([[obj, other], [obj], []], labels=[[1, 0], [1], []],
                              known=np.array([True, True, False]))
    weights = {"w_human": 4.0, "w_near_floor": 1.0, "bias": -2.0}
    ev = Evaluator(spec({"trigger": "learned_box_error", "above": 0.5, "floor": 0.5, **weights}))
    d = ev.evaluate(FrameBatch(boxes=model, human_boxes=human))
    want = error_probability(box_error_features(model, human, floor=0.5),
                             [weights.get(f"w_{f}", 0.0) for f in BOX_FEATURES], weights["bias"])
    np.testing.assert_allclose(d.scores["learned_box_error"], want, atol=1e-9)
    assert d.keep.tolist() == [True, False, False]  # the human's second box is one the model missed
    assert TRIGGERS["learned_box_error"].task == "detect"
    with pytest.raises(SpecError, match="w_humna"):
        parse_spec(spec({"trigger": "learned_box_error", "above": 0.5, "w_humna": 1.0}))


def test_the_learned_box_error_count_runs_in_a_spec_and_reads_products_of_features() -> None:
    """``learned_box_error_count`` (what the hub ships for a detector) through parse_spec and the Evaluator: the
    expected number of box errors, exp(bias + w . features and their products two by two); a product's weight
    (w_human__human_known) acts only where both features are set, and the value is a count, not a chance."""
    from trigger.learned import BOX_COUNT_FEATURES, BOX_FEATURES, box_error_features, expected_count, with_pairs

    assert len(BOX_COUNT_FEATURES) == len(BOX_FEATURES) * (len(BOX_FEATURES) + 1) // 2
    obj, other = [0.2, 0.2, 0.5, 0.6], [0.6, 0.6, 0.9, 0.9]
    model = Boxes.from_frames([[obj], [obj], [obj, other]], scores=[[0.9], [0.9], [0.9, 0.45]],
                              labels=[[1], [1], [1, 0]])
    human = Boxes.from_frames([[obj, other], [obj], []], labels=[[1, 0], [1], []],
                              known=np.array([True, True, False]))
    weights = {"w_human__human_known": 30.0, "w_near_floor": 2.0, "bias": -3.0}
    ev = Evaluator(spec({"trigger": "learned_box_error_count", "above": 1.0, "floor": 0.5, **weights}))
    d = ev.evaluate(FrameBatch(boxes=model, human_boxes=human))
    x = box_error_features(model, human, floor=0.5)
    want = expected_count(with_pairs(x), [weights.get(f"w_{f}", 0.0) for f in BOX_COUNT_FEATURES], weights["bias"])
    got = d.scores["learned_box_error_count"]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the human missed-box frame: exp(-3 + 30 * human * 1); the agreed frame: exp(-3); the faint box: exp(-3 + 2 * .5)
    np.testing.assert_allclose(got, np.exp([-3.0 + 30.0 * x[0, 4], -3.0, -3.0 + 2.0 * x[2, 1]]), rtol=1e-12)
    assert got[0] > 1.0 > got[2] > got[1]
    assert d.keep.tolist() == [True, False, False]
    with pytest.raises(SpecError, match="w_human__human_knwon"):
        parse_spec(spec({"trigger": "learned_box_error_count", "above": 1.0, "w_human__human_knwon": 1.0}))


def test_the_score_bins_count_reported_boxes_by_fifths_and_only_isolated_boxes_under_the_floor() -> None:
    """trigger.learned.box_score_bins at floor 0.4: a reported box counts in the fifth of [0.4, 1] its score falls
    in; a box under the floor counts (in its quarter of the floor) only when it overlaps no reported box at IoU 0.3
    (a candidate missed object, not a duplicate of a found one); counts enter as 1 - 2**-c; a frame with no sound
    output reads nothing; a floor outside [0, 1] is refused with what was received."""
    from trigger.learned import SCORE_BINS, box_score_bins

    a, near_a, b, c = [0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.2, 0.21], [0.5, 0.5, 0.7, 0.7], [0.1, 0.1, 0.3, 0.3]
    boxes = Boxes.from_frames([[a, near_a, b, c], [], [a, b, c], [a]],
                              scores=[[0.9, 0.3, 0.35, 0.6], [], [0.12, 0.15, 0.55], [0.95]],
                              labels=[[0, 0, 1, 0], [], [0, 1, 0], [0]], known=np.array([True, True, True, False]))
    got = box_score_bins(boxes, floor=0.4)
    assert got.shape == (4, len(SCORE_BINS)) and SCORE_BINS[2] == "under_75" and SCORE_BINS[4] == "over_20"
    want = np.zeros((4, len(SCORE_BINS)))
    # frame 0: 0.9 in [0.88, 1]; 0.3 a duplicate of it (left out); 0.35 isolated, in [0.3, 0.4); 0.6 in [0.52, 0.64)
    want[0, [2, 4, 7]] = 0.5
    # frame 2: 0.12 and 0.15 both in [0.1, 0.2): neither overlaps the one reported box (0.55, in [0.52, 0.64))
    want[2, 0], want[2, 4] = 0.75, 0.5
    np.testing.assert_allclose(got, want)  # frame 1 has no boxes, frame 3 no sound output
    for bad in (1.5, -0.1, "0.4", None):
        with pytest.raises(ValueError, match=r"floor must be a number in \[0, 1\]; received"):
            box_score_bins(boxes, floor=bad)


def test_the_learned_box_error_hist_runs_in_a_spec_and_reads_the_score_bins() -> None:
    """``learned_box_error_hist`` (what the hub ships for a detector) through parse_spec and the Evaluator: the
    expected number of box errors over the box features, their products and the score bins
    (trigger.learned.box_hist_features), at the leaf's floor; a faint isolated box under the floor raises it."""
    from trigger.learned import BOX_COUNT_FEATURES, BOX_HIST_FEATURES, SCORE_BINS, box_hist_features, expected_count

    assert (*BOX_COUNT_FEATURES, *SCORE_BINS) == BOX_HIST_FEATURES
    obj, faint = [0.2, 0.2, 0.5, 0.6], [0.6, 0.6, 0.9, 0.9]
    model = Boxes.from_frames([[obj, faint], [obj], [obj, faint]], scores=[[0.9, 0.45], [0.9], [0.9, 0.2]],
                              labels=[[1, 0], [1], [1, 0]])
    weights = {"w_under_75": 3.0, "w_under_50": 1.0, "w_over_80": -0.5, "bias": -2.0}
    ev = Evaluator(spec({"trigger": "learned_box_error_hist", "above": 0.3, "floor": 0.5, **weights}))
    d = ev.evaluate(FrameBatch(boxes=model))
    want = expected_count(box_hist_features(model, floor=0.5),
                          [weights.get(f"w_{f}", 0.0) for f in BOX_HIST_FEATURES], weights["bias"])
    got = d.scores["learned_box_error_hist"]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # 0.45 is in [0.375, 0.5) of floor 0.5 (under_75), 0.2 in [0.125, 0.25) (under_25, no weight); 0.9 in over_80
    np.testing.assert_allclose(got, np.exp([-2.0 + 1.5 - 0.25, -2.0 - 0.25, -2.0 - 0.25]), rtol=1e-12)
    assert d.keep.tolist() == [True, False, False]
    with pytest.raises(SpecError, match="w_under_57"):
        parse_spec(spec({"trigger": "learned_box_error_hist", "above": 1.0, "w_under_57": 1.0}))
