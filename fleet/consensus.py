"""Label consensus, decided in one place, by the hub: majority vote with an agreement score, gold scoring of
annotators, hold rules (pure functions; numpy in, numpy out).

The hub is the source of truth for labels from any source: every client posts each annotator's answer
as it is (:class:`fleet.protocol.LabelPost`), and the hub runs :func:`decide` over all the answers a case
has (``fleet.hub.labels``). Nothing here talks to Label Studio or a database. The vectorised scores take
numpy arrays; ``decide`` turns one case's votes into the status each answer gets:

- ``gold``: the known answer of a gold task, given by an annotator (or a ground-truth annotation
  a reviewer marked in Label Studio);
- ``accepted``: trained on;
- ``held``: kept for review, never trained on (low agreement, a tie, a dissent from the majority, a
  wrong answer on a gold task, an annotator whose gold accuracy is too low, or a task still waiting
  for the rest of its overlap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.errors import InvalidInput

__all__ = ["AnnotatorScore", "Rules", "Ruling", "STATUSES", "Vote", "decide", "gold_accuracy", "majority_vote",
    "pairwise_agreement", "score_annotators", "vote_counts"]


STATUSES = ("accepted", "held", "gold")


@dataclass(frozen=True)
class Rules:
    """Thresholds for the hold rules."""

    min_agreement: float = 0.6
    min_annotator_accuracy: float = 0.6
    min_gold_answers: int = 3

    def __post_init__(self) -> None:
        for name in ("min_agreement", "min_annotator_accuracy"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must lie in [0, 1]; received {value!r}")
        if self.min_gold_answers < 1:
            raise InvalidInput(f"min_gold_answers must be at least 1; received {self.min_gold_answers!r}")


@dataclass(frozen=True)
class Vote:
    """One annotator's answer on one task."""

    annotation_id: int
    annotator: str
    label: int
    ground_truth: bool = False


@dataclass(frozen=True)
class Ruling:
    """The status one answer gets, and why."""

    annotation_id: int
    status: str
    agreement: float | None
    n_annotators: int
    reason: str


@dataclass(frozen=True)
class AnnotatorScore:
    annotator: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """Posterior mean accuracy under a uniform Beta(1, 1) prior: (correct + 1) / (total + 2)."""
        return (self.correct + 1.0) / (self.total + 2.0)


# ---------------------------------------------------------------------------------------------
# vectorised scores
# ---------------------------------------------------------------------------------------------


def vote_counts(votes: NDArray[Any], *, n_classes: int) -> NDArray[Any]:
    """Per-task class counts.

    votes: (n, m) int, a row per task and a column per annotator slot; -1 marks an empty slot.
    Returns (n, n_classes) int.
    """
    v = np.asarray(votes)
    if v.ndim != 2:
        raise InvalidInput(f"votes must be 2-D (tasks, annotators); received shape {v.shape}")
    if v.size and (v.max() >= n_classes or v.min() < -1):
        raise InvalidInput(f"votes must lie in [-1, {n_classes - 1}]; received range [{v.min()}, {v.max()}]")
    counts = np.zeros((v.shape[0], n_classes), dtype=np.int64)
    rows, cols = np.nonzero(v >= 0)
    np.add.at(counts, (rows, v[rows, cols]), 1)
    return counts


def majority_vote(votes: NDArray[Any], *, n_classes: int) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Majority label, agreement and tie flag per task.

    votes: (n, m) int with -1 for empty slots.
    Returns ``label`` (n,) int (-1 where a task has no votes), ``agreement`` (n,) float, the share
    of the task's votes that went to the majority label (nan without votes), and ``tie`` (n,) bool,
    true where two or more labels share the top count.
    """
    counts = vote_counts(votes, n_classes=n_classes)
    total = counts.sum(axis=1)
    top = counts.max(axis=1) if counts.shape[1] else np.zeros(len(counts), dtype=np.int64)
    label = np.where(total > 0, counts.argmax(axis=1), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = np.where(total > 0, top / np.maximum(total, 1), np.nan)
    tie = (counts == top[:, None]).sum(axis=1) > 1
    tie &= total > 0
    return label, agreement.astype(np.float64), tie


def pairwise_agreement(votes: NDArray[Any], *, n_classes: int) -> NDArray[Any]:
    """Share of annotator pairs on a task that gave the same label (Fleiss' per-item agreement).

    votes: (n, m) int with -1 for empty slots. Returns (n,) float, nan for tasks with fewer than two votes.
    """
    counts = vote_counts(votes, n_classes=n_classes)
    total = counts.sum(axis=1)
    pairs = total * (total - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (counts * (counts - 1)).sum(axis=1) / np.maximum(pairs, 1), np.nan)


def gold_accuracy(answers: NDArray[Any], truth: NDArray[Any]) -> float:
    """Share of gold answers that match the known label. answers, truth: (n,) int. nan for n = 0."""
    a, t = np.asarray(answers), np.asarray(truth)
    if a.shape != t.shape:
        raise InvalidInput(f"answers and truth must have the same shape; received {a.shape} and {t.shape}")
    return float(np.mean(a == t)) if a.size else float("nan")


def score_annotators(gold_answers: Sequence[tuple[str, int, int]]) -> dict[str, AnnotatorScore]:
    """Each annotator's record on gold tasks, from ``(annotator, answer, known_label)`` triples."""
    tally: dict[str, list[int]] = {}
    for annotator, answer, known in gold_answers:
        t = tally.setdefault(annotator, [0, 0])
        t[0] += int(answer == known)
        t[1] += 1
    return {a: AnnotatorScore(a, c, n) for a, (c, n) in sorted(tally.items())}


# ---------------------------------------------------------------------------------------------
# one task's decision
# ---------------------------------------------------------------------------------------------


def decide(
    votes: Sequence[Vote],
    *,
    n_classes: int,
    required: int = 1,
    gold_label: int | None = None,
    scores: Mapping[str, AnnotatorScore] | None = None,
    rules: Rules | None = None,
) -> list[Ruling]:
    """The hub status of each vote on one task, in the order given.

    ``required`` is the task's overlap (how many annotators Label Studio sends it to); ``gold_label``
    is the known answer when the task is a gold task (ground-truth votes carry it too); ``scores``
    are the annotators' gold records, used to hold the labels of unreliable annotators.
    """
    rules = rules or Rules()
    scores = scores or {}
    for v in votes:
        if not 0 <= v.label < n_classes:
            raise InvalidInput(f"vote {v.annotation_id} has label {v.label}; expected 0..{n_classes - 1}")
    truth = [v for v in votes if v.ground_truth]
    crowd = [v for v in votes if not v.ground_truth]
    if gold_label is None and truth:
        gold_label = truth[-1].label
    n = len(crowd)
    out: dict[int, Ruling] = {}
    for v in truth:
        out[v.annotation_id] = Ruling(v.annotation_id, "gold", None, n, "ground truth of a gold task")

    if gold_label is not None:
        agree = sum(v.label == gold_label for v in crowd) / n if n else None
        for v in crowd:
            if v.label == gold_label:
                out[v.annotation_id] = Ruling(v.annotation_id, "gold", agree, n, "matches the gold answer")
            else:
                out[v.annotation_id] = Ruling(v.annotation_id, "held", agree, n, "differs from the gold answer")
        return [out[v.annotation_id] for v in votes]

    if n == 0:
        return [out[v.annotation_id] for v in votes]
    labels, agreement, tie = majority_vote(np.array([[v.label for v in crowd]]), n_classes=n_classes)
    major, share, is_tie = int(labels[0]), float(agreement[0]), bool(tie[0])
    share_or_none = share if max(required, n) > 1 else None
    for v in crowd:
        if n < required:
            verdict = Ruling(v.annotation_id, "held", share_or_none, n,
                              f"waiting for {required - n} more annotator(s) of {required}")
        elif is_tie:
            verdict = Ruling(v.annotation_id, "held", share_or_none, n, "annotators are tied")
        elif n > 1 and share < rules.min_agreement:
            verdict = Ruling(v.annotation_id, "held", share_or_none, n,
                              f"agreement {share:.2f} is below {rules.min_agreement:.2f}")
        elif v.label != major:
            verdict = Ruling(v.annotation_id, "held", share_or_none, n, "dissents from the majority")
        else:
            reason = "majority of the overlap" if n > 1 else "single annotator"
            verdict = _unless_unreliable(v, share_or_none, n, reason, scores, rules)
        out[v.annotation_id] = verdict
    return [out[v.annotation_id] for v in votes]


def _unless_unreliable(v: Vote, agreement: float | None, n: int, reason: str,
                       scores: Mapping[str, AnnotatorScore], rules: Rules) -> Ruling:
    score = scores.get(v.annotator)
    if score is not None and score.total >= rules.min_gold_answers and score.accuracy < rules.min_annotator_accuracy:
        return Ruling(v.annotation_id, "held", agreement, n,
                       f"annotator's gold accuracy {score.accuracy:.2f} is below {rules.min_annotator_accuracy:.2f}")
    return Ruling(v.annotation_id, "accepted", agreement, n, reason)
