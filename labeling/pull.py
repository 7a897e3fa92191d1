"""Pull: annotations come back to the hub exactly once.

Two ways in, one way out. Label Studio's webhooks (annotation created, updated, deleted; task
deleted) land in the hub's inbox and :func:`drain_webhooks` applies them; :func:`reconcile` lists the
project and applies what it finds, catching anything a webhook missed. Both feed the same idempotent
observations into the ledger. :func:`flush` then tells the hub what changed: each annotation's label
with the status consensus gives it, deletions of labels whose annotation went away, and releases of
cases whose task was skipped or deleted.
"""

from __future__ import annotations

import logging
from typing import Any

from fleet.errors import Conflict, InvalidInput, NotFound, ProtocolError
from fleet.protocol import Classification, LabelPost, Prediction
from labeling.context import BridgeContext
from labeling.records import AnnotationRecord, TaskRecord, parse_webhook

log = logging.getLogger(__name__)

SOURCE = "label-studio"


# ---------------------------------------------------------------------------------------------
# observations (shared by webhooks and reconciliation)
# ---------------------------------------------------------------------------------------------


def interpret(bridge: BridgeContext, a: AnnotationRecord) -> tuple[Prediction | None, str | None]:
    """The answer an annotation gives (a class, or boxes), or the reason it is refused. A skip is neither.

    The reason names the annotation and its task, so a log line or the ledger's ``refused`` says where to look.
    """
    if a.was_cancelled:
        return None, None
    try:
        return bridge.kind.parse(a.result, bridge.class_names), None
    except InvalidInput as exc:
        return None, f"annotation {a.id} on task {a.task_id} is not a valid {bridge.kind.name} answer: {exc}"


def annotator_name(bridge: BridgeContext, user_id: int | None) -> str:
    if user_id is None:
        return "unknown"
    name = bridge.ledger.user_name(user_id)
    if name is None:
        bridge.ledger.put_users(bridge.studio.users())
        name = bridge.ledger.user_name(user_id)
    return name or f"label-studio-user-{user_id}"


def observe_task(bridge: BridgeContext, task: TaskRecord) -> bool:
    """Bring the ledger's view of one task up to date (adopting it if it carries an unknown case). False
    when the task is not the bridge's (another project, or no ``case_id``)."""
    if task.project_id is not None and task.project_id != bridge.project_id:
        return False
    case_id = task.case_id
    if case_id is None:
        return False
    row = bridge.ledger.task(task_id=task.id)
    if row is None or row.case_id != case_id:
        by_case = bridge.ledger.task(case_id=case_id)
        if by_case is not None and by_case.state in ("open", "done") and by_case.task_id not in (None, task.id):
            if task.annotations:
                log.error("task %d duplicates case %s (held by task %s) and has annotations; leaving it for a "
                          "reviewer", task.id, case_id, by_case.task_id)
            else:
                log.warning("deleting task %d: it duplicates case %s (held by task %s)", task.id, case_id,
                            by_case.task_id)
                bridge.studio.delete_task(task.id)
            return False
        pred = task.predictions[0].id if task.predictions else None
        log.info("adopting task %d of case %s", task.id, case_id)
        bridge.ledger.bind(case_id, task.id, prediction_id=pred, overlap=task.overlap, project_id=bridge.project_id)
        row = bridge.ledger.task(task_id=task.id)
    if row is not None and row.overlap != task.overlap:
        bridge.ledger.set_task(row.case_id, overlap=task.overlap, dirty=True)
    return True


def observe_annotation(bridge: BridgeContext, a: AnnotationRecord, case_id: str) -> str:
    answer, refused = interpret(bridge, a)
    outcome = bridge.ledger.upsert_annotation(
        annotation_id=a.id, task_id=a.task_id, case_id=case_id, user_id=a.user_id,
        annotator=annotator_name(bridge, a.user_id), created_at=a.created_at, updated_at=a.updated_at,
        ground_truth=a.ground_truth, cancelled=a.was_cancelled,
        label=answer.label if isinstance(answer, Classification) else None, refused=refused,
        answer=None if answer is None or isinstance(answer, Classification) else answer.to_dict())
    if refused and outcome in ("new", "changed"):
        log.warning("refusing annotation %d on task %d (case %s): %s", a.id, a.task_id, case_id, refused)
    return outcome


# ---------------------------------------------------------------------------------------------
# webhooks
# ---------------------------------------------------------------------------------------------


def apply_webhook(bridge: BridgeContext, body: Any) -> str:
    """Apply one raw webhook body. Returns what it did (for logs and tests)."""
    try:
        event = parse_webhook(body)
    except ProtocolError as exc:
        log.warning("refusing webhook body: %s", exc)
        return "refused"
    if event.project_id is not None and event.project_id != bridge.project_id:
        return "other-project"
    if event.annotations:
        tasks = {t.id: t for t in event.tasks}
        outcomes = []
        for a in event.annotations:
            task = tasks.get(a.task_id)
            if task is not None:
                observe_task(bridge, task)
            row = bridge.ledger.task(task_id=a.task_id)
            if row is None:
                fetched = bridge.studio.get_task(a.task_id)
                if fetched is None or not observe_task(bridge, fetched):
                    outcomes.append("unknown-task")
                    continue
                row = bridge.ledger.task(task_id=a.task_id)
            if row is None or row.state not in ("open", "done"):
                outcomes.append("closed-task")
                continue
            outcomes.append(observe_annotation(bridge, a, row.case_id))
        return ",".join(outcomes) or "empty"
    if event.deleted_annotation_ids:
        n = sum(bridge.ledger.delete_annotation(i) for i in event.deleted_annotation_ids)
        return f"deleted-annotations:{n}"
    if event.deleted_task_ids:
        n = sum(bridge.ledger.delete_task(i) is not None for i in event.deleted_task_ids)
        return f"deleted-tasks:{n}"
    return f"ignored:{event.action}"


def drain_webhooks(bridge: BridgeContext, *, limit: int = 500) -> int:
    """Apply the hub inbox's webhook events after the ledger's cursor, then acknowledge them."""
    cursor = bridge.ledger.get("webhook_cursor")
    applied = 0
    while True:
        events = bridge.hub.events(after=cursor, limit=limit)
        if not events:
            break
        for ev in events:
            if ev.body is not None:
                apply_webhook(bridge, ev.body)
            else:
                log.warning("webhook event %d has no readable body (%s); skipped", ev.id, ev.error)
            cursor = ev.id
            bridge.ledger.put("webhook_cursor", cursor)
            applied += 1
        bridge.hub.ack(cursor)
        if len(events) < limit:
            break
    return applied


# ---------------------------------------------------------------------------------------------
# reconciliation
# ---------------------------------------------------------------------------------------------


def reconcile(bridge: BridgeContext) -> int:
    """List the whole project and apply it: new and changed annotations, deleted annotations and tasks.

    A task the listing lacks is confirmed gone with a direct lookup before its labels are deleted,
    so a page that shifted under concurrent edits never deletes anything by mistake.
    """
    seen: set[int] = set()
    for task in bridge.studio.iter_tasks(bridge.project_id, full=True):
        seen.add(task.id)
        if not observe_task(bridge, task):
            continue
        row = bridge.ledger.task(task_id=task.id)
        if row is None or row.state not in ("open", "done"):
            continue
        present = {a.id for a in task.annotations}
        for a in task.annotations:
            observe_annotation(bridge, a, row.case_id)
        for old in bridge.ledger.annotations_of(task.id):
            if old.annotation_id not in present:
                log.info("annotation %d of task %d is gone from Label Studio", old.annotation_id, task.id)
                bridge.ledger.delete_annotation(old.annotation_id)
    for row in bridge.ledger.tasks("open", "done"):
        if row.task_id is None or row.task_id in seen:
            continue
        if bridge.studio.get_task(row.task_id) is None:
            log.info("task %d (case %s) was deleted in Label Studio", row.task_id, row.case_id)
            bridge.ledger.delete_task(row.task_id)
    return len(seen)


# ---------------------------------------------------------------------------------------------
# flush: tell the hub
# ---------------------------------------------------------------------------------------------


def flush(bridge: BridgeContext) -> dict[str, int]:
    """Post every answer whose post changed, delete the labels of vanished annotations, release cases.

    Each answer goes to the hub as it is (a :class:`~fleet.protocol.LabelPost` with the task's overlap and
    gold answer); the hub decides its status (fleet.consensus) and its verdicts are kept in the ledger.
    """
    out = {"posted": 0, "deleted": 0, "released": 0}
    for payload in bridge.ledger.tombstones():
        _post(bridge, LabelPost.from_dict(payload))
        bridge.ledger.drop_tombstone(int(payload["annotation_id"]))
        out["deleted"] += 1
    for task in bridge.ledger.dirty_tasks():
        if task.task_id is None:
            continue
        if task.state in ("open", "done"):
            anns = bridge.ledger.annotations_of(task.task_id)
            valid = [a for a in anns if a.valid]
            gold = task.gold
            for a in valid:
                post = LabelPost(case_id=task.case_id, label=a.payload, annotator=a.annotator,
                                 task_id=task.task_id, annotation_id=a.annotation_id, created_at=a.created_at,
                                 source=SOURCE, overlap=task.overlap, ground_truth=a.ground_truth, gold_label=gold)
                payload = post.to_dict()
                if payload != a.sent:
                    _post(bridge, post)
                    bridge.ledger.mark_sent(a.annotation_id, payload)
                    out["posted"] += 1
            for a in anns:
                if not a.valid and a.sent is not None:  # a label whose annotation became a skip or malformed
                    _post(bridge, LabelPost.from_dict({**a.sent, "deleted": True}))
                    bridge.ledger.mark_sent(a.annotation_id, None)
                    out["deleted"] += 1
            crowd = [a for a in valid if not a.ground_truth]
            skipped = [a for a in anns if a.cancelled and not a.ground_truth]
            is_gold = gold is not None or any(a.ground_truth for a in valid)
            if not crowd and skipped and not is_gold:
                log.info("task %d (case %s) was skipped; returning the case to the pool", task.task_id, task.case_id)
                bridge.ledger.set_task(task.case_id, state="releasing")
                task = bridge.ledger.task(case_id=task.case_id) or task
            elif len(crowd) >= task.overlap and task.state == "open":
                bridge.ledger.set_task(task.case_id, state="done")
            elif len(crowd) < task.overlap and task.state == "done":
                bridge.ledger.set_task(task.case_id, state="open")
        if task.state == "releasing":
            out["released"] += _release(bridge, task.case_id, int(task.task_id or 0))
        bridge.ledger.set_task(task.case_id, dirty=False)
    return out


def _release(bridge: BridgeContext, case_id: str, task_id: int) -> int:
    """Take the task out of the queue and give the case back to the hub's unlabeled pool."""
    bridge.studio.delete_task(task_id)
    try:
        bridge.hub.release(case_id)
    except Conflict as exc:
        log.warning("case %s not released: %s", case_id, exc)
    except NotFound:
        log.warning("case %s is unknown to the hub; dropping its task", case_id)
    bridge.ledger.set_task(case_id, state="released")
    return 1


def _post(bridge: BridgeContext, post: LabelPost) -> None:
    """Post one answer and keep the hub's verdicts on its case. A permanent refusal is logged with the hub's
    reason and counted, not retried forever."""
    try:
        receipt = bridge.hub.post_label(post)
    except (NotFound, Conflict, InvalidInput) as exc:
        what = "deleting the label" if post.deleted else "the label"
        log.error("hub refused %s of annotation %s (case %s): %s", what, post.annotation_id, post.case_id, exc)
        bridge.ledger.put("hub_refused", int(bridge.ledger.get("hub_refused", 0)) + 1)
        return
    bridge.ledger.set_verdicts([(v.annotation_id, v.status, v.agreement, v.reason) for v in receipt.verdicts
                                if v.source == SOURCE])
