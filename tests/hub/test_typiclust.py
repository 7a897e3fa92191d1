"""Cold-start selection (fleet.hub.selection): TypiClust's typicality reproduced from its definition on the same
arrays, typical frames of uncovered clusters first, and the adaptive switch to uncertainty+diversity (on what the
active model trained on, else on the labels at the hub)."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.errors import InvalidInput
from fleet.hub.selection import (
    COLD_START_LABELS,
    COLD_START_PER_CLASS,
    TRAIN_N_CLASS,
    adaptive_strategy,
    cold_start,
    cold_start_mix,
    l2_normalize,
    resolve_adaptive,
    typicality,
    typiclust_strategy,
    uncertainty_diversity_strategy,
)
from tests.hub.conftest import HubHarness


def reference_typicality(x: np.ndarray, k: int) -> np.ndarray:
    """Hacohen et al. 2022, eq. 3, written out with loops: 1 / mean distance to the k nearest other points
    (cosine distance between unit vectors, as the hub measures embeddings)."""
    out = []
    for i in range(len(x)):
        d = sorted(1.0 - float(x[i] @ x[j]) for j in range(len(x)) if j != i)
        out.append(1.0 / np.mean(d[:k]))
    return np.asarray(out)


def blobs(rng: np.random.Generator, sizes: list[int], d: int = 16, spread: float = 0.05) -> tuple[np.ndarray, ...]:
    centres = l2_normalize(rng.normal(size=(len(sizes), d)))
    x = np.concatenate([c + spread * rng.normal(size=(n, d)) for c, n in zip(centres, sizes, strict=True)])
    which = np.repeat(np.arange(len(sizes)), sizes)
    return x, which, centres


def test_typicality_is_the_published_definition() -> None:
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(40, 8)))
    np.testing.assert_allclose(typicality(x, k=5), reference_typicality(x, 5), rtol=1e-6)  # float32 embeddings
    np.testing.assert_allclose(typicality(x, k=100), reference_typicality(x, 39), rtol=1e-6)  # k capped at n - 1
    assert typicality(x[:1]).tolist() == [1.0]


def test_typiclust_takes_the_typical_frame_of_each_uncovered_cluster() -> None:
    rng = np.random.default_rng(1)
    x, which, centres = blobs(rng, [120, 80, 60, 40, 30])
    outliers = l2_normalize(rng.normal(size=(6, 16)))  # lone frames far from every cluster
    pool = np.concatenate([x, outliers])
    u = rng.random(len(pool))  # uncertainty plays no part in the cold start
    picks = typiclust_strategy(u, pool, 5, rng=np.random.default_rng(2))
    assert sorted(which[picks].tolist()) == [0, 1, 2, 3, 4]  # one per cluster, no outlier
    for i in picks:  # each is among the most central of its cluster
        members = np.flatnonzero(which == which[i])
        dist = 1.0 - l2_normalize(x[members]) @ l2_normalize(centres[which[i]][None])[0]
        assert np.sum(dist < dist[members == i][0]) <= len(members) // 4
    # with labels already on clusters 0, 1 and 2, the budget goes to the two clusters no label covers
    labeled = x[np.flatnonzero(which <= 2)[::20]]
    picks = typiclust_strategy(u, pool, 2, rng=np.random.default_rng(3), labeled=labeled)
    assert sorted(which[picks].tolist()) == [3, 4]
    assert typiclust_strategy(u, None, 3, rng=np.random.default_rng(0)).shape == (3,)  # no embeddings: random


def test_adaptive_switches_from_typical_to_uncertain_frames_at_the_cold_start_bar() -> None:
    rng = np.random.default_rng(4)
    x, _, _ = blobs(rng, [100, 100, 100])
    u = rng.random(len(x))
    few = x[: COLD_START_LABELS - 1]
    many = np.concatenate([x] * 2)[: COLD_START_LABELS]
    for labeled, inner in ((few, typiclust_strategy), (many, uncertainty_diversity_strategy)):
        got = adaptive_strategy(u, x, 10, rng=np.random.default_rng(5), labeled=labeled)
        want = inner(u, x, 10, rng=np.random.default_rng(5), labeled=labeled)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("strategy", ["typiclust", "adaptive"])
def test_the_hub_selects_with_the_cold_start_strategies(hub: HubHarness, strategy: str) -> None:
    hub.enroll("d1")
    rng = np.random.default_rng(6)
    x, _, _ = blobs(rng, [12, 8, 6])
    for e in x:
        hub.send_case("d1", embedding=e.astype(np.float32))
    r = hub.client.post("/v1/selections", json={"budget": 3, "strategy": strategy}, headers=hub.labeler)
    assert r.status_code in (200, 201), r.text
    assert len(r.json()["cases"]) == 3 and r.json()["strategy"] == strategy


CLASSES = [f"c{i}" for i in range(10)]


def test_the_cold_start_is_what_the_model_trained_on_per_class() -> None:
    bar = COLD_START_PER_CLASS * 10
    assert cold_start({"train_n": bar - 1, "test_accuracy": 0.3}, CLASSES) == 1.0
    assert cold_start({"train_n": bar}, CLASSES) == 0.0
    assert cold_start({"train_n": bar - 1}, CLASSES[:5]) == 0.0  # fewer classes: more frames a class
    for metrics, classes in (({"test_accuracy": 0.9}, CLASSES), (None, CLASSES), ({"train_n": 5.0}, [])):
        assert cold_start(metrics, classes) is None  # the model does not say: the labels at the hub decide
        assert resolve_adaptive(metrics, classes) is adaptive_strategy
    assert resolve_adaptive({"train_n": bar - 1}, CLASSES) is typiclust_strategy
    assert resolve_adaptive({"train_n": bar}, CLASSES) is uncertainty_diversity_strategy


def test_classes_that_differ_are_each_in_or_out_of_the_cold_start() -> None:
    """Per-class counts win over the total: 3 of 10 classes under the bar (one of them left out of the metrics, so
    0) put 0.3 of each budget on typical frames, although the total is well over 15 a class."""
    counts = {f"{TRAIN_N_CLASS}c{i}": float(COLD_START_PER_CLASS + 40) for i in range(10)}
    counts[f"{TRAIN_N_CLASS}c3"] = COLD_START_PER_CLASS - 1
    counts[f"{TRAIN_N_CLASS}c7"] = 0.0
    del counts[f"{TRAIN_N_CLASS}c9"]
    metrics = {"train_n": sum(counts.values()), **counts}
    assert cold_start(metrics, CLASSES) == pytest.approx(0.3)
    counts[f"{TRAIN_N_CLASS}c3"] = float(COLD_START_PER_CLASS)  # at the bar: out of the cold start
    assert cold_start({"train_n": 1.0, **counts}, CLASSES) == pytest.approx(0.2)
    assert resolve_adaptive({f"{TRAIN_N_CLASS}{c}": 0.0 for c in CLASSES}, CLASSES) is typiclust_strategy


def test_the_cold_start_mix_takes_typical_frames_for_its_share_and_uncertain_ones_for_the_rest() -> None:
    rng = np.random.default_rng(3)
    x, _, _ = blobs(rng, [30, 20, 12, 8])
    u = rng.uniform(0.0, 1.0, len(x))
    budget = 10
    got = cold_start_mix(0.3)(u, x, budget, rng=np.random.default_rng(1))
    same = np.random.default_rng(1)  # the generator the mix drew from, drawn in the same order
    typical = typiclust_strategy(u, x, 3, rng=same)
    rest = np.setdiff1d(np.arange(len(x)), typical)
    uncertain = rest[uncertainty_diversity_strategy(u[rest], x[rest], budget - 3, rng=same)]
    assert len(got) == budget == len(set(got.tolist()))
    assert got.tolist() == [*typical.tolist(), *uncertain.tolist()]
    # a mix, not either pure strategy's picks over the whole budget
    assert set(got.tolist()) != set(typiclust_strategy(u, x, budget, rng=np.random.default_rng(1)).tolist())
    assert set(got.tolist()) != set(uncertainty_diversity_strategy(u, x, budget, rng=np.random.default_rng(1)).tolist())
    for share, n_typical in ((0.0, 0), (0.04, 0), (0.05, 1), (1.0, budget)):  # rounded half up
        picked = cold_start_mix(share)(u, x, budget, rng=np.random.default_rng(1))
        assert picked[:n_typical].tolist() == typiclust_strategy(u, x, n_typical, rng=np.random.default_rng(1)
                                                                ).tolist(), share
        assert len(picked) == budget
    assert len(cold_start_mix(0.5)(u[:4], x[:4], budget, rng=rng)) == 4  # a pool smaller than the budget: all
    with pytest.raises(InvalidInput, match="received 1.5"):
        cold_start_mix(1.5)


def test_the_hub_s_adaptive_selection_follows_the_active_model_s_training_set(hub_factory) -> None:
    """Model versions, each active in turn: a model trained on 10 frames a class gets typiclust's picks, the next,
    on 15 a class, uncertainty+diversity's, one whose classes each had fewer than 15 typiclust's again (its counts
    per class win over its total), and one with one class of three under the bar neither's, over the same pool and
    seed; no label is at the hub in any."""
    h: HubHarness = hub_factory()
    h.enroll("d1")
    rng = np.random.default_rng(11)
    x, _, _ = blobs(rng, [14, 9, 7, 4])
    top = rng.uniform(0.34, 0.98, size=len(x))

    def picks(strategy: str) -> list[str]:
        r = h.client.post("/v1/selections", json={"budget": 4, "strategy": strategy, "seed": 7,
                                                  "exclude_queued": False}, headers=h.labeler)
        assert r.status_code in (200, 201), r.text
        return sorted(c["case"]["case_id"] for c in r.json()["cases"])

    def per_class(*counts: int) -> dict[str, float]:
        return {f"{TRAIN_N_CLASS}class_{i}": float(n) for i, n in enumerate(counts)}

    bar = COLD_START_PER_CLASS
    for version, metrics, same in (("m1", {"train_n": 3.0 * 10}, "typiclust"),
                                   ("m2", {"train_n": 3.0 * bar}, "uncertainty+diversity"),
                                   ("m3", {"train_n": 9.0 * bar, **per_class(bar - 1, bar - 1, bar - 1)}, "typiclust"),
                                   ("m4", {"train_n": 3.0 * bar, **per_class(bar - 5, bar, bar + 5)}, None)):
        h.register_model(version, promote=True, metrics={"test_accuracy": 0.5, **metrics})
        for e, t in zip(x, top, strict=True):  # the same frames, captured by this version
            h.send_case("d1", model_version=version, embedding=e.astype(np.float32),
                        probs=[float(t), float(1 - t) * 0.6, float(1 - t) * 0.4])
        got = picks("adaptive")
        pure = {name: picks(name) for name in ("typiclust", "uncertainty+diversity")}
        assert pure["typiclust"] != pure["uncertainty+diversity"], version  # the test tells the two apart
        if same is None:  # one typical frame and three uncertain ones: neither strategy's four alone
            assert got not in pure.values(), (version, got, pure)
        else:
            assert got == pure[same], version
