"""Labels at the hub: each annotator's answer stored as posted, and the case's consensus decided here, once.

Every answer on a case (from Label Studio, the demo's oracle, a script) goes through :func:`apply` and then
:func:`decide_case`, which runs :func:`fleet.consensus.decide` over all the case's answers: ``gold`` for the
known answer of a gold task, ``accepted`` for what the trainer learns from, ``held`` for review (a tie, low
agreement, a dissent, an answer still waiting for the rest of its overlap, a wrong gold answer, or an
annotator whose gold record is too poor). When an annotator's record crosses that bar, every case they
answered is decided again. The case then takes the gold answer, else the majority of its accepted ones
(ties to the most recent), else ``held``.

A detector's answers are lists of boxes, decided by :mod:`fleet.consensus`'s box rule (IoU matching, box F1
against the gold boxes or the annotators' merged consensus); an accepted box case takes the merged consensus of
its accepted answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from sqlmodel import Session, col, select

from fleet.consensus import AnnotatorScore, Rules, Vote, decide, merge_detections, score_annotators
from fleet.errors import Conflict, InvalidInput, NotFound, ProtocolError
from fleet.hub.context import Hub
from fleet.hub.ingest import model_info
from fleet.hub.learned import refit_waiting
from fleet.hub.models import CaseRow, LabelRow
from fleet.protocol import Detection, LabelPost, LabelPublic, LabelReceipt, Verdict, parse_prediction


def rules_of(hub: Hub) -> Rules:
    cfg = hub.settings
    return Rules(min_agreement=cfg.consensus_min_agreement, min_annotator_accuracy=cfg.consensus_min_annotator_accuracy,
                 min_gold_answers=cfg.consensus_min_gold_answers)


def apply(hub: Hub, s: Session, post: LabelPost) -> LabelReceipt:
    """Create, update or delete one annotation's answer (the same post twice changes nothing), then decide
    the case again."""
    case = s.get(CaseRow, post.case_id, with_for_update=s.get_bind().dialect.name != "sqlite")
    if case is None:
        raise NotFound(f"unknown case {post.case_id!r}")
    info = model_info(hub, case.model_version)
    if post.label.task != case.task:
        raise InvalidInput(f"a {post.label.task!r} label for a {case.task!r} case")
    if info is not None:
        for answer, what in ((post.label, "label"), (post.gold_label, "gold_label")):
            if isinstance(answer, Detection):
                try:
                    answer.check_classes(info.n_classes, what)
                except ProtocolError as exc:
                    raise InvalidInput(f"{exc}: model {info.version!r} has classes {list(info.class_names)}") from None
            elif answer is not None and answer.label >= info.n_classes:
                raise InvalidInput(f"{what} {answer.label} is out of range: model {info.version!r} has "
                                   f"{info.n_classes} classes {list(info.class_names)}")
    existing = s.exec(select(LabelRow).where(LabelRow.source == post.source,
                                             LabelRow.annotation_id == post.annotation_id)).first()
    if existing is not None and existing.case_id != post.case_id:
        raise Conflict(f"annotation {post.source}:{post.annotation_id} belongs to case {existing.case_id!r}, not "
                       f"{post.case_id!r}")
    rules = rules_of(hub)
    before = _unreliable(s, [post.annotator], rules)
    now = hub.now()
    if post.deleted:
        if existing is None:
            return LabelReceipt(action="unchanged", case_state=case.state, verdicts=_verdicts(s, case))
        label_id = existing.id
        s.delete(existing)
        s.flush()
        action = "deleted"
    else:
        fields = {"case_id": post.case_id, "label": None if isinstance(post.label, Detection) else post.label.label,
                  "payload": post.label.as_label().to_dict(),
                  "annotator": post.annotator, "task_id": post.task_id, "created_at": post.created_at,
                  "overlap": post.overlap, "ground_truth": post.ground_truth,
                  "gold_payload": None if post.gold_label is None else post.gold_label.as_label().to_dict()}
        if existing is not None and all(getattr(existing, k) == v for k, v in fields.items()):
            return LabelReceipt(action="unchanged", case_state=case.state, label_id=existing.id,
                                verdicts=_verdicts(s, case))
        row = existing or LabelRow(source=post.source, annotation_id=post.annotation_id, created_at=now,
                                   updated_at=now, **{k: v for k, v in fields.items() if k != "created_at"})
        for k, v in fields.items():
            setattr(row, k, v)
        row.updated_at = now
        s.add(row)
        s.flush()
        label_id, action = row.id, "updated" if existing is not None else "created"
    decide_case(hub, s, case, rules)
    if case.label_status == "accepted" and case.campaign_id:
        # a learned trigger waiting for the labels of the model the campaign's devices run
        refit_waiting(s, case.campaign_id, now=now, blobs=hub.blobs)
    for annotator in _flipped(s, before, rules):  # their record crossed the bar: their other cases again
        cases = s.exec(select(LabelRow.case_id).where(LabelRow.annotator == annotator).distinct()).all()
        for cid in cases:
            if cid != case.case_id and (other := s.get(CaseRow, cid)) is not None:
                decide_case(hub, s, other, rules)
    return LabelReceipt(action=action, case_state=case.state, label_id=label_id, verdicts=_verdicts(s, case))


def decide_case(hub: Hub, s: Session, case: CaseRow, rules: Rules) -> None:
    """Give every answer on ``case`` its status, and the case its consensus label and state."""
    rows = list(s.exec(select(LabelRow).where(LabelRow.case_id == case.case_id)
                       .order_by(col(LabelRow.updated_at).desc(), col(LabelRow.id).desc())).all())
    detect = case.task == "detect"
    gold_doc: dict[str, Any] | None = None  # the gold answer each crowd answer is scored against (see _scores)
    if rows:
        info = model_info(hub, case.model_version)
        gold: int | Detection | None
        if detect:
            votes = [Vote(int(r.id or 0), r.annotator, _boxes(r.payload), r.ground_truth) for r in rows]
            gold_doc = next((r.gold_payload for r in rows if r.gold_payload is not None and not r.ground_truth), None)
            gold_doc = next((r.payload for r in rows if r.ground_truth), gold_doc)
            gold = None if gold_doc is None else _boxes(gold_doc)
            n_classes = info.n_classes if info is not None else 1 + max(
                (b.label for v in votes if isinstance(v.label, Detection) for b in v.label.boxes), default=0)
        else:
            votes = [Vote(int(r.id or 0), r.annotator, int(r.label or 0), r.ground_truth) for r in rows]
            n_classes = info.n_classes if info is not None else 1 + max(int(r.label or 0) for r in rows)
            gold = next((r.gold_payload["label"] for r in rows if r.gold_payload is not None), None)
            if gold is None:  # a reviewer's ground-truth answer makes the case a gold task too
                gold = next((r.label for r in rows if r.ground_truth), None)
            if gold is not None:
                gold_doc = {"task": "classify", "label": int(gold), "probs": None}
        scores = _scores(s, sorted({r.annotator for r in rows if not r.ground_truth}), rules)
        rulings = decide(votes, n_classes=n_classes, required=max(r.overlap for r in rows), gold_label=gold,
                         scores=scores, rules=rules)
        for r, ruling in zip(rows, rulings, strict=True):
            r.status, r.agreement, r.n_annotators, r.reason = (ruling.status, ruling.agreement, ruling.n_annotators,
                                                              ruling.reason[:500])
            if gold_doc is not None and not r.ground_truth:  # scored against it (see _scores)
                r.gold_payload = gold_doc
            s.add(r)
    gold_rows = [r for r in rows if r.status == "gold"]
    accepted = [r for r in rows if r.status == "accepted"]
    if gold_rows:
        chosen, case.label_status, case.state = gold_rows[0], "gold", "labeled"
        case.label, case.label_payload = chosen.label, gold_doc if detect and gold_doc is not None else chosen.payload
    elif accepted and detect:  # the boxes a majority of the accepted answers drew, each the mean of its drawings
        merged, _ = merge_detections([_boxes(r.payload) for r in accepted], iou=rules.box_iou)
        case.label, case.label_payload, case.label_status, case.state = None, merged.to_dict(), "accepted", "labeled"
    elif accepted:
        tally = Counter(r.label for r in accepted)
        top = max(tally.values())
        chosen = next(r for r in accepted if tally[r.label] == top)  # ties go to the most recent
        case.label, case.label_payload, case.label_status, case.state = chosen.label, chosen.payload, "accepted", \
            "labeled"
    elif rows:
        case.label, case.label_payload, case.label_status, case.state = None, None, "held", "held"
    else:
        case.label, case.label_payload, case.label_status = None, None, None
        case.state = "queued" if case.selection_id else "unlabeled"
    s.add(case)


def _verdicts(s: Session, case: CaseRow) -> list[Verdict]:
    rows = s.exec(select(LabelRow).where(LabelRow.case_id == case.case_id).order_by(LabelRow.id)).all()
    return [Verdict(annotation_id=r.annotation_id, source=r.source, status=r.status, agreement=r.agreement,
                    n_annotators=int(r.n_annotators or 0), reason=r.reason) for r in rows]


def _scores(s: Session, annotators: list[str], rules: Rules) -> dict[str, AnnotatorScore]:
    """Each annotator's record on gold tasks: their crowd answers on cases whose answer is known (a box answer
    earns its box F1 against the gold boxes)."""
    if not annotators:
        return {}
    rows = s.exec(select(LabelRow.annotator, LabelRow.label, LabelRow.payload, LabelRow.gold_payload)
                  .where(col(LabelRow.annotator).in_(annotators), col(LabelRow.gold_payload).is_not(None),
                         col(LabelRow.ground_truth).is_(False))).all()
    return score_annotators([(a, _boxes(payload), _boxes(g)) if g.get("task") == "detect"
                             else (a, int(lbl or 0), int(g["label"]))
                             for a, lbl, payload, g in rows if g is not None], iou=rules.box_iou)


def _boxes(doc: Mapping[str, Any]) -> Detection:
    """A stored box answer."""
    out = parse_prediction(doc, "label")
    if not isinstance(out, Detection):
        raise InvalidInput(f"expected a box answer; received a {out.task!r} one")
    return out


def _unreliable(s: Session, annotators: list[str], rules: Rules) -> dict[str, bool]:
    scores = _scores(s, annotators, rules)
    return {a: _is_unreliable(scores.get(a), rules) for a in annotators}


def _flipped(s: Session, before: dict[str, bool], rules: Rules) -> list[str]:
    after = _unreliable(s, list(before), rules)
    return [a for a in before if after[a] != before[a]]


def _is_unreliable(score: AnnotatorScore | None, rules: Rules) -> bool:
    return score is not None and score.total >= rules.min_gold_answers and score.accuracy < \
        rules.min_annotator_accuracy


def label_public(row: LabelRow) -> LabelPublic:
    """A stored label with the hub's verdict on it."""
    return LabelPublic(id=int(row.id or 0), case_id=row.case_id, label=parse_prediction(row.payload, "label"),
                       annotator=row.annotator, source=row.source, task_id=row.task_id,
                       annotation_id=row.annotation_id, created_at=row.created_at, updated_at=row.updated_at,
                       status=row.status, agreement=row.agreement, n_annotators=int(row.n_annotators or 0),
                       reason=row.reason)
