"""Novelty bank: distances behave, the index stays close to (and never below) the exact answer, files are safe."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trigger import NoveltyBank


def clustered(n: int, d: int = 128, clusters: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ReLU features around ``clusters`` centres (the centres depend only on d and clusters)."""
    centres = np.random.default_rng(d * 1000 + clusters).normal(0, 1, (clusters, d))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    return np.maximum(centres[labels] + 0.6 * rng.normal(0, 1, (n, d)), 0), labels


@pytest.fixture(scope="module")
def indexed() -> tuple[NoveltyBank, np.ndarray]:
    x, _ = clustered(5000)
    return NoveltyBank.from_embeddings(x, n_lists=70, reduce_dim=32), x


def test_distance_is_zero_for_members_and_grows_away_from_the_bank() -> None:
    x, _ = clustered(300)
    bank = NoveltyBank.from_embeddings(x)
    assert bank.n_lists == 0  # small banks are searched exhaustively
    np.testing.assert_allclose(bank.distance(x[:10], k=1), 0.0, atol=1e-5)
    rng = np.random.default_rng(5)
    near = x[:50] + 0.05 * rng.normal(0, 1, (50, x.shape[1]))
    far = rng.normal(0, 1, (50, x.shape[1]))  # not even non-negative: unlike anything in the bank
    d_near, d_far = bank.distance(near), bank.distance(far)
    assert np.all((d_near >= 0) & (d_near <= 2)) and np.all((d_far >= 0) & (d_far <= 2))
    assert d_far.min() > d_near.max()
    # scale does not matter (cosine), an all-zero embedding is unrelated to everything
    np.testing.assert_allclose(bank.distance(near * 7.5), d_near, atol=1e-6)
    assert bank.distance(np.zeros((1, x.shape[1])))[0] == pytest.approx(1.0)


def test_indexed_distance_is_never_below_exact_and_stays_close(indexed) -> None:  # type: ignore[no-untyped-def]
    bank, _ = indexed
    queries, _ = clustered(400, seed=9)
    queries[:40] = np.abs(np.random.default_rng(9).normal(0, 1, (40, queries.shape[1])))  # some novel frames
    exact = bank.distance(queries, exact=True)
    approx = bank.distance(queries)
    assert np.all(approx >= exact - 1e-5)
    assert np.mean(approx - exact) < 0.01
    assert np.percentile(approx - exact, 95) < 0.05
    # the exact answer is the brute-force one
    v = bank.vectors.astype(np.float64)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    brute = 1.0 - np.sort(qn @ v.T, axis=1)[:, -5:].mean(axis=1)
    np.testing.assert_allclose(exact, brute, atol=1e-5)


def test_batch_and_single_queries_agree(indexed) -> None:  # type: ignore[no-untyped-def]
    bank, _ = indexed
    queries, _ = clustered(40, seed=3)
    batch = bank.distance(queries, k=5)
    single = np.array([bank.distance(queries[i : i + 1], k=5)[0] for i in range(len(queries))])
    np.testing.assert_allclose(single, batch, atol=1e-6)


def test_search_returns_sorted_neighbours_with_labels() -> None:
    x, labels = clustered(500)
    bank = NoveltyBank.from_embeddings(x, labels=labels)
    dist, idx = bank.search(x[:5], k=3)
    assert dist.shape == idx.shape == (5, 3)
    assert np.all(np.diff(dist, axis=1) >= 0)
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-5)
    assert bank.labels[idx[:, 0]].tolist() == labels[:5].tolist()
    assert bank.distance(x[:2], k=10_000).shape == (2,)  # k beyond the bank is capped


def test_save_load_round_trip_and_stable_hash(tmp_path: Path, indexed) -> None:  # type: ignore[no-untyped-def]
    bank, x = indexed
    path = tmp_path / "bank.npz"
    sha = bank.save(path)
    assert sha == bank.sha256 == NoveltyBank.from_embeddings(x, n_lists=70, reduce_dim=32).sha256
    loaded = NoveltyBank.load(path, expected_sha256=sha)
    assert loaded.sha256 == sha and len(loaded) == len(bank) and loaded.n_lists == bank.n_lists
    q = x[:20] + 0.1
    np.testing.assert_allclose(loaded.distance(q), bank.distance(q), atol=1e-6)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        NoveltyBank.load(path, expected_sha256="0" * 64)


def test_meta_and_stratified_max_size_keeps_rare_classes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1000, 8))
    labels = np.array([0] * 990 + [1] * 10)
    bank = NoveltyBank.from_embeddings(x, labels=labels, max_size=100, meta={"model_version": "v7"})
    assert len(bank) == 100
    assert int((bank.labels == 1).sum()) == 10  # every rare example survives the cap
    assert NoveltyBank.from_bytes(bank.to_bytes()).meta == {"model_version": "v7"}


def _rewrite(data: bytes, **replace: np.ndarray) -> bytes:
    with np.load(io.BytesIO(data)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(replace)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vectors": np.ones((3, 4), np.float64)}, "dtype float32"),
        ({"vectors": np.full((300, 16), np.nan, np.float32)}, "finite"),
        ({"vectors": np.ones((300, 16), np.float32)}, "L2-normalised"),
        ({"format": np.array("something/9")}, "format"),
        ({"labels": np.zeros(3, np.int64)}, "shape"),
        ({"offsets": np.array([0, 5], np.int64)}, "offsets"),
    ],
)
def test_bad_files_are_refused(change: dict[str, np.ndarray], message: str) -> None:
    x, _ = clustered(300, d=16)
    data = NoveltyBank.from_embeddings(x, n_lists=4).to_bytes()
    with pytest.raises(ValueError, match=message):
        NoveltyBank.from_bytes(_rewrite(data, **change))


def test_not_a_bank_is_refused() -> None:
    with pytest.raises(ValueError, match="not a readable .npz"):
        NoveltyBank.from_bytes(b"definitely not a zip file")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("other.npy", b"")
    with pytest.raises(ValueError, match="must hold arrays"):
        NoveltyBank.from_bytes(buf.getvalue())
    x, _ = clustered(50, d=8)
    bank = NoveltyBank.from_embeddings(x)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        bank.distance(np.ones((2, 9)))
