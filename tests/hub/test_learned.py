"""The learned trigger (trigger.learned, fleet.hub.learned): the hub's logistic fit checked against
scikit-learn, its AUC against scikit-learn's, the fit on a campaign's labeled cases shipped as a new campaign
version, and the device computing the same probability from the spec with numpy alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.edge.campaigns import Campaigns
from fleet.hub.learned import KNN_K, MIN_CASES, auc, case_features, fit_logistic, fit_poisson, spec_for_model
from fleet.protocol import Assignment, LearnedFit, TriggerHit
from tests.hub.conftest import HubHarness
from trigger import TRIGGERS, parse_spec
from trigger.learned import BANK_FEATURES, FEATURES, error_features, error_probability, neighbour_features
from trigger.triggers import Inputs


def test_the_fit_and_the_auc_agree_with_scikit_learn() -> None:
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    x = rng.random((400, len(FEATURES)))
    y = (rng.random(400) < 1 / (1 + np.exp(-(3 * x[:, 0] - 2 * x[:, 1] + 2 * x[:, 3] - 1.5)))).astype(float)
    w, b = fit_logistic(x, y, l2=1.0)
    ref = sklearn_lm.LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(x, y)  # lbfgs: intercept free
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-4)
    assert b == pytest.approx(float(ref.intercept_[0]), abs=1e-4)
    sw = rng.integers(1, 4, 400).astype(float)  # a detector's fit weighs each wrong case by its box errors
    w2, b2 = fit_logistic(x, y, l2=1.0, sample_weight=sw)
    ref2 = sklearn_lm.LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(x, y, sample_weight=sw)
    np.testing.assert_allclose(w2, ref2.coef_[0], atol=1e-4)
    assert b2 == pytest.approx(float(ref2.intercept_[0]), abs=1e-4)
    score = np.round(x @ w + b, 1)  # rounded: ties must count half, as scikit-learn counts them
    assert auc(score, y) == pytest.approx(metrics.roc_auc_score(y, score), abs=1e-12)
    assert auc(score, np.zeros(400)) is None


def test_the_poisson_fit_agrees_with_scikit_learn_and_refuses_bad_counts() -> None:
    """A detector's fit: counts of box errors from the box features and their products, as scikit-learn's
    PoissonRegressor fits them (the same objective), at the hub's penalty and without one."""
    from fleet.hub.learned import POISSON_L2
    from trigger.learned import BOX_COUNT_FEATURES, BOX_FEATURES, with_pairs

    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(3)
    raw = rng.random((600, len(BOX_FEATURES)))
    x = with_pairs(raw)
    assert x.shape == (600, len(BOX_COUNT_FEATURES)) and x[:, len(BOX_FEATURES)] == pytest.approx(raw[:, 0] * raw[:, 1])
    y = rng.poisson(np.exp(-1.0 + 2.0 * raw[:, 1] + 1.5 * raw[:, 0] * raw[:, 4])).astype(float)
    for l2 in (POISSON_L2, 1e-1):
        w, b = fit_poisson(x, y, l2=l2)
        ref = sklearn_lm.PoissonRegressor(alpha=l2, tol=1e-12, max_iter=10_000).fit(x, y)
        np.testing.assert_allclose(w, ref.coef_, atol=1e-4)
        assert b == pytest.approx(float(ref.intercept_), abs=1e-4)
    for bad in (-y, np.where(y > 0, np.nan, y)):
        with pytest.raises(ValueError, match="counts >= 0"):
            fit_poisson(x, bad)


def test_features_are_the_devices_scores() -> None:
    probs = np.asarray([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    human = np.asarray([0, 2, -1])
    ch = np.asarray([[0.1, 0.8, 0.1], [np.nan] * 3, [0.6, 0.3, 0.1]])
    f = error_features(probs, human, ch)
    assert f[:, 0] == pytest.approx((1 - probs.max(1)) / (2 / 3))
    assert f[:, 1] == pytest.approx([0.5, 0.05, 0.0])
    assert f[:, 3].tolist() == [0, 1, 0] and f[:, 4].tolist() == [1, 1, 0]  # human: disagrees on frame 1 only
    assert f[:, 5].tolist() == [1, 0, 0] and f[:, 6].tolist() == [1, 0, 1]  # challenger: no output on frame 1
    with pytest.raises(ValueError, match="human must have shape"):
        error_features(probs, np.asarray([0, 5, 1]))


def test_box_features_are_read_from_the_reported_boxes_and_the_others() -> None:
    """Three frames at an operating threshold of 0.4: a sure box the human also drew and a faint one under the
    threshold; no box where the human drew one; a box at 0.5 and no human. The challenger saw only frame 0 and
    found nothing there."""
    from trigger.boxes import Boxes
    from trigger.learned import BOX_FEATURES, box_error_features

    model = Boxes.from_frames([[(0, 0, .5, .5), (.1, .1, .6, .6)], [], [(.2, .2, .4, .4)]],
                              scores=[[0.9, 0.35], [], [0.5]], labels=[[0, 1], [], [1]])
    human = Boxes.from_frames([[(0, 0, .5, .5)], [(.3, .3, .5, .5)], []], labels=[[0], [1], []],
                              known=[True, True, False])
    challenger = Boxes.from_frames([[], [], []], known=[True, False, False])
    f = dict(zip(BOX_FEATURES, box_error_features(model, human, challenger, floor=0.4).T, strict=True))
    np.testing.assert_allclose(f["low_score"], [0.1, 0.0, 0.5])  # 1 - the lowest reported score
    assert f["near_floor"].tolist() == [0.5, 0.0, 0.5] and f["reported"].tolist() == [1 / 8, 0.0, 1 / 8]
    assert f["entropy_sum"].tolist() == [0, 0, 0]  # no class distributions
    assert f["human"].tolist() == [0.0, 0.5, 0.0] and f["human_known"].tolist() == [1, 1, 0]  # frame 1: one missed
    assert f["challenger"].tolist() == [0.5, 0, 0] and f["challenger_known"].tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="human must be Boxes of the same 3 frames"):
        box_error_features(model, Boxes.empty(2), floor=0.4)


def send(hub: HubHarness, rng: np.random.Generator, n: int) -> None:
    """Cases on which the model is wrong when it is unsure or when the human's action says another class."""
    for _ in range(n):
        top = float(rng.uniform(0.35, 0.98))
        probs = [top, (1 - top) * 0.6, (1 - top) * 0.4]
        human = int(rng.integers(0, 3)) if rng.random() < 0.5 else None
        case, image = hub.make_case("d1", probs=probs, campaign_id="mine", campaign_version=1, human=human,
                                    triggers=[TriggerHit("unsure", 0.5, 0.1)])
        assert hub.post_case(case, image).status_code == 201


def test_without_an_active_model_there_is_nothing_to_fit_to(bare_hub: HubHarness) -> None:
    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert bare_hub.client.post("/v1/campaigns", json={"spec": spec}, headers=bare_hub.admin).status_code == 201
    r = bare_hub.client.post("/v1/campaigns/mine/learn", headers=bare_hub.admin)
    assert r.status_code == 422 and "no active model" in r.json()["detail"]


def test_the_hub_fits_and_ships_a_learned_trigger(hub: HubHarness) -> None:
    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    rng = np.random.default_rng(1)
    send(hub, rng, 10)
    sel = hub.client.post("/v1/selections", json={"budget": 100, "strategy": "random"}, headers=hub.labeler)

    def truth(c: dict) -> int:  # the right class: another one when the model was unsure or the human said so
        human = (c["human_action"] or {}).get("label")
        wrong = c["prediction"]["probs"][0] < 0.6 or (human is not None and human != 0)
        return (human if human not in (None, 0) else 1) if wrong else 0

    for c in sel.json()["cases"]:
        hub.label(c["case"]["case_id"], truth(c["case"]))
    r = hub.client.post("/v1/campaigns/mine/learn", headers=hub.admin)
    assert r.status_code == 422 and f"at least {MIN_CASES} labeled cases from the active model m1" in r.text
    send(hub, rng, 70)
    sel = hub.client.post("/v1/selections", json={"budget": 100, "strategy": "random"}, headers=hub.labeler)
    for c in sel.json()["cases"]:
        hub.label(c["case"]["case_id"], truth(c["case"]))

    r = hub.client.post("/v1/campaigns/mine/learn", params={"target_rate": 0.1}, headers=hub.admin)
    assert r.status_code == 201, r.text
    fit = LearnedFit.from_json(r.content)
    assert (fit.version, fit.model_version, fit.cases) == (2, "m1", 80) and 0 < fit.errors < 80
    assert fit.weights["least_confidence"] > 0 and fit.weights["human"] > 0  # both signals learned
    assert fit.train_auc is not None and fit.train_auc > 0.9
    # devices are assigned the new version; its rule fires on the learned leaf too, at the asked rate
    a = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).content)
    shipped = parse_spec(a.campaigns[0].spec)
    assert a.campaigns[0].version == 2 and shipped.labels == ("unsure", "learned_error")
    leaf = shipped.leaves[1]
    assert leaf.mode == "target_rate" and leaf.threshold == 0.1
    # the device computes the hub's probability from the spec's weights, numpy only
    probs = np.asarray([[0.9, 0.06, 0.04], [0.45, 0.33, 0.22], [0.9, 0.06, 0.04]])
    human = np.asarray([-1, -1, 2])
    on_device = TRIGGERS["learned_error"].compute(Inputs(logits=np.log(probs), probs=probs, human=human), None,
                                                  leaf.params)
    want = error_probability(error_features(probs, human), [fit.weights[f] for f in FEATURES], fit.bias)
    np.testing.assert_allclose(on_device, want, atol=1e-5)
    assert on_device[1] > on_device[0] and on_device[2] > on_device[0]  # unsure, and a disagreeing human
    # a refit replaces the learned leaf
    again = LearnedFit.from_json(hub.client.post("/v1/campaigns/mine/learn", headers=hub.admin).content)
    spec3 = hub.client.get("/v1/campaigns/mine", headers=hub.admin).json()["versions"][0]["spec"]
    assert again.version == 3 and parse_spec(spec3).labels == ("unsure", "learned_error")
    assert hub.client.post("/v1/campaigns/nobody/learn", headers=hub.admin).status_code == 404
    assert hub.client.post("/v1/campaigns/mine/learn", params={"target_rate": 1.5},
                           headers=hub.admin).status_code == 422
    assert case_features([{"prediction": {"probs": [0.5, 0.5]}}]).shape == (1, len(FEATURES))


def _leaf(hub: HubHarness) -> tuple[int, dict | None]:  # type: ignore[type-arg]
    """The version the device d1 is assigned, and its learned leaf's parameters (None: no leaf)."""
    a = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).content)
    spec = parse_spec(a.campaigns[0].spec)
    leaves = [leaf.params for leaf in spec.leaves if leaf.trigger == "learned_error"]
    return a.campaigns[0].version, leaves[0] if leaves else None


def _label_all(hub: HubHarness, truth: Any) -> int:  # type: ignore[no-untyped-def]
    sel = hub.client.post("/v1/selections", json={"budget": 200, "strategy": "random"}, headers=hub.labeler)
    cases = sel.json()["cases"]
    for c in cases:
        assert hub.label(c["case"]["case_id"], truth(c["case"])).status_code in (200, 201)
    return len(cases)


def test_the_learned_trigger_follows_the_active_model_across_an_update_and_back(hub: HubHarness) -> None:
    """A fit belongs to the model whose scores it was fitted on. m1's fit ships; when m2 becomes active, the
    campaign's next version drops the leaf (m2 has no labeled cases), and the devices running m2 never get m1's
    weights; once enough of m2's cases are labeled the hub refits on its own, on m2's cases only (m2 is wrong
    where the human disagrees, not where it is unsure); when m1 comes back, m1's fit is made again from m1's
    cases."""
    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    rng = np.random.default_rng(2)
    send(hub, rng, 80)

    def m1_truth(c: dict) -> int:  # type: ignore[type-arg]  # m1 is wrong where it is unsure
        return 1 if c["prediction"]["probs"][0] < 0.6 else 0

    assert _label_all(hub, m1_truth) == 80
    assert hub.client.post("/v1/campaigns/mine/learn", params={"target_rate": 0.1},
                           headers=hub.admin).status_code == 201
    version, leaf = _leaf(hub)
    assert version == 2 and leaf is not None and leaf["w_least_confidence"] > 1.0

    hub.register_model("m2", promote=True)  # m2 active: m1's fit must not reach a device that runs m2
    version, leaf = _leaf(hub)
    assert version == 3 and leaf is None
    spec3 = hub.client.get("/v1/campaigns/mine", headers=hub.admin).json()["versions"][0]["spec"]
    assert parse_spec(spec3).labels == ("unsure",)

    for _ in range(80):  # m2's cases: wrong exactly where the human names another class
        top = float(rng.uniform(0.35, 0.98))
        human = int(rng.integers(0, 3)) if rng.random() < 0.6 else None
        case, image = hub.make_case("d1", model_version="m2", probs=[top, (1 - top) * 0.6, (1 - top) * 0.4],
                                    campaign_id="mine", campaign_version=3, human=human,
                                    triggers=[TriggerHit("unsure", 0.5, 0.1)])
        assert hub.post_case(case, image).status_code == 201

    def m2_truth(c: dict) -> int:  # type: ignore[type-arg]
        human = (c["human_action"] or {}).get("label")
        return human if human not in (None, 0) else 0

    _label_all(hub, m2_truth)
    version, leaf = _leaf(hub)  # refitted as the labels came in, without anyone asking
    assert version == 4 and leaf is not None
    assert leaf["w_human"] > 1.0 and leaf["w_human"] > abs(leaf["w_least_confidence"])

    hub.client.post("/v1/models/m1/promote", headers=hub.admin, json={"override": True, "reason": "back to m1"})
    version, leaf = _leaf(hub)  # m1 again: refitted from m1's labeled cases at once
    assert version == 5 and leaf is not None and leaf["w_least_confidence"] > 1.0


def test_a_leaf_that_no_longer_fits_the_spec_neither_fails_labels_nor_ships(hub: HubHarness,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault: publishing the fitted leaves fails (they do not fit the campaign's spec). A label that
    would have refitted a waiting campaign is still accepted and publishes nothing; a model change that keeps a
    leaf publishes the campaign without it instead of failing the promotion."""
    import fleet.hub.learned as learned
    from fleet.errors import ProtocolError

    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    send(hub, np.random.default_rng(2), 80)
    assert hub.client.post("/v1/campaigns/mine/learn", params={"target_rate": 0.1},
                           headers=hub.admin).status_code == 422  # nothing labeled yet: the campaign waits

    def refuse(*_: Any, **__: Any) -> Any:
        raise ProtocolError("the learned leaf does not fit campaign 'mine''s spec: injected")

    monkeypatch.setattr(learned, "_publish", refuse)
    assert _label_all(hub, lambda c: 1 if c["prediction"]["probs"][0] < 0.6 else 0) == 80  # every label accepted
    version, leaf = _leaf(hub)
    assert version == 1 and leaf is None  # no version published, none half-written
    monkeypatch.undo()

    assert hub.client.post("/v1/campaigns/mine/learn", params={"target_rate": 0.1},
                           headers=hub.admin).status_code == 201  # m1's leaf: version 2
    g = _Groups(hub, "mine")  # s1 in cam-south, which gets a model of its own, m2, and m2's labels fit its leaf
    g.group_rollout("m2")
    g.send_and_label("m2", 60, _human_wrong, np.random.default_rng(5))
    model, version, leaf = g.served("s1")
    assert (model, version) == ("m2", 3) and leaf is not None
    monkeypatch.setattr(learned, "_publish", refuse)
    g.group_rollout("m4")  # m2's leaf goes and m1's would stay, but publishing it fails: the campaign goes without
    assert _leaf(hub) == (4, None) and g.served("s1") == ("m4", 4, None)


def test_with_the_model_s_bank_the_learned_trigger_reads_the_nearest_training_labels(hub: HubHarness) -> None:
    """m1's own novelty bank (its training set's embeddings, with labels) adds the bank feature: frames that look
    like training frames of another class are the model's errors even where it is sure and no human spoke. The leaf
    ships as ``learned_error_knn``; the device computes the hub's probability against the bank it is handed."""
    from tests.hub.test_model_banks import put_bank
    from trigger import NoveltyBank

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16))
    bank_y = np.repeat(np.arange(3), 40)
    bank = NoveltyBank.from_embeddings(centres[bank_y] + 0.2 * rng.normal(size=(len(bank_y), 16)), labels=bank_y)
    assert put_bank(hub, "m1", bank.to_bytes()).status_code == 201
    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    truth: dict[str, int] = {}
    for i in range(80):  # the model always says class 0, sure of it; a third of the frames are class 2
        y = 2 if i % 3 == 0 else 0
        top = float(rng.uniform(0.8, 0.95))
        case, image = hub.make_case("d1", probs=[top, (1 - top) / 2, (1 - top) / 2], campaign_id="mine",
                                    campaign_version=1, embedding=centres[y] + 0.2 * rng.normal(size=16),
                                    triggers=[TriggerHit("unsure", 0.5, 0.1)])
        assert hub.post_case(case, image).status_code == 201
        truth[case.case_id] = y
    assert _label_all(hub, lambda c: truth[c["case_id"]]) == 80

    fit = LearnedFit.from_json(hub.client.post("/v1/campaigns/mine/learn", headers=hub.admin).content)
    assert set(fit.weights) == set(BANK_FEATURES) and fit.weights["neighbours_other"] > 1.0
    assert fit.trigger == "learned_error_knn"
    assert fit.bank_note == "bank feature from novelty bank model-m1 of model m1 (120 entries, k=10)"
    assert fit.train_auc is not None and fit.train_auc > 0.95  # confidence alone says nothing here
    a = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).content)
    ref = a.campaigns[0]
    assert ref.novelty_bank == "model-m1"  # the device is handed its model's bank with the spec
    leaf = next(x for x in parse_spec(ref.spec).leaves if x.label == "learned_error")
    assert leaf.trigger == "learned_error_knn" and leaf.params["k"] == KNN_K

    y = np.asarray([2, 0])
    emb = (centres[y] + 0.2 * rng.normal(size=(2, 16))).astype(np.float32)
    probs = np.asarray([[0.9, 0.05, 0.05]] * 2)
    served = NoveltyBank.from_bytes(hub.client.get("/v1/novelty-banks/model-m1", headers=hub.devices["d1"]).content)
    on_device = TRIGGERS["learned_error_knn"].compute(
        Inputs(logits=np.log(probs), probs=probs, embeddings=emb, bank=served), None, leaf.params)
    _, idx = bank.search(emb, k=KNN_K)
    x = np.column_stack([error_features(probs), neighbour_features(probs, bank.labels[idx])])
    want = error_probability(x, [fit.weights[f] for f in BANK_FEATURES], fit.bias)
    np.testing.assert_allclose(on_device, want, atol=1e-5)
    assert on_device[0] > 0.5 > on_device[1]  # looks like a 2, called a 0: a likely error


def test_without_embeddings_or_a_labeled_bank_the_leaf_has_no_bank_feature(hub: HubHarness) -> None:
    from tests.hub.test_model_banks import bank_bytes, put_bank

    assert put_bank(hub, "m1", bank_bytes()).status_code == 201  # a bank without labels
    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    send(hub, np.random.default_rng(1), 60)  # no embeddings
    _label_all(hub, lambda c: 0 if c["prediction"]["probs"][0] >= 0.6 else 1)
    fit = LearnedFit.from_json(hub.client.post("/v1/campaigns/mine/learn", headers=hub.admin).content)
    assert set(fit.weights) == set(FEATURES) and fit.trigger == "learned_error"
    assert fit.bank_note == "no bank feature: novelty bank model-m1 of model m1 has no labels"
    _, leaf = _leaf(hub)
    assert leaf is not None and "w_neighbours_other" not in leaf
    from trigger import NoveltyBank

    rng = np.random.default_rng(4)  # a bank with labels now, but the cases have no embeddings
    labeled = NoveltyBank.from_embeddings(rng.normal(size=(30, 16)), labels=np.repeat(np.arange(3), 10))
    assert put_bank(hub, "m1", labeled.to_bytes()).status_code in (200, 201)  # (replaces it)
    again = LearnedFit.from_json(hub.client.post("/v1/campaigns/mine/learn", headers=hub.admin).content)
    assert again.trigger == "learned_error" and again.bank_note is not None
    assert again.bank_note.startswith(f"no bank feature: {again.cases} of the {again.cases} cases have no "
                                      f"embedding of the width of novelty bank"), again.bank_note


def test_the_bank_feature_follows_the_active_model_and_its_own_bank_across_an_update_and_back(
        hub: HubHarness) -> None:
    """m1 and m2 each have their own bank, in their own embedding space. Each fit reads the bank of the model it is
    fitted for, on that model's cases; a device running that model is handed that bank and computes the hub's
    probability with it; and back on m1, m1's bank and m1's cases again."""
    from tests.hub.test_model_banks import put_bank
    from trigger import NoveltyBank

    rng = np.random.default_rng(5)
    spaces = {"m1": rng.normal(size=(3, 16)), "m2": rng.normal(size=(3, 16))}
    banks = {}
    hub.register_model("m2")
    for version, centres in spaces.items():
        bank_y = np.repeat(np.arange(3), 40)
        banks[version] = NoveltyBank.from_embeddings(centres[bank_y] + 0.2 * rng.normal(size=(len(bank_y), 16)),
                                                     labels=bank_y)
        assert put_bank(hub, version, banks[version].to_bytes()).status_code == 201
    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201

    def knn_leaf() -> tuple[Any, Any]:
        a = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).content)
        ref = a.campaigns[0]
        leaves = [x for x in parse_spec(ref.spec).leaves if x.label == "learned_error"]
        return ref, (leaves[0] if leaves else None)

    def send_and_label(version: str, wrong_class: int) -> None:
        """The model says 0, sure of it; a third of its frames are ``wrong_class`` (in its own space)."""
        ref, _ = knn_leaf()
        truth: dict[str, int] = {}
        for i in range(60):
            y = wrong_class if i % 3 == 0 else 0
            top = float(rng.uniform(0.8, 0.95))
            case, image = hub.make_case("d1", model_version=version, probs=[top, (1 - top) / 2, (1 - top) / 2],
                                        campaign_id="mine", campaign_version=ref.version,
                                        embedding=spaces[version][y] + 0.2 * rng.normal(size=16),
                                        triggers=[TriggerHit("unsure", 0.5, 0.1)])
            assert hub.post_case(case, image).status_code == 201
            truth[case.case_id] = y
        _label_all(hub, lambda c: truth[c["case_id"]])

    def device_matches_hub(version: str, wrong_class: int) -> None:
        ref, leaf = knn_leaf()
        assert ref.novelty_bank == f"model-{version}" and leaf is not None and leaf.trigger == "learned_error_knn"
        served = NoveltyBank.from_bytes(hub.client.get(f"/v1/novelty-banks/{ref.novelty_bank}",
                                                       headers=hub.devices["d1"]).content)
        y = np.asarray([wrong_class, 0])
        emb = (spaces[version][y] + 0.2 * rng.normal(size=(2, 16))).astype(np.float32)
        probs = np.asarray([[0.9, 0.05, 0.05]] * 2)
        on_device = TRIGGERS["learned_error_knn"].compute(
            Inputs(logits=np.log(probs), probs=probs, embeddings=emb, bank=served), None, leaf.params)
        _, idx = banks[version].search(emb, k=KNN_K)
        x = np.column_stack([error_features(probs), neighbour_features(probs, banks[version].labels[idx])])
        weights = [leaf.params[f"w_{f}"] for f in BANK_FEATURES]
        np.testing.assert_allclose(on_device, error_probability(x, weights, leaf.params["bias"]), atol=1e-5)
        assert leaf.params["w_neighbours_other"] > 1.0 and on_device[0] > 0.5 > on_device[1]

    send_and_label("m1", wrong_class=2)
    assert hub.client.post("/v1/campaigns/mine/learn", headers=hub.admin).status_code == 201
    device_matches_hub("m1", 2)
    assert hub.client.post("/v1/models/m2/promote", headers=hub.admin,
                           json={"override": True, "reason": "m2"}).status_code == 200
    ref, leaf = knn_leaf()
    assert leaf is None and ref.novelty_bank is None  # m1's fit (nor m1's bank) never reaches m2's devices
    send_and_label("m2", wrong_class=1)  # refitted on m2's own cases against m2's own bank, unasked
    device_matches_hub("m2", 1)
    assert hub.client.post("/v1/models/m1/promote", headers=hub.admin,
                           json={"override": True, "reason": "back"}).status_code == 200
    device_matches_hub("m1", 2)


def test_a_device_running_another_model_gets_the_campaign_without_that_models_fit(hub: HubHarness,
                                                                                   tmp_path: Path) -> None:
    """The learned leaf reads the scores of the model it was fitted for. A group that runs a model of its own (and
    a canary device running a candidate) gets the campaign's version without the leaf; a campaign that is the leaf
    alone is not sent to it at all."""
    spec = {"id": "mine", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    send(hub, np.random.default_rng(2), 80)
    _label_all(hub, lambda c: 1 if c["prediction"]["probs"][0] < 0.6 else 0)
    assert hub.client.post("/v1/campaigns/mine/learn", params={"target_rate": 0.1},
                           headers=hub.admin).status_code == 201
    hub.enroll("s1", group="cam-south")
    hub.register_model("m2", seed=1)
    r = hub.client.post("/v1/rollouts", json={"version": "m2", "stages": [1.0], "group": "cam-south"},
                        headers=hub.trainer)
    assert r.status_code == 201, r.text
    assert hub.client.post(f"/v1/rollouts/{r.json()['rollout_id']}/advance", headers=hub.trainer).status_code == 200

    def served(device: str) -> tuple[str | None, list[Any]]:
        a = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices[device]).content)
        return (a.active.version if a.active else None), [(c.version, parse_spec(c.spec)) for c in a.campaigns]

    model, [(version, fleet_spec)] = served("d1")
    assert model == "m1" and version == 2 and "learned_error" in [x.trigger for x in fleet_spec.leaves]
    model, [(version, south_spec)] = served("s1")
    assert model == "m2" and version == 2  # the same campaign version, without m1's fit
    assert [x.trigger for x in south_spec.leaves] == ["entropy"] and south_spec.labels == ("unsure",)

    # the device's agent builds what it is sent; when its group goes back to m1, the same version comes with the
    # leaf, and the agent builds that form anew (not the stripped one it already runs)
    camps = Campaigns(None, tmp_path / "s1")
    (stripped,) = camps.apply(Assignment.from_json(hub.client.get("/v1/assignment",
                                                                  headers=hub.devices["s1"]).content).campaigns)
    assert "learned_error" not in stripped.evaluator.fired_counts
    assert hub.client.delete("/v1/groups/cam-south/model", headers=hub.admin).status_code == 200
    model, [(version, _)] = served("s1")
    assert model == "m1" and version == 2
    (full,) = camps.apply(Assignment.from_json(hub.client.get("/v1/assignment",
                                                              headers=hub.devices["s1"]).content).campaigns)
    assert full is not stripped and "learned_error" in full.evaluator.fired_counts

    row = _campaign_row(hub, "mine", 2)  # a campaign that is the leaf alone: not sent to another model's device
    leaf = next(x for x in row.spec["rule"]["any_of"] if x.get("label", x.get("trigger")) == "learned_error")
    row.spec = {**row.spec, "rule": leaf}
    assert spec_for_model(row, "m1") == row.spec and spec_for_model(row, "m2") is None


def _campaign_row(hub: HubHarness, campaign_id: str, version: int, learned_for: str = "m1") -> Any:
    from fleet.hub.db import read_session
    from fleet.hub.models import Campaign

    with read_session(hub.hub.engine) as s:
        row = s.get(Campaign, (campaign_id, version))
        assert row is not None and row.learned_for == learned_for
        s.expunge(row)
        return row


class _Groups:
    """A hub with models m2, m3 and m4 beside m1, device s1 in cam-south (and, ``north``, n1 in cam-north): group
    rollouts, what a device is served of its one campaign, cases sent and labeled, the dashboard's campaigns page."""

    def __init__(self, hub: HubHarness, campaign: str, *, north: bool = False) -> None:
        self.hub, self.campaign = hub, campaign
        hub.enroll("s1", group="cam-south")
        if north:
            hub.enroll("n1", group="cam-north")
        for version, seed in (("m2", 1), ("m3", 2), ("m4", 3)):
            hub.register_model(version, seed=seed)

    def group_rollout(self, version: str) -> None:
        r = self.hub.client.post("/v1/rollouts", json={"version": version, "stages": [1.0], "group": "cam-south"},
                                 headers=self.hub.trainer)
        assert r.status_code == 201, r.text
        r = self.hub.client.post(f"/v1/rollouts/{r.json()['rollout_id']}/advance", headers=self.hub.trainer)
        assert r.status_code == 200 and r.json()["state"] == "completed", r.text

    def served(self, device: str = "s1") -> tuple[str | None, int, dict | None]:  # type: ignore[type-arg]
        a = Assignment.from_json(self.hub.client.get("/v1/assignment", headers=self.hub.devices[device]).content)
        (ref,) = a.campaigns
        leaves = [x.params for x in parse_spec(ref.spec).leaves if x.trigger == "learned_error"]
        return (a.active.version if a.active else None), ref.version, (leaves[0] if leaves else None)

    def send_and_label(self, model: str, n: int, truth: Any, rng: np.random.Generator, device: str = "s1") -> None:
        _, version, _ = self.served(device)
        for _ in range(n):
            top = float(rng.uniform(0.35, 0.98))
            human = int(rng.integers(0, 3)) if rng.random() < 0.6 else None
            case, image = self.hub.make_case(device, model_version=model,
                                             probs=[top, (1 - top) * 0.6, (1 - top) * 0.4], campaign_id=self.campaign,
                                             campaign_version=version, human=human,
                                             triggers=[TriggerHit("unsure", 0.5, 0.1)])
            assert self.hub.post_case(case, image).status_code == 201
        _label_all(self.hub, truth)

    def dashboard(self) -> str:
        from tests.hub.test_dashboard import login, text_of

        assert login(self.hub).status_code == 303
        return text_of(self.hub.client.get("/ui/campaigns").text)


def _unsure_wrong(c: dict) -> int:  # type: ignore[type-arg]  # the model is wrong where it is unsure
    return 1 if c["prediction"]["probs"][0] < 0.6 else 0


def _human_wrong(c: dict) -> int:  # type: ignore[type-arg]  # ... where the human disagrees
    human = (c["human_action"] or {}).get("label")
    return human if human not in (None, 0) else 0


def test_a_group_campaign_is_fitted_for_the_group_s_own_model_across_its_versions(hub: HubHarness) -> None:
    """A campaign aimed at cam-south, which runs a model of its own (m2, then m4), is fitted on the cases that
    model captured and ships with the leaf to the group's devices; a new fleet model (m3) leaves it alone; the
    group's next model takes the leaf away until that model's own labels refit it, unasked; and when the group runs
    the fleet's model again, the fit for the group's model goes too."""
    g = _Groups(hub, "south")
    g.group_rollout("m2")
    spec = {"id": "south", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    r = hub.client.post("/v1/campaigns", json={"spec": spec, "groups": ["cam-south"]}, headers=hub.admin)
    assert r.status_code == 201, r.text
    rng = np.random.default_rng(6)
    g.send_and_label("m1", 40, _unsure_wrong, rng)  # the fleet model's cases do not count for the group's fit
    r = hub.client.post("/v1/campaigns/south/learn", params={"target_rate": 0.1}, headers=hub.admin)
    assert r.status_code == 422 and (f"at least {MIN_CASES} labeled cases from model m2 (run by group cam-south) "
                                     f"with both right and wrong ones; it has 0") in r.text, r.text
    g.send_and_label("m2", 60, _unsure_wrong, rng)
    r = hub.client.post("/v1/campaigns/south/learn", params={"target_rate": 0.1}, headers=hub.admin)
    assert r.status_code == 201, r.text
    fit = LearnedFit.from_json(r.content)
    assert (fit.model_version, fit.cases, fit.version) == ("m2", 60, 2)
    model, version, leaf = g.served()
    assert (model, version) == ("m2", 2) and leaf is not None and leaf["w_least_confidence"] > 1.0
    assert "south 2 cam-south fitted for m2, 10% of frames" in g.dashboard()  # the operator sees which model

    assert hub.client.post("/v1/models/m3/promote", headers=hub.admin,
                           json={"override": True, "reason": "m3"}).status_code == 200
    assert g.served() == (model, version, leaf)  # the fleet's new model is not the group's: no new version

    g.group_rollout("m4")  # the group's next model: no labels of its own yet, so no leaf
    model, version, leaf = g.served()
    assert (model, version, leaf) == ("m4", 3, None)
    assert (f"south 3 cam-south waits for {MIN_CASES} labeled cases from model m4 (run by group cam-south)"
            in g.dashboard())
    g.send_and_label("m4", 80, _human_wrong, rng)  # refitted on m4's cases as their labels came in
    model, version, leaf = g.served()
    assert (model, version) == ("m4", 4) and leaf is not None
    assert leaf["w_human"] > 1.0 and leaf["w_human"] > abs(leaf["w_least_confidence"])
    _campaign_row(hub, "south", 4, learned_for="m4")

    assert hub.client.delete("/v1/groups/cam-south/model", headers=hub.admin).status_code == 200
    model, version, leaf = g.served()  # the fleet's m3 again, and no case of m3's to fit on
    assert (model, version, leaf) == ("m3", 5, None)
    assert f"south 5 cam-south waits for {MIN_CASES} labeled cases from the active model m3" in g.dashboard()


def test_a_fleet_campaign_is_fitted_for_every_model_its_devices_run_across_their_versions(
        hub: HubHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A campaign for the whole fleet while cam-south runs a model of its own: one fit for each model the devices
    run (the fleet's m1, the group's m2), each device served the leaf of its own model in the same campaign version.
    Across the models' versions: the group's next model (m4) takes only the group's leaf away until m4's labels
    refit it, unasked, leaving m1's leaf as it was; the fleet's next model (m3) takes only m1's away. The
    operator's command then says which model was fitted and why the other was not."""
    from fleet.hub.learned import fitted_leaves

    g = _Groups(hub, "fleet", north=True)
    g.group_rollout("m2")
    spec = {"id": "fleet", "version": 1, "rule": {"trigger": "entropy", "above": 0.1, "label": "unsure"}}
    assert hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin).status_code == 201
    rng = np.random.default_rng(8)
    g.send_and_label("m1", 60, _unsure_wrong, rng, device="n1")  # m1 is wrong where it is unsure
    g.send_and_label("m2", 60, _human_wrong, rng, device="s1")  # m2 where the human disagrees
    r = hub.client.post("/v1/campaigns/fleet/learn", params={"target_rate": 0.1}, headers=hub.admin)
    assert r.status_code == 201, r.text
    fit = LearnedFit.from_json(r.content)
    assert (fit.model_version, fit.cases, fit.version) == ("m1", 60, 2)  # the answer: the fleet model's fit,
    (other,) = fit.others  # then the group model's, and no model left out
    assert (other.model_version, other.cases, other.version, fit.not_fitted) == ("m2", 60, 2, {})
    assert other.weights["human"] > 1.0 and fit.weights["least_confidence"] > 1.0
    m1_model, version, m1_leaf = g.served("n1")
    m2_model, version2, m2_leaf = g.served("s1")
    assert (m1_model, m2_model, version, version2) == ("m1", "m2", 2, 2) and m1_leaf and m2_leaf
    assert m1_leaf["w_least_confidence"] > 1.0 and m1_leaf["w_least_confidence"] > abs(m1_leaf["w_human"])
    assert m2_leaf["w_human"] > 1.0 and m2_leaf["w_human"] > abs(m2_leaf["w_least_confidence"])
    assert "fleet 2 every group fitted for m1, m2, 10% of frames" in g.dashboard()

    g.group_rollout("m4")  # the group's next model, no labels yet: its devices lose the leaf, m1's stays
    assert g.served("s1") == ("m4", 3, None) and g.served("n1") == ("m1", 3, m1_leaf)
    assert ("fleet 3 every group fitted for m1, 10% of frames; waits for 30 labeled cases from model m4 (run by group "
            "cam-south)") in g.dashboard()
    g.send_and_label("m4", 80, _human_wrong, rng, device="s1")  # refitted for m4 as its labels came in
    model, version, m4_leaf = g.served("s1")
    assert (model, version) == ("m4", 4) and m4_leaf and m4_leaf["w_human"] > 1.0
    assert g.served("n1") == ("m1", 4, m1_leaf)  # kept as fitted: m1's cases did not change

    assert hub.client.post("/v1/models/m3/promote", headers=hub.admin,
                           json={"override": True, "reason": "m3"}).status_code == 200
    assert g.served("n1") == ("m3", 5, None) and g.served("s1") == ("m4", 5, m4_leaf)
    row = _campaign_row(hub, "fleet", 5, learned_for="m4")  # the group's leaf is the spec's own now
    assert set(fitted_leaves(row)) == {"m4"} and row.learned_leaves == {}
    assert ("fleet 5 every group fitted for m4, 10% of frames; waits for 30 labeled cases from the active model m3"
            in g.dashboard())

    run = _cli(hub, monkeypatch, ["learn", "fleet", "--target-rate", "0.1"])
    assert run.exit_code == 0, run.output
    fitted, not_fitted = run.output.splitlines()
    assert fitted.startswith("learned: fleet v6 for model m4 on 80 cases")
    assert not_fitted.startswith("not fitted for model m3: a learned trigger for campaign 'fleet' needs at least 30 "
                                 "labeled cases from the active model m3")


def test_a_detector_s_learned_trigger_is_fitted_on_box_errors_and_the_device_computes_it(
        hub: HubHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """For a detector the label says the model was wrong when its reported boxes differ from the labeled ones.
    Here the model misses the object it scored just under its operating threshold, and the human's boxes, where
    known, are the truth: the fit learns both signals (the faint box under the floor and the human), ships a
    ``learned_box_error_hist`` leaf at the model's operating threshold, and the device's trigger gives the hub's
    expected count of box errors from the same boxes."""
    from fleet.hub.learned import BOX_LEAF, detect_case_features
    from fleet.protocol import Box, Detection
    from tests.hub.test_detect_cases import box_label, frame_png, register_detector
    from tests.support.cases import make_detect_case
    from trigger.boxes import Boxes
    from trigger.learned import BOX_HIST_FEATURES, expected_count

    register_detector(hub, "det1")
    assert hub.client.post("/v1/models/det1/promote", headers=hub.admin,
                           json={"override": True, "reason": "a detector"}).status_code == 200
    op = 0.5  # register_detector's: DetectorSpec's default operating threshold
    spec = {"id": "boxes", "version": 1, "rule": {"trigger": "box_ambiguous_count", "above": 0, "label": "unsure"}}
    r = hub.client.post("/v1/campaigns", json={"spec": spec}, headers=hub.admin)
    assert r.status_code == 201, r.text
    rng = np.random.default_rng(7)
    png = frame_png()
    sure = Box(0.1, 0.1, 0.4, 0.4, 0, 0.95)
    faint = Box(0.6, 0.6, 0.9, 0.9, 1, max(op - 0.05, 0.01))  # under the threshold: not reported
    for i in range(80):
        has_faint, human_known, human_right = rng.random() < 0.4, rng.random() < 0.5, rng.random() < 0.8
        found = [sure, faint] if has_faint else [sure]
        truth = [sure, faint] if has_faint and rng.random() < 0.9 else [sure]  # the faint box mostly is an object
        human = None
        if human_known:  # the human's boxes: the truth, or (now and then) one missed
            human = Detection([Box(b.x1, b.y1, b.x2, b.y2, b.label) for b in (truth if human_right else truth[:1])])
        case = make_detect_case(case_id=f"det-{i}", device_id="d1", model_version="det1", boxes=found, image=png,
                                campaign_id="boxes", campaign_version=1, human_action=human,
                                triggers=[TriggerHit("unsure", 1.0, 0.5)])
        assert hub.post_case(case, png).status_code == 201
        r = box_label(hub, case.case_id, [[b.x1, b.y1, b.x2, b.y2, b.label] for b in truth])
        assert r.status_code in (200, 201), r.text
    r = hub.client.post("/v1/campaigns/boxes/learn", params={"target_rate": 0.1}, headers=hub.admin)
    assert r.status_code == 201, r.text
    fit = LearnedFit.from_json(r.content)
    assert BOX_LEAF == "learned_box_error_hist"
    assert (fit.trigger, fit.model_version, fit.cases, set(fit.weights)) == (BOX_LEAF, "det1", 80,
                                                                             set(BOX_HIST_FEATURES))
    assert fit.train_auc is not None and fit.train_auc > 0.85
    assert fit.bank_note is not None and "operating threshold" in fit.bank_note

    a = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).content)
    (ref,) = a.campaigns
    leaf = next(x for x in parse_spec(ref.spec).leaves if x.label == "learned_error")
    assert ref.version == 2 and leaf.trigger == BOX_LEAF and leaf.params["floor"] == pytest.approx(op, abs=1e-6)
    # the device's trigger on three frames: the faint box alone, the faint box and a human who drew it, a clear
    # frame the human agrees with; the hub's features of the same boxes give the same probability
    frames = [[sure, faint], [sure, faint], [sure]]
    humans = [None, Detection([Box(s.x1, s.y1, s.x2, s.y2, s.label) for s in (sure, faint)]),
              Detection([Box(sure.x1, sure.y1, sure.x2, sure.y2, 0)])]
    model = Boxes.from_frames([[(b.x1, b.y1, b.x2, b.y2) for b in f] for f in frames],
                              scores=[[b.score for b in f] for f in frames],
                              labels=[[b.label for b in f] for f in frames])
    human_boxes = Boxes.from_frames([[(b.x1, b.y1, b.x2, b.y2) for b in (h.boxes if h else [])] for h in humans],
                                    labels=[[b.label for b in (h.boxes if h else [])] for h in humans],
                                    known=[h is not None for h in humans])
    on_device = TRIGGERS[BOX_LEAF].compute(Inputs(boxes=model, human_boxes=human_boxes, operating_threshold=0.99),
                                           None, leaf.params)  # the leaf's floor, not the device's default
    stored = [make_detect_case(case_id=f"x-{j}", device_id="d1", model_version="det1", boxes=f, image=png,
                               human_action=h).to_dict() for j, (f, h) in enumerate(zip(frames, humans, strict=True))]
    want = expected_count(detect_case_features(stored, floor=op), [fit.weights[f] for f in BOX_HIST_FEATURES],
                          fit.bias)
    np.testing.assert_allclose(on_device, want, rtol=1e-5)
    # a human who drew the missed box; a faint box alone; all agree (an expected count of errors, not a chance)
    assert on_device[1] > on_device[0] > 0.3 and on_device[2] < 0.05

    # the operator's command refits it (a new version) and prints the largest weights of the 44
    from fleet.hub import admin_cli

    run = _cli(hub, monkeypatch, ["learn", "boxes", "--target-rate", "0.1"])
    assert run.exit_code == 0, run.output
    assert run.output.startswith("learned: boxes v3 for model det1 on 80 cases") and BOX_LEAF in run.output
    shown = run.output.split(f"{BOX_LEAF}, bias ", 1)[1]
    top = sorted(fit.weights, key=lambda f: -abs(fit.weights[f]))[:admin_cli.SHOWN_WEIGHTS]
    assert all(f"{f} {fit.weights[f]:+.2f}" in shown for f in top)
    assert f"and {len(BOX_HIST_FEATURES) - admin_cli.SHOWN_WEIGHTS} more of |w| <= " in shown


def _cli(hub: HubHarness, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> Any:
    """``flywheel campaigns <args>`` as the admin, its HTTP calls answered by the in-process hub."""
    import httpx
    from typer.testing import CliRunner

    from fleet.hub import admin_cli

    def request(method: str, url: str, **kw: Any) -> Any:
        kw.pop("timeout", None)
        return hub.client.request(method, "/" + url.split("://", 1)[1].split("/", 1)[1], **kw)

    monkeypatch.setattr(httpx, "request", request)
    return CliRunner().invoke(admin_cli.campaigns_app, [*args, "--hub", "http://hub.test", "--token",
                                                        hub.settings.admin_token.get_secret_value()])
