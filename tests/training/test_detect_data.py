"""Boxes in: the npz and COCO-folder loaders, hub snapshots of detect labels, and the errors each bad input gets
(what was received, what was expected)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fleet.errors import InvalidInput
from fleet.sim.scenes import digit_scenes
from tests.support.data import png_bytes
from tests.support.inproc import InProcHub
from training.detect.data import load_box_npz, load_coco, snapshot_to_boxset
from training.snapshot import pull_snapshot

from .conftest import add_detect_cases, trainer


def write_npz(path: Path, **override: np.ndarray) -> Path:
    s = digit_scenes(6, seed=2, size=32)
    arrays = {**s.to_npz_arrays(), "tags": np.array(["night", "", "day", "", "", ""]),
              "class_names": np.array(s.class_names), **override}
    np.savez(path, **arrays)
    return path


def test_box_npz_round_trip(tmp_path: Path) -> None:
    s = digit_scenes(6, seed=2, size=32)
    splits = load_box_npz(write_npz(tmp_path / "s.npz"))
    data = splits.train
    assert splits.test is None and splits.class_names == s.class_names
    assert data.shape == (1, 32, 32) and len(data) == 6 and data.n_boxes == sum(len(b) for b in s.boxes)
    assert all(np.allclose(a, b) for a, b in zip(data.boxes, s.boxes, strict=True))
    assert data.tags[0] == {"condition": "night"} and data.tags[1] == {}


@pytest.mark.parametrize(("override", "message"), [
    ({"boxes": np.array([[0.1, 0.1, 1.2, 0.5]] * 99, np.float32)}, r"box 0 is \[0.1, 0.1, 1.2, 0.5\]; expected "
                                                                   r"normalised x1, y1, x2, y2"),
    ({"box_labels": np.full(99, 12)}, r"box 0 has class 12; expected a class in \[0, 10\)"),
    ({"box_image": np.full(99, 9)}, r"box_image must index the 6 images; received range \[9, 9\]"),
    ({"boxes": np.zeros((99, 3), np.float32)}, r"boxes must be \(m, 4\)"),
])
def test_bad_boxes_in_an_npz_are_refused_with_the_values(tmp_path: Path, override: dict, message: str) -> None:
    n = len(np.load(write_npz(tmp_path / "ok.npz"))["boxes"])
    fixed = {k: v[:n] for k, v in override.items()}
    with pytest.raises(InvalidInput, match=message):
        load_box_npz(write_npz(tmp_path / "bad.npz", **fixed))


def test_an_npz_without_boxes_names_what_is_missing(tmp_path: Path) -> None:
    np.savez(tmp_path / "cls.npz", x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.array([0, 1]))
    with pytest.raises(InvalidInput, match=r"needs \['x_train', 'boxes_train', 'box_labels_train', "
                                           r"'box_image_train'\].*missing \['boxes_train'"):
        load_box_npz(tmp_path / "cls.npz")


def write_coco(root: Path, *, annotations: list[dict] | None = None, files: bool = True) -> Path:
    root.mkdir()
    (root / "images").mkdir()
    img = np.zeros((40, 50), np.uint8)
    img[10:20, 5:25] = 200
    if files:
        for name in ("a.png", "b.png"):
            (root / "images" / name).write_bytes(png_bytes(img))
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40, "condition": "night"},
                   {"id": 2, "file_name": "b.png", "width": 50, "height": 40}],
        "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "person"}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 0, 20, 40], "area": 800, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 50, 40], "area": 2000, "iscrowd": 1},
        ],
    }
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def test_a_coco_folder_loads_boxes_normalised_by_category_id(tmp_path: Path) -> None:
    splits = load_coco(write_coco(tmp_path / "coco"), channels=None, size=None)
    data = splits.train
    assert splits.class_names == ["person", "car"]  # in the order of the category ids (3, 7)
    assert data.shape == (1, 40, 50) and data.images.ids == ["a.png", "b.png"]
    assert np.allclose(data.boxes[0], [[0.1, 0.25, 0.5, 0.5], [0.6, 0.0, 1.0, 1.0]])
    assert data.classes[0].tolist() == [1, 0] and len(data.boxes[1]) == 0  # the crowd box is skipped
    assert data.tags == [{"condition": "night"}, {}]
    resized = load_coco(tmp_path / "coco", channels=3, size=(32, 32)).train
    assert resized.shape == (3, 32, 32) and np.allclose(resized.boxes[0], data.boxes[0])


@pytest.mark.parametrize(("annotations", "files", "message"), [
    ([{"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5], "area": 25}], True,
     r"annotation 9 has unknown category_id 5; the categories are \[3, 7\]"),
    ([{"id": 9, "image_id": 1, "category_id": 3, "bbox": [40, 0, 20, 5], "area": 100}], True,
     r"annotation 9 on image 'a.png': bbox \[40, 0, 20, 5\] lies outside the 50x40 image"),
    (None, False, r"image 1 file 'a.png' is missing"),
])
def test_a_bad_coco_folder_is_refused_with_what_was_received(tmp_path: Path, annotations: list | None, files: bool,
                                                             message: str) -> None:
    root = write_coco(tmp_path / "coco", annotations=annotations, files=files)
    with pytest.raises(InvalidInput, match=message):
        load_coco(root, channels=None, size=None)
    with pytest.raises(InvalidInput, match="expected annotations.json in the folder"):
        load_coco(tmp_path, channels=None, size=None)


def test_a_snapshot_of_detect_labels_becomes_boxes(tmp_path: Path, hub: InProcHub) -> None:
    truth = add_detect_cases(hub, 6)
    snap = pull_snapshot(trainer(hub), cache_dir=tmp_path / "cache")
    data = snapshot_to_boxset(snap, channels=1, size=(16, 16))
    assert snap.snapshot_id == hub.snapshots()[-1] and snap.task == "detect" and snap.class_names == ["car", "person"]
    assert len(data) == 6 and data.shape == (1, 16, 16)
    assert sorted(data.images.ids) == list(truth) == [f"c{i:02d}" for i in range(6)]  # in image order
    assert data.tags[data.images.ids.index("c00")] == {"condition": "fog", "source": "snapshot"}
    wanted = [truth[i] for i in data.images.ids]
    for got, want in zip(data.boxes, wanted, strict=True):
        assert np.allclose(got, [[b.x1, b.y1, b.x2, b.y2] for b in want.boxes])
    assert [c.tolist() for c in data.classes] == [[b.label for b in d.boxes] for d in wanted]


def test_the_classifier_refuses_a_snapshot_of_boxes_and_a_coco_folder(tmp_path: Path, hub: InProcHub) -> None:
    from training.config import TrainArgs
    from training.train import main

    add_detect_cases(hub, 6)
    args = TrainArgs(data="hub:http://hub", out=tmp_path / "r", channels=1, image_size=(16, 16), threads=1,
                     cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidInput, match="holds 'detect' labels; train it with --task detect"):
        main(args, client_factory=lambda _: trainer(hub))
    coco = write_coco(tmp_path / "coco")
    with pytest.raises(InvalidInput, match="holds boxes, which a classifier cannot learn"):
        main(TrainArgs(data=f"coco:{coco}", out=tmp_path / "r2", threads=1))
