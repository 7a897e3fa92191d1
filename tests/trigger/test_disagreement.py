"""Disagreement with the human (shadow mode) and with a challenger model."""

from __future__ import annotations

import numpy as np
import pytest

from trigger import challenger_disagreement, human_disagreement

P = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]])


def test_human_top1_top_k_and_unknown() -> None:
    human = np.array([1, 1, 1, -1])
    out = human_disagreement(P, human)
    assert out[:3].tolist() == [1.0, 0.0, 0.0]  # frame 2: a tie for the top counts as agreement
    assert np.isnan(out[3])
    # frame 3: class 0 ties class 1 for second place, so it is inside the top 2
    assert human_disagreement(P, [2, 0, 2, 0], top_k=2).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert human_disagreement(P, [1, 2, 1, 2], top_k=2).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_weighted_ranks_confident_mistakes_first() -> None:
    p = np.array([[0.95, 0.05], [0.55, 0.45]])
    out = human_disagreement(p, [1, 1], weighted=True)
    np.testing.assert_allclose(out, [0.95, 0.55])
    assert out[0] > out[1]


def test_challenger_disagreement() -> None:
    q = np.array([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [np.nan] * 3, [0.2, 0.1, 0.7]])
    out = challenger_disagreement(P, q)
    assert out[0] == 1.0 and out[1] == 0.0 and np.isnan(out[2]) and out[3] == 0.0
    assert challenger_disagreement(P, q, top_k=2)[0] == 0.0
    weighted = challenger_disagreement(P, q, weighted=True)
    assert weighted[0] == pytest.approx(0.5 * (0.6 + 0.8))


def test_refusals() -> None:
    with pytest.raises(ValueError, match="below k=3"):
        human_disagreement(P, [3, 0, 0, 0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        human_disagreement(P, [0, 0])
    with pytest.raises(ValueError, match=">= -1"):
        human_disagreement(P, [-2, 0, 0, 0])
    with pytest.raises(ValueError, match="shape of probs"):
        challenger_disagreement(P, P[:, :2])
    with pytest.raises(ValueError, match="top_k"):
        human_disagreement(P, [0, 0, 0, 0], top_k=0)
