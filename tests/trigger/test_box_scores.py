"""Per-box scores: the published definitions they reproduce (numbers worked by hand from each reference's
formula on the same arrays), the right direction as frames get harder, properties, and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trigger import (
    Boxes,
    ambiguous_boxes,
    box_disagreement,
    box_flicker,
    box_instability,
    box_uncertainty,
    localization_stability,
    softmax,
)

# two frames: one with two boxes, one with none (the frame every open-source scorer calls certain)
PROBS = [[0.5, 0.41, 0.09], [0.9, 0.05, 0.05]]
FRAMES = Boxes.from_frames([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.8, 0.9]], []], scores=[[0.1024, 0.8], []],
                           labels=[[0, 0], []], probs=[PROBS, np.zeros((0, 3))])


# -- published definitions ---------------------------------------------------------------------------------------


def test_lightly_detection_scorer_uncertainty_scores() -> None:
    """Lightly's ScorerObjectDetection: each box's ScorerClassification scores (uncertainty_entropy with log2,
    uncertainty_least_confidence = 1 - max p, uncertainty_margin = 1 - (p1 - p2)), each mapped linearly so that
    a one-hot prediction is 0 and a uniform one 1 (np.interp), reduced over the boxes with max; 0 without boxes."""
    h2 = [-(0.5 * math.log2(0.5) + 0.41 * math.log2(0.41) + 0.09 * math.log2(0.09)),
          -(0.9 * math.log2(0.9) + 2 * 0.05 * math.log2(0.05))]
    entropy = max(h / math.log2(3) for h in h2)  # interp(h, [0, log2 3], [0, 1])
    least_conf = max((1 - 0.5) / (1 - 1 / 3), (1 - 0.9) / (1 - 1 / 3))  # interp(1 - max, [0, 1 - 1/k], [0, 1])
    margin = max(1 - (0.5 - 0.41), 1 - (0.9 - 0.05))  # interp(1 - margin, [0, 1], [0, 1])
    np.testing.assert_allclose(box_uncertainty(FRAMES, measure="entropy", normalize=True), [entropy, 0.0])
    np.testing.assert_allclose(box_uncertainty(FRAMES, measure="least_confidence", normalize=True), [least_conf, 0.0])
    np.testing.assert_allclose(box_uncertainty(FRAMES, measure="margin"), [margin, 0.0])
    np.testing.assert_allclose([entropy, least_conf, margin], [0.845470, 0.75, 0.91], atol=1e-6)


def test_lightly_objectness_least_confidence_and_sedna_threshold_filter() -> None:
    """Lightly's objectness_least_confidence is 1 - mean(box scores), 0 without boxes; Sedna's ThresholdFilter
    calls a frame hard when the mean box score is under its threshold, i.e. when 1 - mean is over 1 - threshold."""
    lightly = [1 - (0.1024 + 0.8) / 2, 0.0]  # = [0.5488, 0]
    np.testing.assert_allclose(box_uncertainty(FRAMES, measure="low_score", reduce="mean"), lightly)
    np.testing.assert_allclose(lightly[0], 0.5488)
    sedna_threshold = 0.5
    mean_score = (0.1024 + 0.8) / 2
    sedna_hard = mean_score < sedna_threshold
    assert sedna_hard == (box_uncertainty(FRAMES, measure="low_score", reduce="mean")[0] > 1 - sedna_threshold)


def test_sedna_ibt_hard_coefficient() -> None:
    """Sedna's IBTFilter: hard coefficient = #boxes scoring <= threshold_box / #boxes; hard when it is
    >= 1 - threshold_img. The same is the share of boxes in the band [0, threshold_box] with floor 0."""
    scores = [0.9, 0.45, 0.3, 0.7, 0.5]
    b = Boxes.from_frames([[[0, 0, 0.1, 0.1]] * 5], scores=[scores])
    coefficient = sum(s <= 0.5 for s in scores) / len(scores)  # 0.45, 0.3 and 0.5: 3 of 5
    assert coefficient == 0.6
    np.testing.assert_allclose(ambiguous_boxes(b, threshold=0.25, band=0.25, floor=0.0), [coefficient])
    np.testing.assert_allclose(ambiguous_boxes(b, threshold=0.25, band=0.25, floor=0.0, share=False), [3.0])


def test_sedna_cross_entropy_filter_confidence() -> None:
    """Sedna's CrossEntropyFilter: confidence = 1 + sum p log p / log k (1 for a one-hot prediction, 0 for a
    uniform one); normalised box entropy is 1 - that confidence."""
    for p in ([0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [1 / 3] * 3):
        confidence = 1 + sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))
        one = Boxes.from_frames([[[0, 0, 1, 1]]], probs=[[p]])
        np.testing.assert_allclose(box_uncertainty(one, normalize=True), [1 - confidence], atol=1e-12)


def test_kao_localization_stability() -> None:
    """Kao et al. 2018, section 3.2: S_B(B_j) = mean over noisy copies of the best IoU of B_j with a box of the
    copy (0 when it has none); S_I = sum_j P(B_j) S_B(B_j) / sum_j P(B_j)."""
    ref = Boxes.from_frames([[[0.0, 0.0, 0.2, 0.2], [0.4, 0.4, 0.6, 0.6]], []], scores=[[0.9, 0.6], []])
    noisy_1 = Boxes.from_frames([[[0.0, 0.0, 0.2, 0.1], [0.4, 0.4, 0.6, 0.6]], [[0, 0, 0.1, 0.1]]])
    noisy_2 = Boxes.from_frames([[[0.1, 0.0, 0.3, 0.2]], []])
    s_b1 = (0.5 + 1 / 3) / 2  # IoU 0.02/0.04 in copy 1; 0.02/0.06 in copy 2
    s_b2 = (1.0 + 0.0) / 2  # in place in copy 1; nothing near it in copy 2
    s_i = (0.9 * s_b1 + 0.6 * s_b2) / (0.9 + 0.6)
    assert s_i == pytest.approx(0.45)
    got = localization_stability(ref, [noisy_1, noisy_2])
    np.testing.assert_allclose(got[0], s_i)
    assert np.isnan(got[1])  # no reference box: the paper gives such an image no score


def test_disagreement_is_one_minus_voc_f1() -> None:
    """PASCAL VOC criterion: a detection is a true positive when it overlaps an unclaimed ground-truth box of
    its class with IoU >= 0.5; F1 = 2PR / (P + R)."""
    human = Boxes.from_frames([[[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.8, 0.8, 0.9, 0.9]]], labels=[[0, 1, 0]])
    model = Boxes.from_frames([[[0, 0, 0.2, 0.19], [0.5, 0.5, 0.7, 0.7], [0.3, 0.3, 0.4, 0.4]]],
                              scores=[[0.9, 0.8, 0.7]], labels=[[0, 0, 1]])
    tp, fp, fn = 1, 2, 2  # d1 finds g1; d2 sits on g2 with the wrong class; d3 finds nothing; g3 is missed
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    got = box_disagreement(model, human)
    np.testing.assert_allclose(got.score, [1 - f1])
    assert (got.matched.tolist(), got.flips.tolist(), got.missed.tolist(), got.extra.tolist()) == ([1], [1], [1], [1])
    no_classes = box_disagreement(model, human, classes=False)  # the flip now counts as found
    np.testing.assert_allclose(no_classes.score, [1 - 2 * 2 / 6])


# -- frames with nothing found are not certain ---------------------------------------------------------------------


def test_a_frame_with_no_box_where_the_other_side_has_some_scores_one() -> None:
    model = Boxes.from_frames([[], [], [[0, 0, 0.5, 0.5]]], scores=[[], [], [0.9]])
    human = Boxes.from_frames([[[0, 0, 0.5, 0.5]], [], []], known=np.array([True, True, False]))
    got = box_disagreement(model, human)
    assert got.score[0] == 1.0 and got.missed[0] == 1  # the model missed the only object
    assert got.score[1] == 0.0  # nothing there, nothing found: agreement
    assert np.isnan(got.score[2]) and got.extra[2] == 0  # the human did not label this frame
    assert box_uncertainty(model, measure="low_score").tolist()[:2] == [0.0, 0.0]  # uncertainty never sees a miss
    vanished = box_flicker(Boxes.from_frames([[[0, 0, 0.5, 0.5]], []]), [7, 7])
    assert np.isnan(vanished.score[0]) and vanished.score[1] == 1.0 and vanished.missed[1] == 1


# -- direction -----------------------------------------------------------------------------------------------------


def test_uncertainty_rises_as_box_class_distributions_flatten() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (40, 6))
    offsets = np.arange(0, 41, 4)  # 10 frames of 4 boxes
    xy = np.tile([0.1, 0.1, 0.2, 0.2], (40, 1))
    for measure in ("entropy", "margin", "least_confidence"):
        for reduce in ("max", "mean", "sum"):
            values = [box_uncertainty(Boxes(xy, np.full(40, 0.9), np.zeros(40, int), offsets,
                                            probs=softmax(logits, temperature=t)), measure=measure, reduce=reduce)
                      for t in (0.25, 1.0, 4.0, 16.0)]
            assert all(np.all(b > a) for a, b in zip(values, values[1:], strict=False)), (measure, reduce)
    low = [box_uncertainty(Boxes(xy, np.full(40, s), np.zeros(40, int), offsets), measure="low_score", reduce="max")
           for s in (0.9, 0.6, 0.3)]
    assert np.all(low[1] > low[0]) and np.all(low[2] > low[1])


def test_sum_grows_with_the_number_of_unsure_boxes_and_floor_leaves_weak_ones_out() -> None:
    p = [0.4, 0.35, 0.25]
    b = Boxes.from_frames([[[0, 0, 1, 1]] * c for c in (1, 2, 5)], scores=[[0.9] * c for c in (1, 2, 5)],
                          probs=[[p] * c for c in (1, 2, 5)])
    s = box_uncertainty(b, reduce="sum")
    assert s[0] < s[1] < s[2]
    np.testing.assert_allclose(box_uncertainty(b, reduce="max"), s[0])
    weak = Boxes.from_frames([[[0, 0, 1, 1], [0, 0, 1, 1]]], scores=[[0.2, 0.9]],
                             probs=[[[1 / 3] * 3, [0.98, 0.01, 0.01]]])
    assert box_uncertainty(weak, floor=0.5)[0] < box_uncertainty(weak, floor=0.0)[0]


def test_ambiguous_share_rises_as_scores_approach_the_operating_threshold() -> None:
    frames = [[0.95, 0.9, 0.85, 0.8], [0.95, 0.9, 0.55, 0.8], [0.95, 0.52, 0.55, 0.45], [0.5, 0.52, 0.55, 0.45]]
    b = Boxes.from_frames([[[0, 0, 1, 1]] * 4] * 4, scores=frames)
    share = ambiguous_boxes(b, threshold=0.5, band=0.1)
    np.testing.assert_allclose(share, [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(ambiguous_boxes(b, threshold=0.5, band=0.1, share=False), [0, 1, 3, 4])


def test_disagreement_and_flicker_rise_as_boxes_move_further() -> None:
    base = np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.8], [0.2, 0.6, 0.35, 0.9]])
    shifts = [0.0, 0.03, 0.06, 0.1, 0.2]
    moved = Boxes.from_frames([base + [d, 0, d, 0] for d in shifts])
    fixed = Boxes.from_frames([base] * len(shifts))
    dis = box_disagreement(moved, fixed).score
    assert dis[0] == 0.0 and dis[-1] == 1.0 and np.all(np.diff(dis) >= 0)
    stream = Boxes.from_frames([base + [d, 0, d, 0] for d in np.cumsum([0.0, *shifts])])  # accelerating motion
    inst = box_instability(stream, ["cam"] * (len(shifts) + 1))
    assert np.isnan(inst[0]) and inst[1] == pytest.approx(0.0) and np.all(np.diff(inst[1:]) > 0)
    flick = box_flicker(stream, ["cam"] * (len(shifts) + 1)).score
    assert flick[1] == 0.0 and flick[-1] == 1.0 and np.all(np.diff(flick[1:]) >= 0)


def test_flicker_counts_appear_vanish_jump_and_flip_per_stream() -> None:
    a, b, c = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.52, 0.5, 0.72, 0.7]
    frames = Boxes.from_frames([[a], [a, b], [a, c], [a], [a], [b]], labels=[[0], [0, 1], [2, 1], [2], [0], [0]])
    stream = ["x", "x", "x", "x", "y", "y"]
    got = box_flicker(frames, stream)
    assert np.isnan(got.score[0]) and np.isnan(got.score[4])  # the first frame of each stream
    assert got.extra[1] == 1 and got.missed[1] == 0  # b appeared
    assert got.flips[2] == 1 and got.matched[2] == 1  # a changed class, b moved a little (IoU 0.82)
    assert got.missed[3] == 1  # c vanished
    assert got.extra[5] == 1 and got.missed[5] == 1  # y: a jumped to b (no overlap)
    np.testing.assert_allclose(got.score[[1, 2, 3, 5]], [1 - 2 / 3, 1 - 2 / 4, 1 - 2 / 3, 1.0])
    # interleaved streams give the same values as the streams fed apart
    order = [0, 4, 1, 5, 2, 3]
    mixed = box_flicker(frames.take(order), [stream[i] for i in order])
    np.testing.assert_array_equal(mixed.score, got.score[order])


def test_flicker_skips_a_predecessor_too_old_or_out_of_order() -> None:
    frames = Boxes.from_frames([[[0, 0, 0.2, 0.2]], [[0.5, 0.5, 0.7, 0.7]], [[0, 0, 0.2, 0.2]], []])
    ts = [0.0, 0.1, 5.0, 4.0]
    got = box_flicker(frames, [1, 1, 1, 1], timestamps=ts, max_gap=1.0).score
    assert np.isnan(got[0]) and got[1] == 1.0 and np.isnan(got[2]) and np.isnan(got[3])
    assert box_flicker(frames, [1, 1, 1, 1], timestamps=ts).score[2] == 1.0  # no max_gap: only order counts


# -- properties ----------------------------------------------------------------------------------------------------

coord = st.floats(0.0, 0.75, allow_nan=False)
box = st.tuples(coord, coord, st.floats(0.01, 0.25), st.floats(0.01, 0.25)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])
frame = st.lists(st.tuples(box, st.integers(0, 2), st.floats(0.0, 1.0)), max_size=6)


def _boxes(frames: list) -> Boxes:
    return Boxes.from_frames([[b for b, _, _ in f] for f in frames], labels=[[c for _, c, _ in f] for f in frames],
                             scores=[[s for _, _, s in f] for f in frames])


@settings(max_examples=60, deadline=None)
@given(st.lists(frame, min_size=1, max_size=4), st.lists(frame, min_size=1, max_size=4),
       st.sampled_from([0.3, 0.5, 0.7]), st.sampled_from([0.0, 0.5]))
def test_disagreement_properties(fa: list, fb: list, iou: float, floor: float) -> None:
    n = min(len(fa), len(fb))
    a, b = _boxes(fa[:n]), _boxes(fb[:n])
    ab, ba = box_disagreement(a, b, iou=iou, floor=floor), box_disagreement(b, a, iou=iou, floor=floor)
    assert np.all((ab.score >= 0) & (ab.score <= 1))
    np.testing.assert_allclose(ab.score, ba.score)  # symmetric: the same pairs match either way round
    assert ab.missed.tolist() == ba.extra.tolist() and ab.matched.tolist() == ba.matched.tolist()
    same = box_disagreement(a, a, iou=iou, floor=floor)
    assert same.score.tolist() == [0.0] * n and same.flips.tolist() == [0] * n


@settings(max_examples=40, deadline=None)
@given(st.lists(frame, min_size=1, max_size=6))
def test_a_still_stream_never_flickers(frames: list) -> None:
    f = frames[0]
    b = _boxes([f] * len(frames))
    assert np.nan_to_num(box_flicker(b, [0] * len(frames)).score).tolist() == [0.0] * len(frames)
    inst = box_instability(b, [0] * len(frames))
    assert np.all(np.nan_to_num(inst[1:]) <= 1e-12) and np.isnan(inst[0])


# -- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: box_uncertainty([[0, 0, 1, 1]]), "boxes must be trigger.Boxes .*received list"),
        (lambda: box_uncertainty(FRAMES, measure="var"), "measure must be one of 'entropy', .*received 'var'"),
        (lambda: box_uncertainty(FRAMES, reduce="min"), "reduce must be one of 'max', 'mean', 'sum'; received 'min'"),
        (lambda: box_uncertainty(FRAMES, floor=1.5), r"floor must be a number in \[0, 1\]; received 1.5"),
        (lambda: box_uncertainty(FRAMES, normalize=1), "normalize must be true or false; received int"),
        (lambda: box_uncertainty(Boxes.from_frames([[[0, 0, 1, 1]]])), "needs each box's class distribution"),
        (lambda: ambiguous_boxes(FRAMES, band="wide"), "band must be a number"),
        (lambda: box_disagreement(FRAMES, Boxes.empty(3)), "same 2 frames; received Boxes of 3 frames"),
        (lambda: box_disagreement(FRAMES, FRAMES, iou=0.0), r"iou must be a number in \(0, 1\]"),
        (lambda: box_flicker(FRAMES, [1]), r"shape \(2,\); received list of length 1|received array of shape \(1,\)"),
        (lambda: box_flicker(FRAMES, [0.5, 1.5]), "integers or strings"),
        (lambda: box_flicker(FRAMES, [1, 1], timestamps=[0.0]), r"timestamps must have shape \(2,\)"),
        (lambda: box_flicker(FRAMES, [1, 1], max_gap=-1), "max_gap must be a number of seconds > 0"),
        (lambda: localization_stability(FRAMES, FRAMES), "non-empty list of Boxes"),
        (lambda: localization_stability(FRAMES, [Boxes.empty(1)]), r"perturbed\[0\] must describe the same 2 frames"),
    ],
)
def test_bad_input_is_refused_with_what_was_received(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()
