"""Majority vote, agreement, gold scoring and hold rules (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.consensus import (
    AnnotatorScore,
    Rules,
    Vote,
    decide,
    gold_accuracy,
    majority_vote,
    pairwise_agreement,
    score_annotators,
    vote_counts,
)
from fleet.errors import InvalidInput


def test_majority_vote_picks_the_most_common_label_with_its_share() -> None:
    votes = np.array([[0, 0, 1], [2, 2, 2], [1, -1, -1], [-1, -1, -1], [0, 1, -1]])
    label, agreement, tie = majority_vote(votes, n_classes=3)
    assert label[:3].tolist() == [0, 2, 1]
    assert label[3] == -1 and np.isnan(agreement[3])
    np.testing.assert_allclose(agreement[[0, 1, 2, 4]], [2 / 3, 1.0, 1.0, 0.5])
    assert tie.tolist() == [False, False, False, False, True]


def test_agreement_drops_as_annotators_disagree_more() -> None:
    votes = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3]])
    _, majority, _ = majority_vote(votes, n_classes=4)
    pairwise = pairwise_agreement(votes, n_classes=4)
    assert np.all(np.diff(majority) <= 0) and majority[0] > majority[-1]
    assert np.all(np.diff(pairwise) < 0)
    assert pairwise[0] == 1.0 and pairwise[-1] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 3), min_size=1, max_size=6), min_size=1, max_size=20))
def test_batch_vote_matches_row_by_row(rows: list[list[int]]) -> None:
    width = max(len(r) for r in rows)
    votes = np.array([r + [-1] * (width - len(r)) for r in rows])
    label, agreement, _ = majority_vote(votes, n_classes=4)
    for i, r in enumerate(rows):
        real = [v for v in r if v >= 0]
        if not real:
            assert label[i] == -1
            continue
        counts = np.bincount(real, minlength=4)
        assert counts[label[i]] == counts.max()
        assert agreement[i] == pytest.approx(counts.max() / len(real))


def test_votes_out_of_range_are_refused() -> None:
    with pytest.raises(InvalidInput, match="range"):
        vote_counts(np.array([[0, 5]]), n_classes=3)
    with pytest.raises(InvalidInput, match="2-D"):
        vote_counts(np.array([0, 1]), n_classes=3)


def test_gold_scoring() -> None:
    assert gold_accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 0])) == 0.75
    scores = score_annotators([("a", 0, 0), ("a", 1, 1), ("b", 1, 0), ("b", 2, 2), ("a", 2, 0)])
    assert (scores["a"].correct, scores["a"].total) == (2, 3)
    assert scores["a"].accuracy == pytest.approx(3 / 5)  # (2 + 1) / (3 + 2)
    assert scores["b"].accuracy == pytest.approx(2 / 4)


def v(aid: int, who: str, label: int, gt: bool = False) -> Vote:
    return Vote(aid, who, label, gt)


def test_single_annotator_is_accepted_without_an_agreement_score() -> None:
    [verdict] = decide([v(1, "a", 2)], n_classes=3, required=1)
    assert (verdict.status, verdict.agreement, verdict.n_annotators) == ("accepted", None, 1)


def test_overlap_waits_for_every_annotator_then_takes_the_majority() -> None:
    [pending] = decide([v(1, "a", 0)], n_classes=3, required=3)
    assert pending.status == "held" and "waiting for 2" in pending.reason
    verdicts = decide([v(1, "a", 0), v(2, "b", 0), v(3, "c", 1)], n_classes=3, required=3)
    assert [x.status for x in verdicts] == ["accepted", "accepted", "held"]
    assert verdicts[2].reason == "dissents from the majority"
    assert all(x.agreement == pytest.approx(2 / 3) for x in verdicts)


def test_low_agreement_and_ties_are_held_for_review() -> None:
    tie = decide([v(1, "a", 0), v(2, "b", 1)], n_classes=3, required=2)
    assert [x.status for x in tie] == ["held", "held"] and tie[0].reason == "annotators are tied"
    low = decide([v(1, "a", 0), v(2, "b", 0), v(3, "c", 0), v(4, "d", 1), v(5, "e", 2), v(6, "f", 1)], n_classes=3,
                 required=6, rules=Rules(min_agreement=0.6))
    assert {x.status for x in low} == {"held"} and "below 0.60" in low[0].reason


def test_gold_tasks_mark_matching_answers_gold_and_hold_the_rest() -> None:
    verdicts = decide([v(1, "a", 1), v(2, "b", 2)], n_classes=3, required=1, gold_label=1)
    assert [x.status for x in verdicts] == ["gold", "held"]
    assert verdicts[0].agreement == 0.5
    # a reviewer's ground-truth annotation in Label Studio is the known answer
    verdicts = decide([v(1, "expert", 2, gt=True), v(2, "a", 2), v(3, "b", 0)], n_classes=3, required=2)
    assert [x.status for x in verdicts] == ["gold", "gold", "held"]


def test_an_unreliable_annotator_is_held_once_the_gold_record_is_long_enough() -> None:
    rules = Rules(min_annotator_accuracy=0.6, min_gold_answers=3)
    bad = {"a": AnnotatorScore("a", 0, 5)}
    [held] = decide([v(1, "a", 0)], n_classes=3, scores=bad, rules=rules)
    assert held.status == "held" and "gold accuracy" in held.reason
    short = {"a": AnnotatorScore("a", 0, 2)}
    [ok] = decide([v(1, "a", 0)], n_classes=3, scores=short, rules=rules)
    assert ok.status == "accepted"


def test_rules_are_validated() -> None:
    with pytest.raises(InvalidInput, match="min_agreement"):
        Rules(min_agreement=1.5)
    with pytest.raises(InvalidInput, match="min_gold_answers"):
        Rules(min_gold_answers=0)
    with pytest.raises(InvalidInput, match="label 7"):
        decide([v(1, "a", 7)], n_classes=3)
