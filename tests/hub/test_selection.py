"""Selection strategies (pure numpy) and the selection API: budgets, queues, duplicates, signed links."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import sqlalchemy as sa
from sqlmodel import Session

from fleet.errors import InvalidInput
from fleet.hub.models import CaseRow
from fleet.hub.selection import (
    STRATEGIES,
    CosineIndex,
    get_strategy,
    k_center_greedy,
    min_cosine_distance,
    normalized_least_confidence,
    pick_balanced,
)
from tests.hub.conftest import HubHarness

# ---------------------------------------------------------------------------------------------
# pure strategies
# ---------------------------------------------------------------------------------------------


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidInput, match="random") as exc:
        get_strategy("bald-ish")
    assert "uncertainty+diversity" in str(exc.value)


def test_least_confidence_rises_as_the_prediction_flattens() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    u = normalized_least_confidence(probs)
    assert np.all(np.diff(u) > 0) and u[0] == 0.0 and u[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("budget", [0, 1, 7, 50, 500])
def test_budget_is_never_exceeded_and_indices_are_unique(name: str, budget: int) -> None:
    rng = np.random.default_rng(0)
    u = rng.random(100)
    emb = rng.normal(size=(100, 8)).astype(np.float32)
    idx = get_strategy(name)(u, emb, budget, rng=np.random.default_rng(1))
    assert len(idx) <= budget and len(set(idx.tolist())) == len(idx)
    assert np.all((idx >= 0) & (idx < 100))


def test_uncertainty_picks_the_most_uncertain() -> None:
    u = np.array([0.1, 0.9, 0.5, 0.95, 0.2])
    idx = get_strategy("uncertainty")(u, None, 2, rng=np.random.default_rng(0))
    assert idx.tolist() == [3, 1]


def test_uncertainty_random_takes_the_most_uncertain_then_a_uniform_quarter_of_the_rest() -> None:
    """Budget 8 of 100: the 6 most uncertain, then 2 drawn uniformly from the other 94 (a quarter, rounded half
    up); over many draws the random part covers the rest of the pool evenly, not its uncertain end."""
    u = np.arange(100) / 100  # case i has uncertainty i / 100
    strategy = get_strategy("uncertainty+random")
    drawn: list[int] = []
    for seed in range(500):
        idx = strategy(u, None, 8, rng=np.random.default_rng(seed))
        assert idx[:6].tolist() == [99, 98, 97, 96, 95, 94]
        assert len(set(idx.tolist())) == 8 and set(idx[6:].tolist()) <= set(range(94))
        drawn += idx[6:].tolist()
    counts = np.bincount(np.asarray(drawn) // 47, minlength=2)  # the rest's lower and upper halves
    assert counts.sum() == 1000 and abs(counts[0] - counts[1]) < 100, counts
    assert strategy(u, None, 1, rng=np.random.default_rng(0)).tolist() == [99]  # a quarter of 1 rounds to 0
    assert sorted(strategy(u, None, 500, rng=np.random.default_rng(0)).tolist()) == list(range(100))


def test_diversity_spreads_over_clusters_where_uncertainty_piles_into_one() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 5
    emb = np.concatenate([c + rng.normal(scale=0.05, size=(25, 16)) for c in centers]).astype(np.float32)
    u = np.concatenate([np.full(25, 0.9), np.full(25, 0.8), np.full(25, 0.7), np.full(25, 0.6)])
    u += rng.random(100) * 0.01
    cluster = np.repeat(np.arange(4), 25)
    by_u = get_strategy("uncertainty")(u, emb, 4, rng=np.random.default_rng(0))
    by_ud = get_strategy("uncertainty+diversity")(u, emb, 4, rng=np.random.default_rng(0))
    assert len(set(cluster[by_u])) == 1
    assert len(set(cluster[by_ud])) == 4
    assert by_ud[0] == int(np.argmax(u))  # starts from the most uncertain


def test_candidates_near_labeled_embeddings_are_skipped() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 8)).astype(np.float32)
    labeled = emb[:3] * 1.0001  # same directions
    for name in STRATEGIES:
        idx = get_strategy(name)(np.linspace(1, 0, 10), emb, 10, rng=np.random.default_rng(0), labeled=labeled,
                                 dup_threshold=0.01)
        assert not set(idx.tolist()) & {0, 1, 2}, name
        assert len(idx) == 7


def test_k_center_seeded_by_labeled_avoids_covered_regions() -> None:
    emb = np.array([[1, 0], [0.99, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    picked = k_center_greedy(emb, 2, seeds=np.array([[1, 0.05]], dtype=np.float32))
    assert set(picked.tolist()) == {2, 3}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_balanced_pick_splits_the_budget_evenly_over_the_groups(name: str) -> None:
    """Four conditions, the common one 60% of the pool: each gets a quarter of the budget, whatever its size."""
    rng = np.random.default_rng(0)
    groups = np.array(["clear"] * 120 + ["night"] * 30 + ["fog"] * 25 + ["rain"] * 25)
    u, emb = rng.random(200), rng.normal(size=(200, 8)).astype(np.float32)
    idx = pick_balanced(get_strategy(name), groups, u, emb, 12, rng=np.random.default_rng(1))
    assert len(idx) == 12 and len(set(idx.tolist())) == 12
    values, counts = np.unique(groups[idx], return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == {"clear": 3, "night": 3, "fog": 3, "rain": 3}
    unbalanced = get_strategy("random")(u, emb, 12, rng=np.random.default_rng(1))
    assert (groups[unbalanced] == "clear").sum() > 3  # over the whole pool the common group takes more


def test_a_balanced_pick_gives_a_small_group_all_it_has_and_the_rest_to_the_others() -> None:
    groups = np.array(["clear"] * 50 + ["night"] * 2 + ["fog"] * 50)
    u = np.linspace(0.0, 1.0, 102)
    idx = pick_balanced(get_strategy("uncertainty"), groups, u, None, 12, rng=np.random.default_rng(0))
    values, counts = np.unique(groups[idx], return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == {"clear": 5, "night": 2, "fog": 5}
    fog = idx[groups[idx] == "fog"]
    assert sorted(fog.tolist()) == list(range(97, 102))  # within a group, the strategy's own order: the top 5
    assert groups[idx[:3]].tolist() == ["clear", "fog", "night"]  # each group's best first, groups interleaved


def test_a_balanced_pick_fills_from_the_rest_when_a_group_gives_less_than_its_share() -> None:
    """A group whose cases are all near-duplicates of labeled ones gives none; the other groups fill the budget."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    groups = np.array(["night"] * 10 + ["clear"] * 20)
    labeled = emb[:10] * 1.0001  # every night case is a duplicate of a labeled one
    idx = pick_balanced(get_strategy("uncertainty"), groups, rng.random(30), emb, 10, rng=rng, labeled=labeled,
                        dup_threshold=0.01)
    assert len(idx) == 10 and set(groups[idx].tolist()) == {"clear"} and len(set(idx.tolist())) == 10


def test_a_balanced_pick_without_groups_is_the_strategy_itself_and_refuses_a_misfit() -> None:
    u = np.array([0.1, 0.9, 0.5, 0.95, 0.2])
    plain = pick_balanced(get_strategy("uncertainty"), None, u, None, 2, rng=np.random.default_rng(0))
    assert plain.tolist() == [3, 1]
    with pytest.raises(InvalidInput, match=r"one value per pool case \(5\); received 4"):
        pick_balanced(get_strategy("uncertainty"), np.array(["a"] * 4), u, None, 2, rng=np.random.default_rng(0))


def test_min_cosine_distance() -> None:
    a = np.array([[1, 0], [0, 1]], np.float32)
    b = np.array([[1, 0]], np.float32)
    assert min_cosine_distance(a, b) == pytest.approx([0.0, 1.0])
    assert np.isinf(min_cosine_distance(a, np.zeros((0, 2), np.float32))).all()


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------


def _send_pool(hub: HubHarness, n: int, *, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        p = rng.dirichlet(np.ones(3) * (0.3 + i % 5))
        emb = rng.normal(size=16).astype(np.float32)
        ids.append(hub.send_case("d1", probs=[float(x) for x in p / p.sum()], embedding=emb))
    return ids


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_selection_queues_cases_and_never_selects_them_twice(hub: HubHarness, strategy: str) -> None:
    _send_pool(hub, 12)
    first = hub.client.post("/v1/selections", json={"budget": 5, "strategy": strategy, "seed": 1},
                            headers=hub.labeler)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["strategy"] == strategy and len(body["cases"]) == 5
    for c in body["cases"]:
        assert 0.0 <= c["score"] <= 1.0 and isinstance(c["cluster"], int)
        assert c["class_names"] == ["class_0", "class_1", "class_2"] and c["state"] == "queued"
    second = hub.client.post("/v1/selections", json={"budget": 10, "strategy": strategy}, headers=hub.labeler).json()
    ids1 = {c["case"]["case_id"] for c in body["cases"]}
    ids2 = {c["case"]["case_id"] for c in second["cases"]}
    assert not ids1 & ids2 and len(ids2) == 7
    pool = hub.client.get("/v1/pool", params={"state": "queued"}, headers=hub.labeler).json()
    assert pool["total"] == 12
    assert hub.client.get("/v1/pool", headers=hub.labeler).json()["total"] == 0


def test_uncertainty_selection_scores_lowest_first(hub: HubHarness) -> None:
    _send_pool(hub, 10)
    cases = hub.client.post("/v1/selections", json={"budget": 4, "strategy": "uncertainty"},
                            headers=hub.labeler).json()["cases"]
    scores = [c["score"] for c in cases]
    assert scores == sorted(scores)


def test_release_returns_a_case_to_the_pool(hub: HubHarness) -> None:
    _send_pool(hub, 3)
    cases = hub.client.post("/v1/selections", json={"budget": 1}, headers=hub.labeler).json()["cases"]
    cid = cases[0]["case"]["case_id"]
    r = hub.client.post(f"/v1/cases/{cid}/release", headers=hub.labeler)
    assert r.status_code == 200 and r.json()["state"] == "unlabeled"
    assert hub.client.get("/v1/pool", headers=hub.labeler).json()["total"] == 3
    hub.label(cid, 1)
    assert hub.client.post(f"/v1/cases/{cid}/release", headers=hub.labeler).status_code == 409
    assert hub.client.post("/v1/cases/nope/release", headers=hub.labeler).status_code == 404


def test_selection_skips_near_duplicates_of_labeled_cases(hub: HubHarness) -> None:
    emb = np.ones(16, np.float32)
    done = hub.send_case("d1", embedding=emb, probs=[0.4, 0.3, 0.3])
    hub.label(done, 0)
    twin = hub.send_case("d1", embedding=emb * 1.001, probs=[0.34, 0.33, 0.33])
    other = hub.send_case("d1", embedding=-emb, probs=[0.6, 0.2, 0.2])
    for strategy in STRATEGIES:
        cases = hub.client.post("/v1/selections", json={"budget": 5, "strategy": strategy, "exclude_queued": False},
                                headers=hub.labeler).json()["cases"]
        ids = {c["case"]["case_id"] for c in cases}
        assert twin not in ids and other in ids, strategy


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_the_labeled_set_is_indexed_once_and_grows_with_new_labels(hub_factory: Any, backend: str) -> None:
    """Each worker keeps the labeled embeddings indexed (fleet.hub.labeled_set): a later selection adds only what
    was labeled since, and dedup sees it; a withdrawn label makes it index again from scratch."""
    hub = hub_factory(similarity_search=backend)
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(6, 16)).astype(np.float32)
    first = hub.send_case("d1", embedding=vecs[0], probs=[0.4, 0.3, 0.3])
    hub.label(first, 0)
    pool = [hub.send_case("d1", embedding=v, probs=[0.34, 0.33, 0.33]) for v in vecs[1:4]]

    def select(budget: int) -> set[str]:
        r = hub.client.post("/v1/selections", json={"budget": budget, "strategy": "uncertainty",
                                                    "exclude_queued": False}, headers=hub.labeler)
        assert r.status_code == 200, r.text
        return {c["case"]["case_id"] for c in r.json()["cases"]}

    assert select(3) == set(pool)
    labeled = hub.hub.stats["labeled_sets"]["m1"]
    index = labeled.indexes[16]
    assert labeled.ids == {first} and len(index) == 1 and labeled.backend == backend
    hub.label(pool[0], 1)  # labeled since: the next selection adds it, to the same index
    twin = hub.send_case("d1", embedding=vecs[1] * 1.001, probs=[0.34, 0.33, 0.33])
    assert twin not in select(5)  # a near duplicate of what was just labeled
    assert hub.hub.stats["labeled_sets"]["m1"].indexes[16] is index and len(index) == 2
    with Session(hub.hub.engine) as s:  # a label withdrawn (the case back in the pool)
        s.exec(sa.update(CaseRow).where(CaseRow.case_id == first).values(state="unlabeled"))  # type: ignore[call-overload]
        s.commit()
    select(1)
    rebuilt = hub.hub.stats["labeled_sets"]["m1"]
    assert rebuilt.ids == {pool[0]} and len(rebuilt.indexes[16]) == 1


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_cosine_index_finds_the_nearest_row_as_brute_force_does(backend: str) -> None:
    rng = np.random.default_rng(1)
    b, a = rng.normal(size=(700, 24)).astype(np.float32), rng.normal(size=(60, 24)).astype(np.float32)
    index = CosineIndex(24, backend=backend)
    index.add(b[:300])
    index.add(b[300:])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    brute = 1.0 - (unit(a) @ unit(b).T).max(axis=1)
    assert len(index) == 700 and index.vectors.shape == (700, 24)
    assert index.min_distance(a) == pytest.approx(brute, abs=1e-5)
    with pytest.raises(InvalidInput, match="annoy"):
        CosineIndex(4, backend="annoy")


def test_the_hub_balances_a_selection_over_a_tag(hub: HubHarness) -> None:
    """``balance``: the budget is split evenly over the tag's values in the pool (cases without the tag are one
    more group); the most uncertain of each come first. Runs on SQLite and PostgreSQL (the tag is read in SQL)."""
    rng = np.random.default_rng(0)
    cond_of: dict[str, str] = {}
    for i in range(40):
        cond = "clear" if i < 28 else ("night" if i < 34 else "fog")
        p = rng.dirichlet(np.ones(3))
        cid = hub.send_case("d1", probs=[float(x) for x in p / p.sum()], embedding=rng.normal(size=16).astype(
            np.float32), tags={"condition": cond, "frame": f"f{i}"})
        cond_of[cid] = cond
    untagged = hub.send_case("d1", probs=[0.34, 0.33, 0.33], embedding=rng.normal(size=16).astype(np.float32),
                             tags={"frame": "no condition"})
    cond_of[untagged] = ""
    r = hub.client.post("/v1/selections", json={"budget": 8, "strategy": "uncertainty", "balance": "condition"},
                        headers=hub.labeler)
    assert r.status_code == 200, r.text
    got = [cond_of[c["case"]["case_id"]] for c in r.json()["cases"]]
    assert sorted(got) == ["", "clear", "clear", "clear", "fog", "fog", "night", "night"]
    # without it, the same request over the whole pool follows the pool's mix
    hub.client.post("/v1/selections", json={"budget": 100}, headers=hub.labeler)  # empty the pool ...
    for i in range(30):
        hub.send_case("d1", probs=[0.5, 0.3, 0.2], embedding=rng.normal(size=16).astype(np.float32),
                      tags={"condition": "clear" if i < 24 else "night"})
    cases = hub.client.post("/v1/selections", json={"budget": 6, "strategy": "uncertainty", "seed": 3},
                            headers=hub.labeler).json()["cases"]  # equal scores: seeded ties, no SQL random()
    assert sum(c["case"]["tags"].get("condition") == "clear" for c in cases) >= 3


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_seeded_selection_repeats_over_the_same_pool_in_another_hub(hub: HubHarness, hub_factory: Any,
                                                                      tmp_path: Any, strategy: str) -> None:
    """Two runs of one demo seed upload the same frames as cases with other ids; a seeded selection picks the
    same images in both, ties in the score included (they go by image, not by case id); ``random`` too (seeded,
    it draws with the hub's generator over the pool read in image order, not with SQL's random())."""
    other: HubHarness = hub_factory(database_url=f"sqlite:///{tmp_path / 'second.db'}", data_dir=tmp_path / "second")
    other.register_model("m1", promote=True)
    other.enroll("d1")
    picked = []
    for h in (hub, other):
        rng = np.random.default_rng(0)
        for i in range(16):  # four scores, four cases each: every score is tied
            h.send_case("d1", probs=[0.4 + 0.1 * (i % 4), 0.3 - 0.05 * (i % 4), 0.3 - 0.05 * (i % 4)],
                        embedding=rng.normal(size=16).astype(np.float32), tags={"condition": "ab"[i % 2]})
        r = h.client.post("/v1/selections", json={"budget": 6, "strategy": strategy, "seed": 11},
                          headers=h.labeler)
        assert r.status_code == 200, r.text
        picked.append(sorted(c["case"]["image_sha256"] for c in r.json()["cases"]))
    assert len(picked[0]) == 6 and picked[0] == picked[1]


@pytest.mark.parametrize("tag", ["x.y", "time-of_day", "0"])
def test_a_balance_tag_with_dots_or_dashes_is_read_as_one_name(hub: HubHarness, tag: str) -> None:
    """The tag is a JSON key, not a path: SQLite's and PostgreSQL's JSON operators get it quoted."""
    rng = np.random.default_rng(0)
    for i in range(6):
        hub.send_case("d1", probs=[0.5, 0.3, 0.2], embedding=rng.normal(size=16).astype(np.float32),
                      tags={tag: "v" if i < 4 else "w"})
    r = hub.client.post("/v1/selections", json={"budget": 2, "strategy": "uncertainty", "balance": tag},
                        headers=hub.labeler)
    assert r.status_code == 200, r.text
    assert sorted(c["case"]["tags"][tag] for c in r.json()["cases"]) == ["v", "w"]


@pytest.mark.parametrize("balance", ["", "x" * 65, 3, "tab\tname", 'a"b', "$[0]"])
def test_a_bad_balance_tag_is_refused_with_what_was_received(hub: HubHarness, balance: Any) -> None:
    _send_pool(hub, 3)
    r = hub.client.post("/v1/selections", json={"budget": 2, "balance": balance}, headers=hub.labeler)
    assert r.status_code == 422 and "balance must be a tag name of 1-64 letters, digits" in r.json()["detail"]
    assert "received" in r.json()["detail"]
    assert hub.client.get("/v1/pool", headers=hub.labeler).json()["total"] == 3  # nothing queued


def test_bad_selection_requests(hub: HubHarness) -> None:
    r = hub.client.post("/v1/selections", json={"budget": 3, "strategy": "magic"}, headers=hub.labeler)
    assert r.status_code == 422 and "uncertainty+diversity" in r.json()["detail"]
    for body in [{"budget": 0}, {"budget": "3"}, {"budget": 10**9}, {}, {"budget": 2.5}]:
        r = hub.client.post("/v1/selections", json=body, headers=hub.labeler)
        assert r.status_code == 422, (body, r.text)
    assert hub.client.get("/v1/pool", params={"state": "lost"}, headers=hub.labeler).status_code == 422


def test_signed_image_links_expire_and_refuse_tampering(hub: HubHarness) -> None:
    case, image = hub.make_case("d1")
    assert hub.post_case(case, image).status_code == 201
    url = hub.client.post("/v1/selections", json={"budget": 1}, headers=hub.labeler).json()["cases"][0]["image_url"]
    assert url.startswith("http://hub.test/v1/cases/")
    parsed = urlparse(url)
    path, q = parsed.path, parse_qs(parsed.query)
    r = hub.client.get(path, params={"exp": q["exp"][0], "sig": q["sig"][0]})  # no bearer
    assert r.status_code == 200 and r.content == image and r.headers["content-type"] == "image/png"
    assert r.headers["access-control-allow-origin"] == "*"  # Label Studio's UI loads it cross-origin
    r = hub.client.get(path, params={"exp": int(q["exp"][0]) + 1, "sig": q["sig"][0]})
    assert r.status_code == 403 and "signature" in r.json()["detail"]
    hub.clock.advance(hub.settings.image_url_ttl_s + 1)
    r = hub.client.get(path, params={"exp": q["exp"][0], "sig": q["sig"][0]})
    assert r.status_code == 403 and "expired" in r.json()["detail"]
    assert hub.client.get(path).status_code == 422


def test_informativeness_ranks_human_disagreement_over_uncertainty() -> None:
    from fleet.hub.selection import informativeness

    probs = np.array([[0.98, 0.01, 0.01],   # confident, human agrees
                      [0.4, 0.35, 0.25],    # unsure
                      [0.98, 0.01, 0.01],   # confident, human says otherwise: a blind spot
                      [0.9, 0.05, 0.05]])   # fairly confident, challenger says otherwise
    human = np.array([0, -1, 2, -1])
    challenger = np.array([0, -1, -1, 1])
    score = informativeness(probs, human=human, challenger=challenger)
    assert score.shape == (4,) and np.all((score >= 0) & (score <= 1))
    assert score[2] > score[1] > score[0]
    assert score[3] > score[0] and score[3] >= 0.5
    assert np.allclose(informativeness(probs), informativeness(probs, human=np.full(4, -1)))


def test_unsure_disagreements_rank_before_confident_ones() -> None:
    from fleet.hub.selection import informativeness

    probs = np.array([[0.99, 0.005, 0.005], [0.4, 0.35, 0.25]])
    score = informativeness(probs, human=np.array([1, 2]))
    assert score[1] > score[0] >= 0.9


def test_diversity_gives_a_dense_blind_spot_its_share_where_k_center_gives_one_pick() -> None:
    rng = np.random.default_rng(0)
    spot = rng.normal(size=16) * 5 + rng.normal(scale=0.01, size=(60, 16))  # 60 confident mistakes, one place
    spread = rng.normal(size=(40, 16)) * 5  # 40 scattered, equally informative cases
    emb = np.concatenate([spot, spread]).astype(np.float32)
    u = np.full(100, 0.95) + rng.random(100) * 0.01
    in_spot = np.arange(100) < 60
    ud = get_strategy("uncertainty+diversity")(u, emb, 20, rng=np.random.default_rng(1))
    kc = get_strategy("uncertainty+kcenter")(u, emb, 20, rng=np.random.default_rng(1))
    assert len(ud) == len(kc) == 20
    assert in_spot[kc].sum() <= 2
    assert 8 <= in_spot[ud].sum() <= 16  # about its 60% share of the informativeness mass


def test_allocate_is_proportional_capped_and_exact() -> None:
    from fleet.hub.selection import allocate

    assert allocate(np.array([3.0, 1.0]), np.array([100, 100]), 8).tolist() == [6, 2]
    assert allocate(np.array([3.0, 1.0]), np.array([2, 100]), 8).tolist() == [2, 6]
    assert allocate(np.array([1.0, 1.0, 1.0]), np.array([1, 1, 1]), 10).sum() == 3
    assert allocate(np.array([0.0, 0.0]), np.array([5, 5]), 4).sum() == 4


def test_a_detectors_frames_rank_by_how_much_the_human_disagrees() -> None:
    """Where the human's boxes differ from the boxes the model reports (at its operating threshold), a frame
    whose objects the model missed entirely outranks one where it missed one of three; a box under the
    threshold is not reported, so it is no disagreement."""
    from fleet.hub.selection import box_informativeness
    from trigger.boxes import Boxes

    obj = [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.9]]
    model = Boxes.from_frames(
        [np.zeros((0, 4)), np.array(obj[:2]), np.array(obj + [[0.7, 0.1, 0.9, 0.3]])],
        scores=[[], [0.9, 0.9], [0.9, 0.9, 0.9, 0.2]], labels=[[], [0, 1], [0, 1, 2, 0]],
        probs=[np.zeros((0, 3)), np.eye(3)[[0, 1]], np.eye(3)[[0, 1, 2, 0]]])
    human = Boxes.from_frames([np.array(obj[:2]), np.array(obj), np.array(obj)],
                              labels=[[0, 1], [0, 1, 2], [0, 1, 2]])
    u = box_informativeness(model, human=human, floor=0.5)
    assert u[0] == pytest.approx(0.9 + 0.1 * (1 - 2.0 ** -3))  # two objects missed, 1 - F1 = 1
    assert 0.9 < u[1] < u[0]  # one of three missed: 1 - F1 = 0.2
    assert u[2] < 0.9  # the same objects reported; the low box under the floor is not a disagreement
    assert box_informativeness(model, human=human, floor=0.0)[2] >= 0.9  # counted, it would be one


def test_a_detectors_frames_with_more_wrong_boxes_rank_first_as_the_devices_count_triggers_do() -> None:
    """1 - F1 is 1 both for a frame whose one object the model missed and for one where it missed all three; the
    frame holding three errors is worth more labels' worth of correction, and ranks first (as the device's
    ``box_human_disagreement`` with ``count`` ranks it). A class flip and an extra box count as errors too."""
    from fleet.hub.selection import box_informativeness
    from trigger.boxes import Boxes

    obj = [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.9]]
    model = Boxes.from_frames([np.zeros((0, 4)), np.zeros((0, 4)), np.array(obj[:2]), np.array(obj[:1])],
                              scores=[[], [], [0.9, 0.9], [0.9]], labels=[[], [], [0, 2], [0]],
                              probs=[np.zeros((0, 3)), np.zeros((0, 3)), np.eye(3)[[0, 2]], np.eye(3)[[0]]])
    human = Boxes.from_frames([np.array(obj[:1]), np.array(obj), np.array(obj), np.array(obj[:1])],
                              labels=[[0], [0, 1, 2], [0, 1, 2], [0]])
    u = box_informativeness(model, human=human, floor=0.5)
    assert u[1] > u[2] > u[0] > 0.9  # 3 missed > a flip and a miss > 1 missed
    assert u[3] < 0.9  # the same box: no disagreement


def test_k_center_greedy_picks_what_scikit_activeml_core_set_picks() -> None:
    """The core-set peer (Sener & Savarese 2018) against a published implementation on the same arrays:
    scikit-activeml's ``k_greedy_center`` with cosine distance, the labeled rows as the first centres, picks the
    same points in the same order as :func:`fleet.hub.selection.k_center_greedy` seeded by the labeled set."""
    from skactiveml.pool._core_set import k_greedy_center

    from fleet.hub.selection import k_center_greedy, l2_normalize

    rng = np.random.default_rng(0)
    for _ in range(5):
        pool = rng.normal(size=(300, 16)).astype(np.float32)
        labeled = rng.normal(size=(25, 16)).astype(np.float32)
        ours = k_center_greedy(pool, 20, seeds=l2_normalize(labeled))
        x = np.vstack([labeled, pool]).astype(np.float64)
        y = np.r_[np.zeros(25), np.full(300, np.nan)]
        theirs, _ = k_greedy_center(x, y, batch_size=20, metric="cosine", random_state=0)
        assert (np.asarray(theirs) - 25).tolist() == ours.tolist()



def test_badge_draws_each_pick_as_scikit_activeml_badge_does() -> None:
    """BADGE against a published implementation on the same arrays: scikit-activeml's ``Badge`` over a logistic
    regression's probabilities, with the raw features as the embedding. Its first pick is ours (the longest
    gradient), and for the sequence it drew, the D^2 probabilities it drew each pick from are ours to 1e-6."""
    from skactiveml.classifier import SklearnClassifier
    from skactiveml.pool import Badge
    from sklearn.linear_model import LogisticRegression

    from fleet.hub.selection import badge_probabilities, badge_strategy, gradient_embeddings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6))
    y = np.full(240, np.nan)
    labeled = rng.choice(240, 30, replace=False)
    y[labeled] = np.r_[[0, 1, 2, 3], rng.integers(0, 4, 26)]
    clf = SklearnClassifier(LogisticRegression(), classes=np.arange(4)).fit(x, y)
    picks, utilities = Badge(random_state=3).query(x, y, clf, fit_clf=False, batch_size=12, return_utilities=True)
    pool = np.flatnonzero(np.isnan(y))
    at = {int(j): i for i, j in enumerate(pool)}
    g = gradient_embeddings(clf.predict_proba(x[pool]), x[pool])
    assert g.shape == (len(pool), 4 * 6)
    ours = badge_probabilities(g, [at[int(p)] for p in picks])
    for step, theirs in enumerate(utilities):
        theirs = theirs[pool]
        drawn = np.isnan(theirs)  # they blank what was already picked; ours gives it probability 0
        np.testing.assert_allclose(ours[step][~drawn], theirs[~drawn], atol=1e-6)
        assert ours[step][drawn].sum() == 0.0
    first = badge_strategy(np.zeros(len(pool)), g, 1, rng=np.random.default_rng(0))
    assert pool[first[0]] == picks[0]
    picked = badge_strategy(np.zeros(len(pool)), g, 12, rng=np.random.default_rng(0))
    assert len(set(picked.tolist())) == 12


def test_the_hub_selects_by_badge_from_each_cases_probabilities(hub: HubHarness) -> None:
    """`strategy: badge` over the pool: gradient embeddings from each case's probabilities and embedding. The first
    pick is the longest gradient: the one unsure case (its predicted class at 0.4), whatever order the pool comes
    in; the rest are drawn by distance in gradient space, each case once."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(4, 16))
    unsure = set()
    for c in range(4):
        for j in range(10):
            top = 0.4 if (c, j) == (2, 0) else 0.97
            cid = hub.send_case("d1", probs=[top, (1 - top) * 0.6, (1 - top) * 0.4],
                                embedding=centres[c] + 0.01 * rng.normal(size=16))
            if top < 0.5:
                unsure.add(cid)
    r = hub.client.post("/v1/selections", json={"budget": 4, "strategy": "badge", "seed": 1}, headers=hub.labeler)
    assert r.status_code == 200, r.text
    body = r.json()
    picked = [c["case"]["case_id"] for c in body["cases"]]
    assert body["strategy"] == "badge" and len(set(picked)) == 4 and unsure <= set(picked)


def test_entropy_top_k_ranks_by_entropy_where_least_confidence_ranks_otherwise(hub: HubHarness) -> None:
    """The entropy peer ranks by the spread of the whole distribution: [0.6, 0.2, 0.2] (entropy 0.86 of log 3)
    before [0.55, 0.45, 0] (0.63), which least confidence ranks the other way round (0.60 vs 0.68)."""
    rng = np.random.default_rng(0)
    spread = hub.send_case("d1", probs=[0.6, 0.2, 0.2], embedding=rng.normal(size=16))
    two_way = hub.send_case("d1", probs=[0.55, 0.45, 0.0], embedding=rng.normal(size=16))
    for _ in range(4):
        hub.send_case("d1", probs=[0.96, 0.02, 0.02], embedding=rng.normal(size=16))
    picks = {}
    for strategy in ("entropy", "uncertainty"):
        r = hub.client.post("/v1/selections", json={"budget": 1, "strategy": strategy}, headers=hub.labeler)
        assert r.status_code == 200, r.text
        picks[strategy] = r.json()["cases"][0]["case"]["case_id"]
        hub.client.post(f"/v1/cases/{picks[strategy]}/release", headers=hub.labeler)
    assert picks == {"entropy": spread, "uncertainty": two_way}
