"""A small in-memory Label Studio for unit tests of the bridge's logic (the integration tests use the real one).

It speaks the :class:`labeling.studio.Studio` methods the bridge calls and produces task, annotation and
webhook JSON in the shapes Label Studio 1.23 sends (see ``sample_webhooks.json``), so the same parsers run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet.errors import TransportError
from labeling.configs import classification_result, config_classes
from labeling.projects import Project, ProjectSettings
from labeling.records import TaskRecord, parse_task


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeStudio:
    users_by_id: dict[int, str] = field(default_factory=lambda: {1: "admin@flywheel.local"})
    projects: dict[int, Project] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    down: bool = False
    fail_pages_after: int | None = None
    lose_next_import: bool = False
    calls: list[str] = field(default_factory=list)
    clock: float = 1_800_000_000.0
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _ann_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _pred_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise TransportError(f"fake Label Studio is down ({name})")

    def tick(self, dt: float = 1.0) -> float:
        self.clock += dt
        return self.clock

    # --- the Studio surface ------------------------------------------------------------------

    def users(self) -> dict[int, str]:
        self._call("users")
        return dict(self.users_by_id)

    def find_project(self, title: str) -> Project | None:
        self._call("find_project")
        return next((p for p in self.projects.values() if p.title == title), None)

    def get_project(self, project_id: int) -> Project:
        self._call("get_project")
        return self.projects[project_id]

    def ensure_project(self, settings: ProjectSettings) -> Project:
        self._call("ensure_project")
        f = settings.fields()
        existing = next((p for p in self.projects.values() if p.title == settings.title), None)
        if existing is not None:
            old, new = existing.class_names, config_classes(settings.label_config)
            if new[: len(old)] != old:
                from fleet.errors import InvalidInput

                raise InvalidInput(f"classes {old} -> {new}")
        pid = existing.id if existing else len(self.projects) + 1
        version = f.get("model_version")
        refused = (existing is not None and version != existing.model_version
                   and not any(p["model_version"] == version for task in self.tasks.values()
                               if task["project"] == pid for p in task["predictions"]))
        self.projects[pid] = Project(pid, settings.title, f["label_config"], f["sampling"],
                                     existing.model_version if refused and existing else version,
                                     f["maximum_annotations"], f["overlap_cohort_percentage"], True)
        if refused:  # as Label Studio does: no prediction carries that version yet
            from labeling.projects import ProjectUpdateRefused

            raise ProjectUpdateRefused(f"fake Label Studio: no prediction has model_version {version!r}",
                                       self.projects[pid])
        return self.projects[pid]

    def update_project(self, project_id: int, **fields: Any) -> None:
        self._call("update_project")
        p = self.projects[project_id]
        self.projects[project_id] = Project(**{**p.__dict__, **{k: v for k, v in fields.items() if k in p.__dict__}})

    def ensure_webhook(self, project_id: int, url: str, *, secret: str, actions: Sequence[str]) -> int:
        self._call("ensure_webhook")
        return 1

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        self._call("import_tasks")
        ids = []
        for t in tasks:
            tid = next(self._ids)
            preds = [{"id": next(self._pred_ids), "task": tid, "model_version": p["model_version"],
                      "score": p.get("score"), "cluster": None, "result": p["result"]}
                     for p in t.get("predictions", [])]
            self.tasks[tid] = {"id": tid, "project": project_id, "data": dict(t["data"]), "overlap": 1,
                               "annotations": [], "predictions": preds, "is_labeled": False}
            ids.append(tid)
        if self.lose_next_import:
            self.lose_next_import = False
            raise TransportError("fake Label Studio: the import's answer was lost")
        return ids

    def set_clusters(self, clusters: Sequence[tuple[int, int]]) -> dict[int, str]:
        self._call("set_clusters")
        by_id = {p["id"]: p for t in self.tasks.values() for p in t["predictions"]}
        refused = {}
        for pid, cluster in clusters:
            if pid in by_id:
                by_id[pid]["cluster"] = cluster
            else:
                refused[pid] = f"fake Label Studio: HTTP 404: prediction {pid} not found"
        return refused

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> int:
        self._call("import_predictions")
        created = 0
        for p in predictions:
            if p.get("score") is not None and not 0.0 <= float(p["score"]) <= 1.0:
                continue  # as Label Studio 1.23 does: dropped, and only the count says so
            self.tasks[p["task"]]["predictions"].append(
                {"id": next(self._pred_ids), "task": p["task"], "model_version": p["model_version"],
                 "score": p.get("score"), "cluster": None, "result": p["result"]})
            created += 1
        return created

    def set_queue_version(self, project_id: int, version: str) -> None:
        from fleet.errors import InvalidInput

        if not any(p["model_version"] == version for t in self.tasks.values() if t["project"] == project_id
                   for p in t["predictions"]):
            raise InvalidInput("fake Label Studio: HTTP 400: Model version doesn't exist either as live model or "
                               "as static predictions.")
        self.update_project(project_id, model_version=version)

    def iter_tasks(self, project_id: int, *, ids: Sequence[int] | None = None, full: bool = True,
                   page_size: int = 500) -> Iterator[TaskRecord]:
        self._call("iter_tasks")
        rows = [t for t in self.tasks.values() if t["project"] == project_id and (ids is None or t["id"] in ids)]
        for i, t in enumerate(rows):
            if self.fail_pages_after is not None and i >= self.fail_pages_after:
                raise TransportError("fake Label Studio: listing broke off")
            yield parse_task(t if full else {**t, "annotations": [], "predictions": []})

    def get_task(self, task_id: int) -> TaskRecord | None:
        self._call("get_task")
        t = self.tasks.get(task_id)
        return parse_task(t) if t else None

    def delete_task(self, task_id: int) -> bool:
        self._call("delete_task")
        return self.tasks.pop(task_id, None) is not None

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> None:
        self._call("update_task_data")
        self.tasks[task_id]["data"] = dict(data)

    # --- what annotators and admins do in the UI (test helpers) --------------------------------

    def annotate(self, task_id: int, user_id: int, answer: str | None, *, result: Any = None,
                 cancelled: bool = False, ground_truth: bool = False) -> dict[str, Any]:
        self.users_by_id.setdefault(user_id, f"user{user_id}@flywheel.local")
        now = self.tick()
        if result is None:
            result = [] if answer is None else classification_result(answer)
        a = {"id": next(self._ann_ids), "task": task_id, "project": self.tasks[task_id]["project"],
             "completed_by": user_id, "result": result, "was_cancelled": cancelled, "ground_truth": ground_truth,
             "created_at": iso(now), "updated_at": iso(now), "lead_time": 1.0}
        self.tasks[task_id]["annotations"].append(a)
        return a

    def change(self, annotation_id: int, answer: str | None = None, *, result: Any = None) -> dict[str, Any]:
        a = self.annotation(annotation_id)
        a["result"] = result if result is not None else classification_result(answer or "")
        a["updated_at"] = iso(self.tick())
        return a

    def remove_annotation(self, annotation_id: int) -> None:
        for t in self.tasks.values():
            t["annotations"] = [a for a in t["annotations"] if a["id"] != annotation_id]

    def annotation(self, annotation_id: int) -> dict[str, Any]:
        return next(a for t in self.tasks.values() for a in t["annotations"] if a["id"] == annotation_id)

    def task_of_case(self, case_id: str) -> dict[str, Any]:
        return next(t for t in self.tasks.values() if t["data"].get("case_id") == case_id)

    def webhook(self, action: str, annotation: dict[str, Any] | None = None, *, task_ids: Sequence[int] = (),
                annotation_ids: Sequence[int] = ()) -> dict[str, Any]:
        """A webhook body shaped like Label Studio 1.23's."""
        project = {"id": next(iter(self.projects)) if self.projects else 1}
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED") and annotation is not None:
            task = {k: v for k, v in self.tasks[annotation["task"]].items() if k not in ("annotations", "predictions")}
            return {"action": action, "annotation": dict(annotation), "task": task, "project": project}
        if action == "ANNOTATIONS_DELETED":
            return {"action": action, "annotations": [{"id": i} for i in annotation_ids], "project": project}
        if action == "TASKS_DELETED":
            return {"action": action, "tasks": [{"id": i} for i in task_ids], "project": project}
        raise ValueError(action)
