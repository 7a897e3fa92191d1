"""Edge conditions: shapes kept, each condition really changes the frame, bad names refused."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.sim.conditions import CLEAR, CONDITIONS, apply_conditions, sample_conditions


@pytest.fixture
def frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros((8, 12, 12), np.uint8)
    x[:, 3:9, 5:7] = 255  # a bright bar on black, like a digit stroke
    return np.clip(x.astype(int) + rng.integers(0, 10, x.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_each_condition_keeps_shape_and_changes_pixels(frames: np.ndarray, name: str) -> None:
    out = apply_conditions(frames, [name] * len(frames), seed=1)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frames.astype(int)).mean() > 5


def test_clear_is_identity_and_rgb_works(frames: np.ndarray) -> None:
    assert np.array_equal(apply_conditions(frames, [CLEAR] * len(frames), seed=0), frames)
    rgb = np.stack([frames] * 3, axis=-1)
    for name in CONDITIONS:
        assert apply_conditions(rgb, [name] * len(rgb), seed=0).shape == rgb.shape


def test_fog_lowers_contrast_and_night_darkens(frames: np.ndarray) -> None:
    fog = apply_conditions(frames, ["fog"] * len(frames), seed=0)
    night = apply_conditions(frames, ["night"] * len(frames), seed=0)
    assert fog.std() < frames.std() * 0.5
    stroke = (slice(None), slice(3, 9), slice(5, 7))
    assert night[stroke].mean() < frames[stroke].mean() * 0.5 and night.max() < 160


def test_bad_inputs_are_refused(frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown condition"):
        apply_conditions(frames, ["snow"] * len(frames), seed=0)
    with pytest.raises(ValueError, match="one condition per image"):
        apply_conditions(frames, ["fog"], seed=0)
    with pytest.raises(ValueError, match="non-negative weights"):
        sample_conditions(3, {"fog": -1.0}, rng=np.random.default_rng(0))


def test_sample_conditions_follows_the_mix() -> None:
    names = sample_conditions(20000, {CLEAR: 0.75, "fog": 0.25}, rng=np.random.default_rng(0))
    assert abs((names == "fog").mean() - 0.25) < 0.02
