"""The simulated world: a mostly-clear seed set, rare conditions in the stream, honest human actions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.sim.conditions import CLEAR, CONDITIONS
from fleet.sim.data import load_dataset
from fleet.sim.fleet import STREAM_MIX, build_world


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return build_world(load_dataset(None, seed=0), seed=0, seed_size=150, human_known=0.5, human_error=0.03)


def test_seed_set_is_mostly_clear_and_test_covers_every_condition(world) -> None:  # type: ignore[no-untyped-def]
    assert len(world.seed_set) == 150
    assert (world.seed_set.conditions == CLEAR).mean() > 0.85
    names, counts = np.unique(world.test_set.conditions, return_counts=True)
    assert set(names) == {CLEAR, *CONDITIONS} and len(set(counts)) == 1


def test_stream_mixes_rare_conditions_with_a_noisy_partial_human(world) -> None:  # type: ignore[no-untyped-def]
    f = world.stream(1, 4000)
    assert abs((f.conditions == CLEAR).mean() - STREAM_MIX[CLEAR]) < 0.03
    known = f.human >= 0
    assert abs(known.mean() - 0.5) < 0.03
    assert 0.01 < (f.human[known] != f.labels[known]).mean() < 0.05
    assert len(set(f.frame_ids.tolist())) == len(f)
    assert all(world.truth[i] == y for i, y in zip(f.frame_ids.tolist()[:50], f.labels[:50], strict=True))


def test_shards_are_what_the_agent_reads(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fleet.edge.sources import NpzSource

    f = world.stream(2, 20)
    path = f.save_shard(tmp_path / "shard.npz")
    frames = list(NpzSource(path))
    assert len(frames) == 20
    assert frames[0].tags["condition"] == f.conditions[0] and frames[0].tags["frame"] == f.frame_ids[0]
    assert [fr.human_action for fr in frames] == [None if h < 0 else int(h) for h in f.human]


def test_datasets_refuse_what_they_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither 'digits'"):
        load_dataset(str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="lacks array"):
        load_dataset(str(bad))


def test_image_folder_dataset(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_dataset(str(tmp_path), seed=0)
    assert d.class_names == ["cat", "dog"] and d.channels == 3
    assert len(d.x_train) + len(d.x_test) == 12 and d.x_train.shape[1:] == (10, 12, 3)


def test_frames_concatenate_in_order() -> None:
    from fleet.sim.fleet import Frames

    def part(start: int, n: int) -> Frames:
        idx = np.arange(start, start + n)
        return Frames(np.zeros((n, 4, 4), np.uint8) + idx[:, None, None].astype(np.uint8), idx, np.array(["clear"] * n),
                      np.array([f"f{i}" for i in idx]), -np.ones(n, np.int64))

    both = Frames.concat([part(0, 3), part(3, 2)])
    assert len(both) == 5 and both.labels.tolist() == [0, 1, 2, 3, 4] and both.frame_ids[-1] == "f4"
    assert both.images[4].max() == 4
