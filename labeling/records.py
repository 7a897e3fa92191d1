"""Plain records of Label Studio objects, parsed from its JSON (API responses and webhook bodies alike).

The rest of the bridge works with these, never with SDK types, so webhook bodies and reconciliation
listings go through one parser. A body that lacks a field the bridge relies on raises
:class:`fleet.errors.ProtocolError` naming the field and the value received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet.errors import ProtocolError

# the webhook actions the bridge consumes
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED", "TASKS_DELETED")
WEBHOOK_ACTIONS = ANNOTATION_ACTIONS + DELETE_ACTIONS


@dataclass(frozen=True)
class AnnotationRecord:
    id: int
    task_id: int
    user_id: int | None
    result: Any
    was_cancelled: bool
    ground_truth: bool
    created_at: float
    updated_at: float
    lead_time: float | None = None


@dataclass(frozen=True)
class PredictionRecord:
    id: int
    task_id: int
    model_version: str
    score: float | None
    cluster: int | None


@dataclass(frozen=True)
class TaskRecord:
    id: int
    project_id: int | None
    data: dict[str, Any]
    overlap: int
    annotations: tuple[AnnotationRecord, ...] = ()
    predictions: tuple[PredictionRecord, ...] = ()
    is_labeled: bool = False

    @property
    def case_id(self) -> str | None:
        value = self.data.get("case_id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class WebhookEvent:
    """One Label Studio webhook body, reduced to what the bridge acts on."""

    action: str
    project_id: int | None
    annotations: tuple[AnnotationRecord, ...] = ()
    tasks: tuple[TaskRecord, ...] = ()
    deleted_annotation_ids: tuple[int, ...] = ()
    deleted_task_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def parse_time(value: Any, what: str) -> float:
    """An ISO-8601 timestamp (Label Studio's ``...Z`` form included) or a unix number, as unix seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise ProtocolError(f"{what} must be an ISO-8601 time; received {value!r}")


def parse_annotation(d: Any, *, task_id: int | None = None) -> AnnotationRecord:
    if not isinstance(d, dict):
        raise ProtocolError(f"annotation must be an object; received {type(d).__name__}")
    aid = _int(d.get("id"), "annotation.id")
    task = d.get("task", task_id)
    if isinstance(task, dict):
        task = task.get("id")
    user = d.get("completed_by")
    if isinstance(user, dict):
        user = user.get("id")
    lead = d.get("lead_time")
    return AnnotationRecord(
        id=aid,
        task_id=_int(task, f"annotation {aid}.task"),
        user_id=None if user is None else _int(user, f"annotation {aid}.completed_by"),
        result=d.get("result"),
        was_cancelled=bool(d.get("was_cancelled", False)),
        ground_truth=bool(d.get("ground_truth", False)),
        created_at=parse_time(d.get("created_at"), f"annotation {aid}.created_at"),
        updated_at=parse_time(d.get("updated_at", d.get("created_at")), f"annotation {aid}.updated_at"),
        lead_time=float(lead) if isinstance(lead, (int, float)) and not isinstance(lead, bool) else None,
    )


def parse_prediction(d: Any, *, task_id: int | None = None) -> PredictionRecord:
    if not isinstance(d, dict):
        raise ProtocolError(f"prediction must be an object; received {type(d).__name__}")
    pid = _int(d.get("id"), "prediction.id")
    score, cluster = d.get("score"), d.get("cluster")
    return PredictionRecord(
        id=pid,
        task_id=_int(d.get("task", task_id), f"prediction {pid}.task"),
        model_version=str(d.get("model_version") or ""),
        score=float(score) if isinstance(score, (int, float)) else None,
        cluster=int(cluster) if isinstance(cluster, int) and not isinstance(cluster, bool) else None,
    )


def parse_task(d: Any) -> TaskRecord:
    if not isinstance(d, dict):
        raise ProtocolError(f"task must be an object; received {type(d).__name__}")
    tid = _int(d.get("id"), "task.id")
    data = d.get("data")
    if not isinstance(data, dict):
        raise ProtocolError(f"task {tid}.data must be an object; received {data!r}")
    project = d.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    overlap = d.get("overlap", 1)
    anns = d.get("annotations") or []
    preds = d.get("predictions") or []
    return TaskRecord(
        id=tid,
        project_id=None if project is None else _int(project, f"task {tid}.project"),
        data=data,
        overlap=_int(overlap, f"task {tid}.overlap") if overlap is not None else 1,
        annotations=tuple(parse_annotation(a, task_id=tid) for a in anns if isinstance(a, dict)),
        predictions=tuple(parse_prediction(p, task_id=tid) for p in preds if isinstance(p, dict)),
        is_labeled=bool(d.get("is_labeled", False)),
    )


def parse_webhook(body: Any) -> WebhookEvent:
    """A raw webhook body as Label Studio sends it (``action`` plus the action's payload)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"webhook body must be an object; received {type(body).__name__}")
    action = body.get("action")
    if not isinstance(action, str):
        raise ProtocolError(f"webhook body has no 'action'; received keys {sorted(body)}")
    project = body.get("project")
    project_id = project.get("id") if isinstance(project, dict) else project
    project_id = project_id if isinstance(project_id, int) else None
    if action in ANNOTATION_ACTIONS:
        anns = body.get("annotation")
        tasks = body.get("task")
        ann_list = anns if isinstance(anns, list) else [anns]
        task_list = tasks if isinstance(tasks, list) else ([tasks] if tasks is not None else [])
        return WebhookEvent(
            action, project_id,
            annotations=tuple(parse_annotation(a) for a in ann_list),
            tasks=tuple(parse_task(t) for t in task_list),
        )
    if action == "ANNOTATIONS_DELETED":
        ids = tuple(_int(a.get("id") if isinstance(a, dict) else a, "annotations[].id")
                    for a in body.get("annotations") or [])
        return WebhookEvent(action, project_id, deleted_annotation_ids=ids)
    if action == "TASKS_DELETED":
        ids = tuple(_int(t.get("id") if isinstance(t, dict) else t, "tasks[].id") for t in body.get("tasks") or [])
        return WebhookEvent(action, project_id, deleted_task_ids=ids)
    return WebhookEvent(action, project_id, extra={k: v for k, v in body.items() if k != "project"})


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise ProtocolError(f"{what} must be an integer; received {value!r}")
    return value
