"""Label consensus, decided in one place, by the hub: majority vote with an agreement score, box consensus by
IoU matching, gold scoring of annotators, hold rules (pure functions; numpy in, numpy out).

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

Boxes (``detect``: votes whose label is a :class:`~fleet.protocol.Detection`) go through the same
:func:`decide`, with the same statuses, under this rule:

- two boxes *match* when they have the same class and IoU >= ``Rules.box_iou`` (0.5); matching is one-to-one
  and greedy, the pair with the highest IoU first (:func:`match_same_class`);
- *consensus* (:func:`merge_boxes`): the annotators are taken in order (by annotation id); the first one's
  boxes open one cluster each; each next annotator's boxes are matched against the clusters' mean boxes, a
  matched box joins its cluster (so an annotator adds at most one box to a cluster) and an unmatched one
  opens a new cluster. A cluster is kept when a strict majority of the annotators drew it (more than
  half of them), as the mean of its members' corners, with their class;
- an answer's *box F1* against reference boxes is 2 * matched / (its boxes + the reference's boxes), 1 when
  both are empty (:func:`box_f1`); the case's *agreement* is the mean box F1 of the answers against the
  consensus;
- a gold task scores each answer by its box F1 against the known boxes: ``gold`` at F1 >= ``Rules.min_box_f1``,
  else ``held``; the annotator's gold record counts each gold answer as its F1 (:func:`score_annotators`);
- otherwise an answer is ``held`` when the case's agreement is below ``min_agreement`` or its own F1 against
  the consensus is below ``min_box_f1`` (a dissent), and ``accepted`` otherwise (unless its annotator is
  unreliable), as for classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.consensus_boxes import (
    box_f1,
    check_box_classes,
    detection_f1,
    match_same_class,
    merge_boxes,
    merge_detections,
)
from fleet.errors import InvalidInput
from fleet.protocol.tasks import Detection

__all__ = ["AnnotatorScore", "Rules", "Ruling", "STATUSES", "Vote", "box_f1", "decide", "detection_f1",
    "gold_accuracy", "majority_vote", "match_same_class", "merge_boxes", "merge_detections", "pairwise_agreement",
    "score_annotators", "vote_counts"]


STATUSES = ("accepted", "held", "gold")


@dataclass(frozen=True)
class Rules:
    """Thresholds for the hold rules."""

    min_agreement: float = 0.6
    min_annotator_accuracy: float = 0.6
    min_gold_answers: int = 3
    box_iou: float = 0.5  # two boxes of the same class match at this IoU or more
    min_box_f1: float = 0.8  # an answer's box F1 against the gold (or consensus) boxes it must reach

    def __post_init__(self) -> None:
        if not 0.0 < self.box_iou <= 1.0:
            raise InvalidInput(f"box_iou must lie in (0, 1]; received {self.box_iou!r}")
        for name in ("min_agreement", "min_annotator_accuracy", "min_box_f1"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must lie in [0, 1]; received {value!r}")
        if self.min_gold_answers < 1:
            raise InvalidInput(f"min_gold_answers must be at least 1; received {self.min_gold_answers!r}")


@dataclass(frozen=True)
class Vote:
    """One annotator's answer on one task: a class index, or a :class:`Detection` (the boxes they drew)."""

    annotation_id: int
    annotator: str
    label: int | Detection
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
    """An annotator's gold record: ``total`` gold answers earning ``correct`` credit (1 per right class; a
    box answer's box F1)."""

    annotator: str
    correct: float
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


def score_annotators(gold_answers: Sequence[tuple[str, int | Detection, int | Detection]], *,
                     iou: float = 0.5) -> dict[str, AnnotatorScore]:
    """Each annotator's record on gold tasks, from ``(annotator, answer, known_label)`` triples.

    A class answer earns 1 when it is the known class; a box answer earns its box F1 against the known
    boxes (IoU >= ``iou``, same class; :func:`detection_f1`).
    """
    tally: dict[str, list[float]] = {}
    for annotator, answer, known in gold_answers:
        t = tally.setdefault(annotator, [0.0, 0])
        if isinstance(answer, Detection) or isinstance(known, Detection):
            if not (isinstance(answer, Detection) and isinstance(known, Detection)):
                raise InvalidInput(f"annotator {annotator!r}: a gold answer and its known label must both be boxes "
                                   f"or both be classes; received {type(answer).__name__} and {type(known).__name__}")
            t[0] += detection_f1(answer, known, iou=iou)
        else:
            t[0] += float(answer == known)
        t[1] += 1
    return {a: AnnotatorScore(a, c, int(n)) for a, (c, n) in sorted(tally.items())}


# ---------------------------------------------------------------------------------------------
# one task's decision
# ---------------------------------------------------------------------------------------------


def decide(
    votes: Sequence[Vote],
    *,
    n_classes: int,
    required: int = 1,
    gold_label: int | Detection | None = None,
    scores: Mapping[str, AnnotatorScore] | None = None,
    rules: Rules | None = None,
) -> list[Ruling]:
    """The hub status of each vote on one task, in the order given.

    ``required`` is the task's overlap (how many annotators Label Studio sends it to); ``gold_label``
    is the known answer when the task is a gold task (ground-truth votes carry it too); ``scores``
    are the annotators' gold records, used to hold the labels of unreliable annotators. Votes whose labels
    are :class:`Detection` answers (and a :class:`Detection` gold label) are decided by the box rule of the
    module docstring; one task's votes are all classes or all boxes.
    """
    rules = rules or Rules()
    scores = scores or {}
    if isinstance(gold_label, Detection) or any(isinstance(v.label, Detection) for v in votes):
        return _decide_boxes(votes, n_classes=n_classes, required=required, gold_label=gold_label, scores=scores,
                             rules=rules)
    for v in votes:
        if not isinstance(v.label, int) or not 0 <= v.label < n_classes:
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


def _decide_boxes(votes: Sequence[Vote], *, n_classes: int, required: int, gold_label: int | Detection | None,
                  scores: Mapping[str, AnnotatorScore], rules: Rules) -> list[Ruling]:
    """:func:`decide` for box answers (the rule is in the module docstring)."""
    answers: dict[int, Detection] = {}
    for v in votes:
        if not isinstance(v.label, Detection):
            raise InvalidInput(f"one task's votes must all be boxes or all be classes; vote {v.annotation_id} is "
                               f"{type(v.label).__name__} {v.label!r:.60} among box answers")
        check_box_classes(v.label, n_classes, f"vote {v.annotation_id}")
        answers[v.annotation_id] = v.label
    if gold_label is not None and not isinstance(gold_label, Detection):
        raise InvalidInput(f"the gold label of a box task must be a Detection; received {gold_label!r:.60}")
    truth = [v for v in votes if v.ground_truth]
    crowd = sorted((v for v in votes if not v.ground_truth), key=lambda v: v.annotation_id)
    gold = gold_label if gold_label is not None else (answers[truth[-1].annotation_id] if truth else None)
    if gold is not None:
        check_box_classes(gold, n_classes, "gold label")
    n = len(crowd)
    out = {v.annotation_id: Ruling(v.annotation_id, "gold", None, n, "ground truth of a gold task") for v in truth}

    if gold is not None:
        f1 = {v.annotation_id: detection_f1(answers[v.annotation_id], gold, iou=rules.box_iou) for v in crowd}
        agree = float(np.mean(list(f1.values()))) if crowd else None
        for v in crowd:
            f = f1[v.annotation_id]
            ok = f >= rules.min_box_f1
            out[v.annotation_id] = Ruling(v.annotation_id, "gold" if ok else "held", agree, n,
                                          f"box F1 {f:.2f} against the gold boxes is "
                                          f"{'at least' if ok else 'below'} {rules.min_box_f1:.2f}")
        return [out[v.annotation_id] for v in votes]

    if n == 0:
        return [out[v.annotation_id] for v in votes]
    consensus, share = merge_detections([answers[v.annotation_id] for v in crowd], iou=rules.box_iou)
    share_or_none = share if max(required, n) > 1 else None
    for v in crowd:
        f = detection_f1(answers[v.annotation_id], consensus, iou=rules.box_iou)
        if n < required:
            verdict = Ruling(v.annotation_id, "held", share_or_none, n,
                             f"waiting for {required - n} more annotator(s) of {required}")
        elif n > 1 and share < rules.min_agreement:
            verdict = Ruling(v.annotation_id, "held", share_or_none, n,
                             f"box agreement {share:.2f} is below {rules.min_agreement:.2f}")
        elif f < rules.min_box_f1:
            verdict = Ruling(v.annotation_id, "held", share_or_none, n,
                             f"dissents from the majority's boxes (box F1 {f:.2f} < {rules.min_box_f1:.2f})")
        else:
            reason = "majority of the overlap (boxes)" if n > 1 else "single annotator"
            verdict = _unless_unreliable(v, share_or_none, n, reason, scores, rules)
        out[v.annotation_id] = verdict
    return [out[v.annotation_id] for v in votes]
