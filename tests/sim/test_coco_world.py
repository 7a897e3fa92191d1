"""The detection demo's world from a COCO-format folder (`flywheel demo --task detect --dataset PATH`): the folder's
images and boxes split into test, seed and stream scenes, classes from its categories, the stream drawing from
its own images only, and a folder too small for the three parts refused with the counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.sim.conditions import CLEAR, CONDITIONS
from fleet.sim.detect_world import build_coco_world, coco_side
from fleet.sim.settings import DemoSettings
from tests.support.coco import NAMES, scene_truth, write_scene_coco


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scene_coco(tmp_path_factory.mktemp("coco"), 60, seed=4)


def _key(image: np.ndarray) -> bytes:
    return np.ascontiguousarray(image).tobytes()


def test_the_folders_images_split_into_test_seed_and_stream_with_their_boxes(folder: Path) -> None:
    world = build_coco_world(folder, seed=1, seed_size=None, test_per_condition=8)
    truth = scene_truth(60, seed=4)
    assert world.class_names == NAMES and world.size == 96 and world.source.startswith("the COCO folder")
    assert len(world.test_set) == 8 * (1 + len(CONDITIONS)) and len(world.seed_set) == 24  # 40% of 60
    assert world.pool is not None and len(world.pool) == 60 - 8 - 24
    assert sorted(set(world.test_set.conditions.tolist())) == sorted([CLEAR, *CONDITIONS])
    assert (world.seed_set.conditions == CLEAR).mean() > 0.5
    # the clear test scenes are the folder's own images, with the boxes and classes its annotations give
    by_pixels = {_key(im): i for i, im in enumerate(truth.images)}
    clear = np.flatnonzero(world.test_set.conditions == CLEAR)
    test_sources = set()
    for row in clear:
        i = by_pixels[_key(world.test_set.images[row])]
        test_sources.add(i)
        boxes, labels = world.test_set.truth(int(row))
        np.testing.assert_allclose(boxes, truth.boxes[i], atol=1e-6)
        assert labels.tolist() == truth.labels[i].tolist()  # category 11 + d -> class d ("zero".."nine")
    # the three parts use disjoint images, and the fleet's stream draws from its part only
    pool = {by_pixels[_key(im)] for im in world.pool.images}
    assert not test_sources & pool
    frames = world.stream(1, 50)  # more than the pool holds: images come again, under other conditions
    assert len(frames) == 50 and 0 < frames.human_known.sum() < 50
    first = world.stream(2, 10)
    assert len(first.frame_ids) == 10 and set(world.truth) >= set(first.frame_ids.tolist())


def test_an_rgb_folder_stays_rgb_and_the_side_follows_the_images(tmp_path: Path) -> None:
    world = build_coco_world(write_scene_coco(tmp_path, 30, rgb=True, size=80), seed=0, seed_size=8,
                             test_per_condition=3)
    assert world.size == 64 and world.seed_set.images.shape == (8, 64, 64, 3)
    assert world.stream(1, 5).images.shape == (5, 64, 64, 3)
    assert coco_side(480, 640) == 128 and coco_side(40, 90) == 32


def test_a_folder_too_small_for_test_seed_and_stream_is_refused_with_the_counts(folder: Path) -> None:
    with pytest.raises(ValueError, match=r"60 images are too few .* a seed set \(50\)"):
        build_coco_world(folder, seed=0, seed_size=50, test_per_condition=10)


def test_the_demo_takes_a_coco_folder_for_detection_and_refuses_anything_else(folder: Path, tmp_path: Path) -> None:
    DemoSettings(workspace=tmp_path / "ws", task="detect", dataset=str(folder)).validate()
    DemoSettings(workspace=tmp_path / "ws", task="detect", dataset=str(folder / "annotations.json")).validate()
    with pytest.raises(ValueError, match="COCO-format folder .* is neither"):
        DemoSettings(workspace=tmp_path / "ws", task="detect", dataset=str(tmp_path)).validate()
