"""Loading, conforming, replay mixing and balancing of in-memory image sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.errors import InvalidInput
from tests.support.data import png_bytes
from training.data import (
    EpochSampler,
    ImageSet,
    Tags,
    channel_stats,
    class_weights,
    concat,
    conform,
    holdout_by_id,
    load_folder,
    load_npz,
    parse_source,
    parse_tags,
    slice_masks,
    to_nchw_uint8,
)


def test_npz_roundtrip_keeps_tags_and_names(digits_npz: Path) -> None:
    s = load_npz(digits_npz)
    assert s.train.images.shape == (1400, 1, 8, 8) and s.train.images.dtype == np.uint8
    assert s.test is not None and len(s.test) == 397
    assert s.class_names == [str(i) for i in range(10)]
    assert {t["condition"] for t in s.train.tags} == {"day", "night"}


@pytest.mark.parametrize(
    ("shape", "layout"), [((5, 6, 7), "nhw"), ((5, 6, 7, 3), "nhwc"), ((5, 3, 6, 7), "nchw"), ((5, 6, 7, 1), "nhwc")]
)
def test_layouts_become_nchw(shape: tuple[int, ...], layout: str) -> None:
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    out = to_nchw_uint8(x, what="t")
    assert out.shape[0] == 5 and out.shape[2:] == (6, 7) and out.shape[1] in (1, 3)


def test_float_images_in_unit_range_are_scaled() -> None:
    x = np.full((2, 4, 4), 0.5, np.float32)
    assert to_nchw_uint8(x, what="t").max() == 128


def test_bad_images_are_refused_with_what_was_received(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"1 or 3 channels; received shape \(2, 5, 4, 4\)"):
        to_nchw_uint8(np.zeros((2, 5, 4, 4), np.uint8), what="t")
    with pytest.raises(InvalidInput, match="range"):
        to_nchw_uint8(np.full((2, 4, 4), 300.0), what="t")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4)))
    with pytest.raises(InvalidInput, match=r"expected arrays x_train, y_train.*received \['images'\]"):
        load_npz(bad)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(InvalidInput, match=r"labels must have shape \(3,\)"):
        load_npz(mismatch)


def test_parse_source_and_tags() -> None:
    assert parse_source("npz:/a/b.npz").kind == "npz"
    assert parse_source("hub:http://h:8000").location == "http://h:8000"
    assert parse_source("x.npz").kind == "npz"
    with pytest.raises(InvalidInput, match="npz:PATH, folder:PATH, coco:PATH or hub:URL; received 'nope'"):
        parse_source("nope")
    assert parse_tags("night") == {"condition": "night"}
    assert parse_tags("condition=fog;device=d1") == {"condition": "fog", "device": "d1"}
    assert parse_tags("") == {}


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            (tmp_path / cls / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)))
    s = load_folder(tmp_path, size=(8, 8), test_fraction=0.3)
    assert s.class_names == ["cat", "dog", "eel"]
    assert s.train.shape == (3, 8, 8)
    assert s.test is not None and len(s.train) + len(s.test) == 30 and len(s.test) > 0
    # a known class list keeps its order; new folders are appended
    s2 = load_folder(tmp_path, class_names=["eel", "ant"], channels=1, test_fraction=0.0)
    assert s2.class_names == ["eel", "ant", "cat", "dog"] and s2.train.shape == (1, 12, 10)


def test_conform_converts_channels_and_size() -> None:
    s = ImageSet(np.full((3, 1, 8, 8), 200, np.uint8), np.zeros(3, np.int64), [{}] * 3)
    out = conform(s, (3, 16, 12))
    assert out.images.shape == (3, 3, 16, 12) and abs(int(out.images.mean()) - 200) <= 1
    back = conform(out, (1, 8, 8))
    assert back.images.shape == (3, 1, 8, 8)


def test_holdout_by_id_is_stable_when_items_are_added() -> None:
    ids = [f"case-{i}" for i in range(200)]
    s = ImageSet(np.zeros((200, 1, 2, 2), np.uint8), np.arange(200) % 2, [{}] * 200, ids=ids)
    _, test = holdout_by_id(s, 0.2)
    bigger = ImageSet(np.zeros((300, 1, 2, 2), np.uint8), np.arange(300) % 2, [{}] * 300,
                      ids=ids + [f"new-{i}" for i in range(100)])
    _, test2 = holdout_by_id(bigger, 0.2)
    assert test is not None and test2 is not None
    assert set(test.ids or []) <= set(test2.ids or [])
    assert 20 < len(test) < 60


def test_replay_sampler_mixes_at_the_ratio_and_is_deterministic() -> None:
    labels = np.concatenate([np.zeros(100), np.ones(1000)]).astype(np.int64)  # 100 new, 1000 base
    s = EpochSampler(labels, n_new=100, replay_ratio=0.75, seed=1)
    assert s.base_per_epoch == 300 and s.epoch_size == 400
    idx = s.indices(0)
    assert len(idx) == 400 and np.sum(idx < 100) == 100  # every new image, every epoch
    assert np.array_equal(idx, s.indices(0)) and not np.array_equal(idx, s.indices(1))
    seen = set(np.concatenate([s.indices(e) for e in range(10)]).tolist())
    assert len(seen) > 900  # over epochs the base is replayed broadly
    assert EpochSampler(labels, n_new=100, replay_ratio=0.0).epoch_size == 100
    whole = EpochSampler(labels, n_new=100, replay_ratio=1.0, seed=2)  # 1: the whole base beside the new, each epoch
    assert whole.epoch_size == 1100 and sorted(whole.indices(3).tolist()) == list(range(1100))
    with pytest.raises(InvalidInput, match=r"\[0, 1\]; received 1.5"):
        EpochSampler(labels, n_new=100, replay_ratio=1.5)


def test_new_repeats_weigh_the_new_images_against_the_whole_base() -> None:
    labels = np.concatenate([np.zeros(100), np.ones(1000)]).astype(np.int64)  # 100 new, 1000 base
    s = EpochSampler(labels, n_new=100, replay_ratio=1.0, seed=1, new_repeats=3)
    idx = s.indices(0)
    assert s.epoch_size == len(idx) == 1300
    assert np.array_equal(np.bincount(idx[idx < 100], minlength=100), np.full(100, 3))  # each new image 3 times
    assert sorted(idx[idx >= 100].tolist()) == list(range(100, 1100))  # ... beside the whole base, once
    assert np.array_equal(idx, s.indices(0)) and not np.array_equal(idx, s.indices(1))
    assert np.array_equal(s.expected_class_counts(2), [300, 1000])
    mixed = EpochSampler(labels, n_new=100, replay_ratio=0.75, new_repeats=2)  # the ratio holds over the repeats
    assert mixed.base_per_epoch == 600 and mixed.epoch_size == 800
    assert EpochSampler(labels, n_new=100, replay_ratio=1.0).epoch_size == 1100  # 1: as before
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidInput, match=rf"--new-repeats must be an integer >= 1; received {bad!r}"):
            EpochSampler(labels, n_new=100, replay_ratio=1.0, new_repeats=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="this run has none: give --base"):
        EpochSampler(labels, n_new=len(labels), replay_ratio=0.5, new_repeats=2)


def test_balanced_sampler_evens_out_classes() -> None:
    labels = np.array([0] * 900 + [1] * 100, np.int64)
    s = EpochSampler(labels, n_new=1000, replay_ratio=0.0, balance="sampler", seed=0)
    counts = np.bincount(labels[s.indices(0)], minlength=2)
    assert abs(counts[0] - counts[1]) < 150


def test_class_weights_favour_rare_classes() -> None:
    w = class_weights(np.array([900, 100, 0]))
    assert w[1] > 1 > w[0] and w[2] == 1.0


def test_channel_stats_and_slices() -> None:
    x = np.zeros((4, 3, 2, 2), np.uint8)
    x[:, 0] = 255
    mean, std = channel_stats(x)
    assert mean == [1.0, 0.0, 0.0] and all(s > 0 for s in std)
    masks = slice_masks([{"condition": "night"}, {"condition": "day"}, {"condition": "night", "source": "base"}])
    assert list(masks) == ["condition=day", "condition=night", "source=base"]
    assert masks["condition=night"].tolist() == [True, False, True]


def test_tags_are_one_code_an_image_and_behave_as_the_list_of_dicts() -> None:
    """A million images under a few conditions: one int32 an image and a table of the distinct dicts; subsets,
    an added tag, concatenation and slice masks give what the same operations on a list of dicts give, and a
    dict read out is a copy."""
    raw = np.asarray(["night" if i % 5 == 0 else "condition=clear;device=d1" if i % 2 else "" for i in range(10**6)])
    tags = Tags.parsed(raw)
    assert tags.codes.dtype == np.int32 and tags.codes.nbytes == 4 * 10**6 and len(tags.table) == 3
    as_list = [parse_tags(s) for s in raw[:1000].tolist()]
    assert tags[:1000] == as_list and list(tags[:1000]) == as_list and tags[5] == {"condition": "night"}
    tags[5]["condition"] = "day"  # a copy: the set's tags are unchanged
    assert tags[5] == {"condition": "night"}

    images = np.zeros((1000, 1, 2, 2), np.uint8)
    a = ImageSet(images, np.zeros(1000, np.int64), tags[:1000])
    b = ImageSet(images[:10], np.ones(10, np.int64), [{"condition": "fog"}] * 10)  # a list is held as Tags too
    assert isinstance(b.tags, Tags) and len(b.tags.table) == 1
    index = np.asarray([3, 0, 999, 5])
    assert a.subset(index).tags == [as_list[i] for i in index]
    based = a.with_tag("source", "base")
    assert based.tags == [{**t, "source": "base"} for t in as_list] and len(based.tags.table) == 3
    both = concat([based, b.with_tag("source", "base")], name="both")
    want = [{**t, "source": "base"} for t in as_list] + [{"condition": "fog", "source": "base"}] * 10
    assert both.tags == want and len(both.tags.table) == 4  # each distinct dict once
    masks, ref = slice_masks(both.tags), slice_masks(want)
    assert list(masks) == list(ref) and all(np.array_equal(masks[k], ref[k]) for k in ref)
    empty = Tags.parsed(np.asarray([], dtype=str))
    assert len(empty) == 0 and empty.with_tag("source", "base") == [] and slice_masks(empty) == {}
