"""Synthetic detection scenes (fleet.sim.scenes): deterministic canvases whose true boxes hug their digits."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.sim.scenes import INK_THRESHOLD, digit_scenes, make_scenes


def test_scenes_put_each_true_box_tightly_around_its_digit() -> None:
    s = digit_scenes(12, seed=4, size=64, clutter=False)
    again = digit_scenes(12, seed=4, size=64, clutter=False)
    assert np.array_equal(s.images, again.images)
    assert all(np.array_equal(a, b) for a, b in zip(s.boxes, again.boxes, strict=True))
    assert s.images.shape == (12, 64, 64) and s.class_names == [str(i) for i in range(10)]
    assert all(1 <= len(b) <= 3 and len(b) == len(c) for b, c in zip(s.boxes, s.labels, strict=True))
    for img, boxes in zip(s.images, s.boxes, strict=True):
        for x1, y1, x2, y2 in np.rint(boxes * 64).astype(int):
            inside = img[y1:y2, x1:x2]
            # ink on every edge of the box: it is tight (glyphs are pasted at 75-100% brightness)
            edges = (inside[0], inside[-1], inside[:, 0], inside[:, -1])
            assert all(e.max() >= INK_THRESHOLD * 0.75 for e in edges)
    only = digit_scenes(6, seed=0, size=64, digits=[7, 1])
    assert only.class_names == ["7", "1"] and set(np.concatenate(only.labels).tolist()) <= {0, 1}


def test_bad_glyphs_and_settings_are_refused() -> None:
    glyphs = np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"glyph_labels must be \(2,\) in \[0, 2\); received shape \(2,\), "
                                         r"range \[0, 5\]"):
        make_scenes(1, glyphs, np.array([0, 5]), ["a", "b"])
    with pytest.raises(ValueError, match="glyphs must be a non-empty uint8 array"):
        make_scenes(1, glyphs.astype(np.float32), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"scale must satisfy 4 <= low <= high <= size \(32\); received \(2, 8\)"):
        make_scenes(1, glyphs, np.array([0, 1]), ["a", "b"], size=32, scale=(2, 8))
    with pytest.raises(ValueError, match=r"digits must be distinct digits 0..9; received \[1, 1\]"):
        digit_scenes(1, digits=[1, 1])
