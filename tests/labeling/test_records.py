"""Parsing Label Studio's JSON: real webhook bodies captured from 1.23.2, and malformed ones refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.errors import ProtocolError
from labeling.records import parse_annotation, parse_task, parse_time, parse_webhook

SAMPLES = json.loads((Path(__file__).parent / "sample_webhooks.json").read_text())["bodies"]


def test_captured_webhook_bodies_parse() -> None:
    created, updated, skipped, ground_truth, deleted, tasks_deleted = (parse_webhook(b) for b in SAMPLES)
    assert created.action == "ANNOTATION_CREATED" and created.project_id == 1
    [a] = created.annotations
    assert (a.id, a.task_id, a.user_id, a.was_cancelled) == (1, 1, 2, False)
    assert created.tasks[0].case_id == "c0" and created.tasks[0].overlap == 1
    assert updated.annotations[0].updated_at > a.updated_at
    assert updated.annotations[0].created_at == a.created_at
    assert skipped.annotations[0].was_cancelled and skipped.annotations[0].result == []
    assert ground_truth.annotations[0].ground_truth
    assert deleted.deleted_annotation_ids == (1,)
    assert tasks_deleted.deleted_task_ids == (4,)


def test_times_parse_from_iso_or_unix() -> None:
    assert parse_time("1970-01-01T00:00:10Z", "t") == 10.0
    assert parse_time("1970-01-01T00:00:10.5+00:00", "t") == 10.5
    assert parse_time(12, "t") == 12.0
    with pytest.raises(ProtocolError, match="ISO-8601"):
        parse_time("yesterday", "t")


@pytest.mark.parametrize(
    "body",
    [[], {"no": "action"}, {"action": "ANNOTATION_CREATED", "annotation": {"id": "x"}},
     {"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "task": 1}},
     {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": None}]}],
)
def test_malformed_webhook_bodies_are_refused(body: object) -> None:
    with pytest.raises(ProtocolError):
        parse_webhook(body)


def test_tasks_and_annotations_accept_expanded_users_and_projects() -> None:
    t = parse_task({"id": 5, "project": {"id": 2}, "data": {"case_id": "c", "image": "u"}, "overlap": 2,
                    "annotations": [{"id": 9, "completed_by": {"id": 3, "email": "a@b"}, "result": [],
                                     "created_at": "2026-01-01T00:00:00Z"}],
                    "predictions": [{"id": 4, "model_version": "m", "score": 0.2, "cluster": 1}]})
    assert (t.project_id, t.case_id, t.overlap) == (2, "c", 2)
    assert t.annotations[0].user_id == 3 and t.annotations[0].task_id == 5
    assert t.predictions[0].cluster == 1
    with pytest.raises(ProtocolError, match="data"):
        parse_task({"id": 1, "data": "nope"})
    with pytest.raises(ProtocolError, match="must be an object"):
        parse_annotation("nope")
