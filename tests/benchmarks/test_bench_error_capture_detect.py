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
                                                            labels=[np.array([1])] * len(images)))


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
