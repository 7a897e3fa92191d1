"""The ledger's tables (SQLite schema) and the rows it hands out."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from fleet.protocol import Classification, Prediction, parse_prediction

OPEN_STATES = ("open", "done")

# columns added after the first release, with their type: a ledger from an older bridge gains them at open
ADDED_COLUMNS = {"annotations": (("hub_status", "TEXT"), ("hub_agreement", "REAL"), ("hub_reason", "TEXT"),
                                  ("answer", "TEXT")),
                 "tasks": (("gold_answer", "TEXT"),)}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    case_id TEXT PRIMARY KEY,
    task_id INTEGER UNIQUE,
    project_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    overlap INTEGER NOT NULL DEFAULT 1,
    gold_label INTEGER,
    model_version TEXT,
    score REAL,
    cluster INTEGER,
    prediction_id INTEGER,
    cluster_set INTEGER NOT NULL DEFAULT 0,
    image_url TEXT,
    task_json TEXT,
    pushed_at REAL NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_dirty ON tasks(dirty);
CREATE TABLE IF NOT EXISTS annotations (
    annotation_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    case_id TEXT NOT NULL,
    user_id INTEGER,
    annotator TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ground_truth INTEGER NOT NULL,
    cancelled INTEGER NOT NULL,
    label INTEGER,
    refused TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    sent TEXT,
    sent_at REAL,
    hub_status TEXT,
    hub_agreement REAL,
    hub_reason TEXT
);
CREATE INDEX IF NOT EXISTS annotations_task ON annotations(task_id);
CREATE INDEX IF NOT EXISTS annotations_seen ON annotations(first_seen);
CREATE TABLE IF NOT EXISTS tombstones (annotation_id INTEGER PRIMARY KEY, payload TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS users (user_id INTEGER PRIMARY KEY, name TEXT NOT NULL);
"""


@dataclass(frozen=True)
class TaskRow:
    case_id: str
    task_id: int | None
    project_id: int
    state: str
    overlap: int
    gold_label: int | None
    model_version: str | None
    score: float | None
    cluster: int | None
    prediction_id: int | None
    cluster_set: bool
    image_url: str | None
    pushed_at: float
    dirty: bool
    task_json: dict[str, Any] | None = None
    gold_answer: dict[str, Any] | None = None  # the known boxes of a detect gold task (a Detection's dict)

    @property
    def gold(self) -> Prediction | None:
        """The known answer of a gold task, as the hub's label type (None: not a gold task)."""
        if self.gold_label is not None:
            return Classification(int(self.gold_label))
        return None if self.gold_answer is None else parse_prediction(self.gold_answer, "gold answer")


@dataclass(frozen=True)
class AnnotationRow:
    annotation_id: int
    task_id: int
    case_id: str
    user_id: int | None
    annotator: str
    created_at: float
    updated_at: float
    ground_truth: bool
    cancelled: bool
    label: int | None
    refused: str | None
    deleted: bool
    first_seen: float
    sent: dict[str, Any] | None
    sent_at: float | None
    answer: dict[str, Any] | None = None  # a detect answer's boxes (a Detection's dict); classes use ``label``

    @property
    def valid(self) -> bool:
        """An answer that counts: not deleted, not a skip, and parsed to a class or to boxes."""
        return not self.deleted and not self.cancelled and (self.label is not None or self.answer is not None)

    @property
    def payload(self) -> Prediction:
        """The answer as the hub's label type."""
        if self.answer is not None:
            return parse_prediction(self.answer, f"annotation {self.annotation_id}")
        return Classification(int(self.label or 0))


def task_row(r: sqlite3.Row) -> TaskRow:
    return TaskRow(
        case_id=r["case_id"], task_id=r["task_id"], project_id=r["project_id"], state=r["state"],
        overlap=int(r["overlap"]), gold_label=r["gold_label"], model_version=r["model_version"], score=r["score"],
        cluster=r["cluster"], prediction_id=r["prediction_id"], cluster_set=bool(r["cluster_set"]),
        image_url=r["image_url"], pushed_at=float(r["pushed_at"]), dirty=bool(r["dirty"]),
        task_json=json.loads(r["task_json"]) if r["task_json"] else None,
        gold_answer=json.loads(r["gold_answer"]) if r["gold_answer"] else None,
    )


def annotation_row(r: sqlite3.Row) -> AnnotationRow:
    return AnnotationRow(
        annotation_id=r["annotation_id"], task_id=r["task_id"], case_id=r["case_id"], user_id=r["user_id"],
        annotator=r["annotator"], created_at=float(r["created_at"]), updated_at=float(r["updated_at"]),
        ground_truth=bool(r["ground_truth"]), cancelled=bool(r["cancelled"]), label=r["label"],
        refused=r["refused"], deleted=bool(r["deleted"]), first_seen=float(r["first_seen"]),
        sent=json.loads(r["sent"]) if r["sent"] else None, sent_at=r["sent_at"],
        answer=json.loads(r["answer"]) if r["answer"] else None,
    )
