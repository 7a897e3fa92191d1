"""The learned triggers on the device (trigger.learned): ``learned_error_knn``'s neighbour feature, read from the
model's own novelty bank, and the value the trigger computes from its spec parameters."""

from __future__ import annotations

import numpy as np
import pytest

from trigger import Evaluator, FrameBatch, NoveltyBank, softmax
from trigger.learned import BANK_FEATURES, error_features, error_probability, neighbour_features


def test_the_neighbour_feature_counts_known_labels_of_another_class() -> None:
    probs = np.asarray([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    labels = np.asarray([[0, 0, 1, -1], [0, 2, 1, 1], [-1, -1, -1, -1]])
    # frame 0: top class 0, known neighbours 0, 0, 1 -> 1/3 other; frame 1: top 1, 0 and 2 of 4 other; frame 2:
    # no known neighbour -> 0
    assert neighbour_features(probs, labels) == pytest.approx([1 / 3, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"must agree on n; received \(3, 3\) and \(2, 4\)"):
        neighbour_features(probs, labels[:2])


def test_learned_error_knn_is_the_logistic_model_over_the_banks_neighbours() -> None:
    rng = np.random.default_rng(0)
    k, d = 3, 8
    centres = rng.normal(size=(k, d))
    bank_y = np.repeat(np.arange(k), 30)
    bank = NoveltyBank.from_embeddings(centres[bank_y] + 0.1 * rng.normal(size=(len(bank_y), d)), labels=bank_y)
    # frames that look like class 2 but that the model calls class 0 (frames 0-4), and ones it gets right
    y = np.asarray([2] * 5 + [0] * 5 + [1] * 5)
    emb = (centres[y] + 0.1 * rng.normal(size=(len(y), d))).astype(np.float32)
    logits = np.zeros((len(y), k))
    logits[np.arange(len(y)), np.where(np.arange(len(y)) < 5, 0, y)] = 3.0
    weights = dict(zip(BANK_FEATURES, rng.normal(size=len(BANK_FEATURES)), strict=True))
    weights["neighbours_other"] = 4.0
    leaf = {"trigger": "learned_error_knn", "label": "learned", "above": 0.5, "k": 5, "exact": True, "bias": -2.0,
            **{f"w_{f}": float(w) for f, w in weights.items()}}
    decision = Evaluator({"id": "l", "version": 1, "rule": leaf}, bank=bank).evaluate(
        FrameBatch(logits=logits, embeddings=emb))

    probs = softmax(logits)
    _, idx = bank.search(emb, k=5, exact=True)
    nb = neighbour_features(probs, bank.labels[idx])
    assert nb.tolist() == [1.0] * 5 + [0.0] * 10  # the neighbours say class 2 where the model says 0
    want = error_probability(np.column_stack([error_features(probs), nb]), list(weights.values()), -2.0)
    assert np.asarray(decision.scores["learned"]) == pytest.approx(want)
    assert decision.keep[:5].all() and not decision.keep[5:].any()

    with pytest.raises(ValueError, match="needs a NoveltyBank"):
        Evaluator({"id": "l", "version": 1, "rule": leaf})
