"""The detection demo's world: scenes with true boxes under edge conditions, the human's boxes with a person's
errors, frames that keep their boxes through take/concat/save, and the agent's npz source reading them back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fleet.consensus import detection_f1
from fleet.edge.sources import NpzSource
from fleet.errors import InvalidInput
from fleet.inference.runtime import Outputs
from fleet.protocol import Box, Detection
from fleet.sim.agents import box_errors
from fleet.sim.conditions import CLEAR, CONDITIONS, apply_conditions
from fleet.sim.detect_world import SceneFrames, build_scene_world, to_detection
from fleet.sim.resume import load_frames, save_frames
from trigger.boxes import Boxes


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return build_scene_world(seed=3, seed_size=60, test_per_condition=4)


def test_the_world_has_a_mostly_clear_seed_set_and_every_condition_in_test(world) -> None:  # type: ignore[no-untyped-def]
    assert len(world.seed_set) == 60 and world.seed_set.n_boxes >= 60
    assert (world.seed_set.conditions == CLEAR).mean() > 0.8
    assert sorted(set(world.test_set.conditions.tolist())) == sorted([CLEAR, *CONDITIONS])
    assert len(world.test_set) == 4 * (1 + len(CONDITIONS)) and world.class_names == [str(d) for d in range(10)]
    boxes, labels = world.test_set.truth(0)
    assert boxes.shape == (len(labels), 4) and (boxes[:, :2] < boxes[:, 2:]).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()


def test_a_turns_stream_registers_its_truth_and_a_humans_boxes_are_nearly_right(world) -> None:  # type: ignore[no-untyped-def]
    frames = world.stream(1, 200)
    assert len(frames) == 200 and len(set(frames.frame_ids.tolist())) == 200
    assert 0.35 < frames.human_known.mean() < 0.65 and not (frames.human_box_frame[:, None] == np.flatnonzero(
        ~frames.human_known)[None, :]).any()
    f1 = []
    for i in np.flatnonzero(frames.human_known):
        truth = world.label(str(frames.frame_ids[i]))
        assert truth == to_detection(*frames.truth(i))
        mine = frames.human_box_frame == i
        human = Detection([Box(*map(float, r[:4]), int(r[4])) for r in frames.human_boxes[mine]])
        f1.append(detection_f1(human, truth))
    assert 0.85 < float(np.mean(f1)) < 1.0  # a person's misses, jitter and rare wrong classes, not noise
    assert world.answer(str(frames.frame_ids[0])) == world.truth[str(frames.frame_ids[0])].to_dict()


def test_frames_keep_their_boxes_through_take_concat_and_save(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    frames = world.stream(2, 30)
    picked = frames.take(np.array([7, 2, 7, 29]))
    for j, i in enumerate([7, 2, 7, 29]):
        assert np.array_equal(picked.truth(j)[0], frames.truth(i)[0])
        assert np.array_equal(picked.human_boxes[picked.human_box_frame == j],
                              frames.human_boxes[frames.human_box_frame == i])
    both = SceneFrames.concat([picked, frames.take(np.array([0]))])
    assert len(both) == 5 and np.array_equal(both.truth(4)[1], frames.truth(0)[1])
    assert (np.diff(both.box_frame) >= 0).all()
    back = load_frames(save_frames(both, tmp_path / "picks.npz"))
    assert isinstance(back, SceneFrames) and np.array_equal(back.boxes, both.boxes)
    assert np.array_equal(back.human_known, both.human_known)

    from training.detect.data import load_box_npz

    splits = load_box_npz(both.save_training(tmp_path / "train.npz", test=picked, class_names=world.class_names))
    assert len(splits.train) == 5 and splits.test is not None and len(splits.test) == 4
    assert np.allclose(splits.train.boxes[4], frames.truth(0)[0]) and splits.class_names == world.class_names
    assert splits.train.tags[0] == {"condition": str(both.conditions[0])}


def test_the_agents_npz_source_reads_the_humans_boxes(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    frames = world.stream(3, 40)
    out = list(NpzSource(frames.save_shard(tmp_path / "shard.npz")))
    for i, f in enumerate(out):
        if not frames.human_known[i]:
            assert f.human_boxes is None
            continue
        rows = frames.human_boxes[frames.human_box_frame == i]
        assert f.human_boxes is not None and len(f.human_boxes.boxes) == len(rows)
        assert [b.label for b in f.human_boxes.boxes] == rows[:, 4].astype(int).tolist()
        assert f.tags["frame"] == frames.frame_ids[i]


def test_the_npz_source_refuses_bad_human_boxes(tmp_path: Path) -> None:
    images = np.zeros((3, 8, 8), np.uint8)
    good = dict(images=images, human_boxes=np.array([[0.1, 0.1, 0.5, 0.5, 1]], np.float32),
                human_box_frame=np.array([1]), human_known=np.array([False, True, False]))

    def refused(**arrays: object) -> str:
        np.savez(tmp_path / "x.npz", **arrays)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput) as err:
            NpzSource(tmp_path / "x.npz")
        return str(err.value)

    assert "need all of" in refused(**{k: v for k, v in good.items() if k != "human_known"})
    assert "(t, 5)" in refused(**{**good, "human_boxes": np.zeros((1, 4), np.float32)})
    assert "frame indices in [0, 3)" in refused(**{**good, "human_box_frame": np.array([3])})
    assert "'human_known' is false there" in refused(**{**good, "human_known": np.array([True, False, False])})
    assert "x.npz[1]" in refused(**{**good, "human_boxes": np.array([[0.5, 0.1, 0.2, 0.5, 1]], np.float32)})
    np.savez(tmp_path / "ok.npz", **good)  # type: ignore[arg-type]
    assert [f.human_boxes is not None for f in NpzSource(tmp_path / "ok.npz")] == [False, True, False]


def test_conditions_scale_with_the_object_size() -> None:
    """On a scene, rain, blur and occlusion are sized by an object's side, not the frame's: the objects stay
    partly visible; without ``unit`` (a classifier's frame is one object) they are as before."""
    frames = np.full((4, 96, 96), 30, np.uint8)
    whole = apply_conditions(frames, ["rain"] * 4, seed=0)
    scene = apply_conditions(frames, ["rain"] * 4, seed=0, unit=24)
    assert (scene > 200).mean() < 0.5 * (whole > 200).mean()
    occl = apply_conditions(np.full((2, 96, 96), 200, np.uint8), ["occlusion"] * 2, seed=0, unit=24)
    assert 0 < (occl[0] < 50).mean() < 0.03


def _runtime(found: list[list[tuple[float, float, float, float, int, float]]]) -> SimpleNamespace:
    """A stand-in runtime whose detector reports ``found`` (per frame: x1, y1, x2, y2, class, score)."""
    boxes = Boxes.from_frames([np.array([f[:4] for f in fr], np.float64).reshape(-1, 4) for fr in found],
                              scores=[[f[5] for f in fr] for fr in found], labels=[[f[4] for f in fr] for fr in found])

    def run(images: list[np.ndarray]) -> Outputs:
        assert len(images) == len(found)
        return Outputs(logits=None, embedding=np.zeros((len(found), 2), np.float32), detections=boxes)

    return SimpleNamespace(run=run, manifest=SimpleNamespace(detector=SimpleNamespace(operating_threshold=0.5)))


def test_box_errors_count_missed_wrong_and_extra_boxes() -> None:
    truth = [np.array([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[0.2, 0.2, 0.5, 0.5]], np.float32)]
    labels = [np.array([1, 2]), np.zeros(0, np.int64), np.array([0])]
    frames = SceneFrames(np.zeros((3, 8, 8), np.uint8), np.concatenate(truth), np.concatenate(labels),
                         np.array([0, 0, 2]), np.array(["clear"] * 3), np.array(["a", "b", "c"]),
                         np.zeros(3, bool), np.zeros((0, 5), np.float32), np.zeros(0, np.int64))
    rt = _runtime([
        [(0.1, 0.1, 0.3, 0.3, 1, 0.9), (0.6, 0.6, 0.9, 0.9, 3, 0.8)],  # one right, one of the wrong class
        [(0.4, 0.4, 0.6, 0.6, 0, 0.7), (0.1, 0.1, 0.2, 0.2, 0, 0.2)],  # an extra box; one under the threshold
        [],  # the object missed entirely
    ])
    assert box_errors(rt, frames).tolist() == [1, 1, 1]
