"""Near-duplicate suppression: perceptual hashes and a streaming memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trigger import NearDuplicateFilter, dhash, hamming


def scenes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (n, 6, 6, 3))
    return np.clip(low.repeat(16, axis=1).repeat(16, axis=2), 0, 255).astype(np.uint8)  # (n, 96, 96, 3)


def test_dhash_survives_noise_and_exposure_but_tells_scenes_apart() -> None:
    images = scenes(20)
    rng = np.random.default_rng(1)
    noisy = np.clip(images + rng.normal(0, 6, images.shape), 0, 255).astype(np.uint8)
    brighter = np.clip(images.astype(int) + 25, 0, 255).astype(np.uint8)
    h = dhash(images)
    assert h.dtype == np.uint64 and h.shape == (20,)
    assert np.diag(hamming(h, dhash(noisy))).max() <= 4
    assert np.diag(hamming(h, dhash(brighter))).max() <= 4
    cross = hamming(h, h)
    assert cross[~np.eye(20, dtype=bool)].min() > 8
    # grey and single-channel images hash the same way
    np.testing.assert_array_equal(dhash(images[..., 0]), dhash(images[..., :1]))


def test_hamming_counts_bits() -> None:
    a = np.array([0, 0b1011, 2**64 - 1], dtype=np.uint64)
    b = np.array([0, 2**63], dtype=np.uint64)
    assert hamming(a, b).tolist() == [[0, 1], [3, 4], [64, 63]]


def test_dhash_refusals() -> None:
    with pytest.raises(ValueError, match="uint8"):
        dhash(np.zeros((1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="at least 8x9"):
        dhash(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="2..8"):
        dhash(np.zeros((1, 32, 32), np.uint8), size=9)


def test_filter_keeps_one_frame_per_scene_in_a_stream() -> None:
    base = scenes(5)
    rng = np.random.default_rng(2)
    stream = np.concatenate([np.clip(base[i % 5] + rng.normal(0, 5, base[0].shape), 0, 255)[None] for i in range(50)])
    f = NearDuplicateFilter(max_hamming=6, memory=16)
    kept = f.filter(images=stream.astype(np.uint8))
    assert kept.sum() == 5 and kept[:5].all()  # the first sighting of each scene, nothing after


def test_filter_by_embedding_and_memory_forgets() -> None:
    f = NearDuplicateFilter(max_hamming=None, embedding_threshold=0.05, memory=2)
    e = np.eye(4)
    assert f.filter(embeddings=e[:3]).tolist() == [True, True, True]
    assert f.is_duplicate(embeddings=e[2:3] * 3).tolist() == [True]  # cosine: scale-free
    assert f.is_duplicate(embeddings=e[0:1]).tolist() == [False]  # forgotten: memory holds 2
    with pytest.raises(ValueError, match="needs embeddings"):
        f.is_duplicate(hashes=np.array([1], np.uint64))


def test_state_round_trip_is_json() -> None:
    f = NearDuplicateFilter(max_hamming=2, embedding_threshold=0.1, memory=8)
    f.add(hashes=np.array([1, 2**63], np.uint64), embeddings=np.eye(2, 5))
    state = json.loads(json.dumps(f.state_dict()))
    g = NearDuplicateFilter(max_hamming=2, embedding_threshold=0.1, memory=8)
    g.load_state_dict(state)
    assert g.is_duplicate(hashes=np.array([2**63 + 1], np.uint64)).tolist() == [True]
    assert g.is_duplicate(embeddings=np.eye(2, 5)[1:]).tolist() == [True]


def test_filter_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="received neither"):
        NearDuplicateFilter(max_hamming=None)
    with pytest.raises(ValueError, match="square"):
        NearDuplicateFilter(hash_bits=50)
    with pytest.raises(ValueError, match="cosine distance"):
        NearDuplicateFilter(embedding_threshold=3.0)
