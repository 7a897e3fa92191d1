"""The detection error-capture benchmark's headroom rows on hand-worked frames: the shift and the shift
consistency of a detector that follows the object, and of one that does not."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.benchmarks import load_bench
from trigger.boxes import Boxes

becd = load_bench("bench_error_capture_detect")
SIZE = 32


def test_shifted_moves_the_content_right_and_down_and_repeats_the_edge() -> None:
    img = np.zeros((1, SIZE, SIZE), np.uint8)
    img[0, 10, 20] = 255
    img[0, :, 0] = 7  # the left edge, repeated into the gap
    out = becd.shifted(img, 4, 4)
    assert out.shape == img.shape and out[0, 14, 24] == 255 and int((out == 255).sum()) == 1
    assert (out[0, 4:, :4] == 7).all()


class Bright:
    """Finds the one bright pixel of each frame and reports an 8-pixel box around it (normalized), or, with
    ``fixed``, always the same box wherever the object is."""

    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed

    def run(self, images: list[np.ndarray]) -> Any:
        boxes = []
        for im in images:
            y, x = (10, 20) if self.fixed else np.unravel_index(int(np.argmax(im)), im.shape)
            boxes.append(np.array([[x - 4, y - 4, x + 4, y + 4]], np.float64) / SIZE)
        return SimpleNamespace(detections=Boxes.from_frames(boxes, scores=[np.array([0.9])] * len(images),
                                                            labels=[np.array([1])] * len(images)),
                               embedding=np.zeros((len(images), 4), np.float32))  # as the runtime's Outputs


@pytest.mark.parametrize(("fixed", "count", "score"), [(False, 0.0, 0.0), (True, 2 / 8, 1.0)])
def test_shift_consistency_counts_the_boxes_that_do_not_follow_the_object(fixed: bool, count: float,
                                                                         score: float) -> None:
    images = np.zeros((3, SIZE, SIZE), np.uint8)
    for i, (y, x) in enumerate([(10, 20), (12, 12), (20, 8)]):
        images[i, y, x] = 255
    rt = Bright(fixed)
    found = rt.run(list(images)).detections
    got = becd.shift_consistency(rt, images, found, 0.5)
    # a box that follows its object comes back in place; one that stays put lands 4 px off on each axis after
    # the shift is undone (IoU 16 / 112 < 0.5): one box missed and one extra
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got[:, 0], count)
    np.testing.assert_allclose(got[:, 1], score)


def test_the_base_detector_trains_as_many_epochs_as_the_demos_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.sim.settings import TASK_DEFAULTS

    with pytest.raises(SystemExit) as done:
        becd.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"the base detector's epochs (default: the detection demo's base model's, " \
           f"{TASK_DEFAULTS['detect']['base_epochs']})" in text


def test_image_statistics_tell_a_dark_flat_frame_from_a_bright_sharp_one() -> None:
    flat = np.full((SIZE, SIZE), 40, np.uint8)
    checker = (np.indices((SIZE, SIZE)).sum(axis=0) % 2 * 255).astype(np.uint8)  # every neighbour differs by 255
    got = becd.image_statistics(np.stack([flat, checker]))
    assert got.shape == (2, 3) and ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got[0], [40 / 255, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(got[1], [0.5, 1.0, 1.0])  # std 0.5 -> contrast 1; sharpness 4 * 2, capped
    rgb = becd.image_statistics(np.repeat(np.stack([flat, checker])[..., None], 3, axis=3))
    np.testing.assert_allclose(rgb, got)  # colour frames: their grey levels


def test_conditions_onehot_puts_one_in_each_frames_condition_column() -> None:
    got = becd.conditions_onehot(np.array(["fog", "clear", "fog"]), ["clear", "fog", "night"])
    np.testing.assert_array_equal(got, [[0, 1, 0], [1, 0, 0], [0, 1, 0]])


def test_a_frame_column_that_counts_the_errors_lifts_its_fit_to_the_oracles_order() -> None:
    """headroom_scores: a column added through ``frame`` enters the Poisson fit, and a column that carries the errors
    ranks the measured stream's frames by them."""
    rng = np.random.default_rng(0)
    n = 60
    boxes = Boxes.from_frames([np.array([[0.1, 0.1, 0.4, 0.4]])] * n, scores=[np.array([0.6])] * n,
                              labels=[np.array([1])] * n)
    human = Boxes.from_frames([np.zeros((0, 4))] * n, labels=[np.zeros(0, np.int64)] * n, known=np.zeros(n, bool))
    fit_errors, errors = rng.poisson(1.0, n).astype(np.float64), rng.poisson(1.0, n).astype(np.float64)
    col = (fit_errors / 4.0)[:, None], (errors / 4.0)[:, None]
    noise = rng.random((n, 2)), rng.random((n, 2))
    out = becd.headroom_scores(boxes, human, fit_errors, boxes, human, 0.5, shift=noise,
                               frame={becd.NOVELTY_FIT: col})
    assert set(out) == {becd.SHIFT_ALONE, becd.SHIFT_FIT, becd.TREES, becd.NOVELTY_FIT}
    assert all(v.shape == (n,) for v in out.values())
    assert becd.capture(out[becd.NOVELTY_FIT], errors, 0.1) == becd.capture(errors, errors, 0.1)


def _frames(wrong: np.ndarray, *, moved: bool) -> Boxes:
    """One 0.9 box a frame; with ``moved``, the frames in ``wrong`` get it 8 px off (IoU 1/7 with the other)."""
    boxes = [np.array([[10 + 8 * (moved and w), 10, 18 + 8 * (moved and w), 18]], np.float64) / SIZE for w in wrong]
    return Boxes.from_frames(boxes, scores=[np.array([0.9])] * len(wrong), labels=[np.array([1])] * len(wrong))


def test_a_shadow_challenger_ranks_the_frames_it_disagrees_on_first() -> None:
    """A challenger that moves the box on exactly the frames where the model is wrong: its disagreement alone
    counts two boxes there (one missed, one extra) and none elsewhere, and the learned trigger fitted with its
    boxes on one stream puts those frames of another stream first."""
    rng = np.random.default_rng(0)
    fit_wrong, wrong = rng.random(200) < 0.3, rng.random(100) < 0.3
    got = becd.challenger_scores(_frames(fit_wrong, moved=False), None, fit_wrong.astype(np.float64),
                                 _frames(fit_wrong, moved=True), _frames(wrong, moved=False), None,
                                 _frames(wrong, moved=True), 0.5)
    np.testing.assert_array_equal(got[becd.CHALLENGER_ALONE], np.where(wrong, 2.0, 0.0))
    fitted = got[becd.CHALLENGER_FIT]
    assert fitted[wrong].min() > fitted[~wrong].max()
    assert becd.capture(fitted, wrong.astype(np.float64), 0.10) == pytest.approx(10 / wrong.sum())


def test_a_stronger_challengers_extra_scenes_are_none_of_the_measured_or_fitted_ones() -> None:
    from fleet.sim.detect_world import build_scene_world

    world = build_scene_world(seed=0, seed_size=12, test_per_condition=1)
    measured, fitted = world.stream(1, 40), world.stream(2, 40)
    got = becd.challenger_frames(world, 40)
    assert len(got) == len(world.seed_set) + 40

    def scenes(frames: Any) -> set[bytes]:
        return {b.round(6).tobytes() for b in frames.truth_lists()[0]}

    extra = scenes(got.take(np.arange(len(world.seed_set), len(got))))
    assert len(extra) == 40 and not extra & scenes(measured) and not extra & scenes(fitted)
    # the trap it avoids: a fresh world's first draw is the measured stream's scenes
    again = build_scene_world(seed=0, seed_size=12, test_per_condition=1)
    assert scenes(again.stream(becd.CHALLENGER_STREAM, 40)) == scenes(measured)


def test_only_frames_the_campaign_fired_on_are_uploaded() -> None:
    priority = np.array([0.0, 0.9, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    errors = np.array([5.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    # a 50% budget allows 5 frames, but the campaign fired on 2: frame 0's errors are not uploaded
    assert becd.capture_uploaded(priority, errors, 0.5) == pytest.approx(3 / 10)
    assert becd.capture_uploaded(priority, errors, 0.1) == pytest.approx(1 / 10)
    assert becd.capture(priority, errors, 0.5) == pytest.approx(8 / 10)  # the plain ranking takes unfired frames too


def _campaign_frames(n: int, rng: np.random.Generator) -> tuple[Boxes, Boxes]:
    """Detector boxes on n frames, one sure box each (frames 7, 107, ... also an unsure one), and the human's
    boxes: the same sure box, plus one the model missed on frames 4, 104, ... ; known on even frames only."""
    box = np.array([[0.1, 0.1, 0.3, 0.3]])
    other = np.array([[0.6, 0.6, 0.8, 0.8]])
    probs, scores, boxes, human = [], [], [], []
    for f in range(n):
        unsure = f % 100 == 7
        boxes.append(np.vstack([box, other]) if unsure else box)
        p = [np.array([0.97, 0.01, 0.01, 0.01])] + ([np.array([0.3, 0.3, 0.2, 0.2])] if unsure else [])
        probs.append(np.array(p))
        scores.append(np.array([0.9, 0.45][:len(p)]) + rng.uniform(0, 0.01, len(p)))
        human.append(np.vstack([box, other]) if f % 100 == 4 else box)
    labels = [np.zeros(len(s), np.int64) for s in scores]
    model = Boxes.from_frames(boxes, scores=scores, labels=labels, probs=probs)
    people = Boxes.from_frames(human, labels=[np.zeros(len(h), np.int64) for h in human],
                               known=np.arange(n) % 2 == 0)
    return model, people


def test_the_shipped_campaign_puts_frames_the_human_disagrees_on_first_and_skips_quiet_ones() -> None:
    rng = np.random.default_rng(0)
    fit_model, fit_human = _campaign_frames(400, rng)
    model, human = _campaign_frames(400, rng)
    prio = becd.shipped_campaign(fit_model, fit_human, model, human, 0.5, 0.05)
    assert prio.shape == (400,)
    disagree = np.arange(400) % 100 == 4  # known (even) frames where the human has a box the model missed
    unsure = np.arange(400) % 100 == 7
    assert (prio[disagree] > 0).all() and (prio[disagree].min() > prio[~disagree].max())
    assert (prio[unsure] > 0).all()  # the least certain boxes fire the calibrated entropy leaf
    quiet = ~disagree & ~unsure
    assert (prio[quiet] == 0).all()  # frames with one sure box, agreed on or not seen by a human: not uploaded


def test_box_geometry_reads_the_reported_boxes_by_hand() -> None:
    """Frame 0: two reported boxes overlapping (IoU 1/3), a small one at the edge, a suppressed candidate beside
    one; frame 1: one box alone; frame 2: nothing reported."""
    op = 0.4
    boxes = Boxes.from_frames(
        [np.array([[0.2, 0.2, 0.6, 0.6], [0.4, 0.2, 0.8, 0.6], [0.0, 0.9, 0.1, 1.0], [0.21, 0.2, 0.6, 0.6]]),
         np.array([[0.3, 0.3, 0.7, 0.7]]), np.array([[0.3, 0.3, 0.7, 0.7]])],
        scores=[np.array([0.9, 0.8, 0.5, 0.3]), np.array([0.95]), np.array([0.1])],
        probs=[np.array([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4], [0.5, 0.5]]), np.array([[1.0, 0.0]]),
               np.array([[0.5, 0.5]])])
    g = becd.box_geometry(boxes, op)
    assert g.shape == (3, 5)
    assert g[0] == pytest.approx([0.9, 1 / 3, 0.5, 0.5, 0.4])  # smallest 0.1 x 0.1; the 0.3 box beside the first
    assert g[1] == pytest.approx([0.6, 0.0, 0.0, 0.0, 0.0])
    assert g[2] == pytest.approx([0.0] * 5)


def test_error_kinds_tells_missed_boxes_with_and_without_a_candidate_from_wrong_ones() -> None:
    """Three true boxes: one found, one with a faint candidate under the threshold, one with nothing near it; and
    one reported box on empty ground."""
    op = 0.5
    truth = [np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.8]])]
    stream = SimpleNamespace(truth_lists=lambda: (truth, [np.array([0, 1, 2])]))
    found = Boxes.from_frames([np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.8, 0.0, 0.95, 0.1]])],
                              scores=[np.array([0.9, 0.2, 0.7])], labels=[np.array([0, 1, 2])])
    assert becd.error_kinds(found, stream, op) == (2, 1, 1)
