"""Uncertainty scores: hand-worked values, the right direction as predictions sharpen, shapes and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trigger import bald, energy, entropy, least_confidence, margin, softmax, variation_ratio


def test_hand_worked_values() -> None:
    p = np.array([[0.5, 0.5, 0.0], [0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    h_721 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    np.testing.assert_allclose(entropy(p), [math.log(2), h_721, 0.0])
    np.testing.assert_allclose(entropy(p, normalize=True)[0], math.log(2) / math.log(3))
    np.testing.assert_allclose(margin(p), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(least_confidence(p), [0.5, 0.3, 0.0])
    np.testing.assert_allclose(least_confidence(p, normalize=True), [0.75, 0.45, 0.0])  # / (1 - 1/3)
    # energy = -T logsumexp(z / T): logits (0, 0) -> -log 2; at T = 2 -> -2 log 2
    np.testing.assert_allclose(energy([[0.0, 0.0]]), [-math.log(2)])
    np.testing.assert_allclose(energy([[0.0, 0.0]], temperature=2.0), [-2 * math.log(2)])
    np.testing.assert_allclose(softmax([[0.0, math.log(3)]]), [[0.25, 0.75]])


def test_bald_and_variation_ratio_hand_worked() -> None:
    # two confident members that contradict each other: H(mean) = log 2, mean H = 0 -> BALD = log 2
    contradict = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    # two members that agree on a flat prediction: all the uncertainty is aleatoric -> BALD = 0
    agree_flat = np.array([[[0.5, 0.5]], [[0.5, 0.5]]])
    # members (0.9, 0.1) and (0.5, 0.5): H(0.7, 0.3) - (H(0.9, 0.1) + log 2) / 2
    def h(*p: float) -> float:
        return -sum(x * math.log(x) for x in p if x > 0)

    mixed = np.array([[[0.9, 0.1]], [[0.5, 0.5]]])
    np.testing.assert_allclose(bald(contradict), [math.log(2)], atol=1e-12)
    np.testing.assert_allclose(bald(agree_flat), [0.0], atol=1e-12)
    np.testing.assert_allclose(bald(mixed), [h(0.7, 0.3) - (h(0.9, 0.1) + h(0.5, 0.5)) / 2], atol=1e-12)
    votes = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.1, 0.9]], [[0.6, 0.4]]])  # 3 of 4 vote class 0
    np.testing.assert_allclose(variation_ratio(votes), [0.25])
    np.testing.assert_allclose(variation_ratio(contradict), [0.5])


def test_scores_move_the_right_way_as_the_prediction_flattens() -> None:
    logits = np.random.default_rng(0).normal(0, 3, (200, 10))
    temps = [0.25, 0.5, 1.0, 2.0, 4.0, 16.0]  # sharp -> flat
    ent = np.stack([entropy(softmax(logits, temperature=t)) for t in temps])
    mar = np.stack([margin(softmax(logits, temperature=t)) for t in temps])
    lc = np.stack([least_confidence(softmax(logits, temperature=t)) for t in temps])
    nlc = np.stack([least_confidence(softmax(logits, temperature=t), normalize=True) for t in temps])
    assert np.all(np.diff(ent, axis=0) > 0)  # flatter = more entropy
    assert np.all(np.diff(mar, axis=0) <= 1e-12)  # flatter = smaller margin
    assert np.all(np.diff(lc, axis=0) > 0)  # flatter = less confident
    assert np.all(np.diff(nlc, axis=0) > 0) and np.all((nlc >= 0) & (nlc <= 1))
    # energy rises as the evidence (every logit) drops, as it does for out-of-distribution frames
    en = np.stack([energy(logits - c) for c in (0.0, 1.0, 2.0, 5.0)])
    assert np.all(np.diff(en, axis=0) > 0)
    np.testing.assert_allclose(en[3] - en[0], 5.0)


def test_bald_rises_as_members_disagree_more() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0, 2, (50, 5))
    values = []
    for spread in (0.0, 0.5, 1.0, 2.0, 4.0):
        logits = base[None] + spread * rng.normal(0, 1, (8, 50, 5))
        values.append(bald(softmax(logits.reshape(-1, 5)).reshape(8, 50, 5)).mean())
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b > a for a, b in zip(values, values[1:], strict=False))


def test_shapes_and_batch_rows_are_independent() -> None:
    p = softmax(np.random.default_rng(2).normal(0, 1, (7, 4)))
    for fn in (entropy, margin, least_confidence):
        full = fn(p)
        assert full.shape == (7,) and full.dtype == np.float64
        np.testing.assert_allclose(np.concatenate([fn(p[i : i + 1]) for i in range(7)]), full)
    assert entropy(np.zeros((0, 4))).shape == (0,)
    assert margin(np.ones((3, 1))).tolist() == [1.0, 1.0, 1.0]  # one class: nothing to confuse it with


def test_normalized_least_confidence_spans_zero_to_one_whatever_k() -> None:
    for k in (2, 3, 10, 100):
        uniform, one_hot = np.full((1, k), 1 / k), np.eye(k)[:1]
        assert least_confidence(uniform, normalize=True)[0] == pytest.approx(1.0)
        assert least_confidence(one_hot, normalize=True)[0] == 0.0
    assert least_confidence(np.ones((2, 1)), normalize=True).tolist() == [0.0, 0.0]  # one class: never unsure
    # probabilities a hair off (within the 1e-3 tolerance) never leave [0, 1]
    assert least_confidence([[0.333, 0.333, 0.333]], normalize=True)[0] == 1.0


def test_softmax_can_pass_rows_without_output_through_as_nan() -> None:
    logits = np.array([[0.0, math.log(3)], [np.nan, np.nan], [np.inf, 0.0], [1.0, -np.inf], [2.0, 2.0]], np.float32)
    p = softmax(logits, nonfinite="nan")
    assert p.dtype == np.float64 and p.shape == (5, 2)
    np.testing.assert_allclose(p[[0, 4]], [[0.25, 0.75], [0.5, 0.5]])
    assert np.isnan(p[1:4]).all()  # any NaN or inf in a row: no usable output for that frame
    finite = np.random.default_rng(3).normal(0, 3, (20, 4))
    np.testing.assert_array_equal(softmax(finite, nonfinite="nan"), softmax(finite))
    np.testing.assert_allclose(softmax(logits[[0]], temperature=2.0, nonfinite="nan"),
                               softmax(logits[[0]], temperature=2.0))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: entropy([0.5, 0.5]), "must have 2 dimensions"),
        (lambda: entropy([[0.5, 0.6]]), "must sum to 1"),
        (lambda: margin([[1.5, -0.5]]), "probabilities in [0, 1]"),
        (lambda: softmax([[0.0, np.nan]]), "must be finite"),
        (lambda: softmax([[0.0, 1.0]], temperature=0), "temperature"),
        (lambda: softmax([[0.0, 1.0]], nonfinite="skip"), "nonfinite must be one of 'nan', 'raise'; received 'skip'"),
        (lambda: bald(np.ones((2, 3))), "must have 3 dimensions"),
        (lambda: energy("abc"), "numeric array"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_the_uncertainty_scores_are_scikit_activeml_s() -> None:
    """Least confidence, margin and entropy (the scores the hub and the device rank by, and the peers' entropy
    top-k) against scikit-activeml's ``uncertainty_scores`` on the same probabilities."""
    from skactiveml.pool import uncertainty_scores

    probs = np.random.default_rng(1).dirichlet(np.full(7, 0.5), size=500)
    np.testing.assert_allclose(least_confidence(probs), uncertainty_scores(probs, method="least_confident"),
                               atol=1e-12)
    np.testing.assert_allclose(1.0 - margin(probs), uncertainty_scores(probs, method="margin_sampling"), atol=1e-12)
    np.testing.assert_allclose(entropy(probs), uncertainty_scores(probs, method="entropy"), atol=1e-12)
