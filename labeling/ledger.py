"""The bridge's own memory (SQLite, standard library): which task holds which case, what each annotation
says, and what the hub was last told about it.

The ledger is what makes "labels back exactly once" hold across webhooks delivered twice or never,
reconciliation passes and restarts: an observation of Label Studio is applied only when it is new
(by annotation id, creation time and update time), and a label is posted only when the payload the
hub should hold differs from the one it last accepted. The hub is idempotent on the annotation id as
well, so a crash between a post and its record here costs one "unchanged" answer, never a duplicate.
Losing the ledger is survivable: a reconciliation pass adopts every task that carries a ``case_id``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.errors import InvalidInput
from fleet.protocol import Detection
from labeling.ledger_rows import ADDED_COLUMNS, SCHEMA, AnnotationRow, TaskRow, annotation_row, task_row


def _unopenable(path: str | Path, exc: Exception) -> InvalidInput:
    return InvalidInput(f"cannot open the labeling ledger at {path}: {exc}; expected a SQLite file the bridge writes "
                        "(or a new one in a folder this user can write): check --state")


class Ledger:
    """One SQLite file (or ``:memory:``), safe to share between threads."""

    def __init__(self, path: str | Path = ":memory:", *, clock: Any = time.time) -> None:
        """Open (or start) the ledger at ``path``; a path that is a folder, cannot be made, or holds something other
        than a SQLite database is an InvalidInput that names it (and a file that was not there is not left behind)."""
        new = str(path) != ":memory:" and not Path(path).exists()
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise _unopenable(path, exc) from None
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self.clock = clock
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
                for table, columns in ADDED_COLUMNS.items():
                    have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
                    for name, kind in columns:
                        if name not in have:
                            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        except sqlite3.Error as exc:
            self._db.close()
            if new:
                for leftover in (Path(str(path) + suffix) for suffix in ("", "-wal", "-shm")):
                    leftover.unlink(missing_ok=True)
            raise _unopenable(path, exc) from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    # -----------------------------------------------------------------------------------------
    # meta
    # -----------------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta(key, value) VALUES(?, ?)"
                       " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))

    # -----------------------------------------------------------------------------------------
    # tasks
    # -----------------------------------------------------------------------------------------

    def record_importing(self, project_id: int, rows: list[dict[str, Any]]) -> None:
        """Cases about to be imported: the import is "in doubt" until :meth:`bind` gives their task ids."""
        now = self.clock()
        with self.transaction() as db:
            for r in rows:
                db.execute("DELETE FROM tasks WHERE case_id = ? AND state NOT IN ('open', 'done', 'importing')",
                           (r["case_id"],))
                db.execute(
                    "INSERT OR IGNORE INTO tasks(case_id, project_id, state, overlap, gold_label, gold_answer,"
                    " model_version, score, cluster, image_url, task_json, pushed_at, updated_at)"
                    " VALUES(?, ?, 'importing', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (r["case_id"], project_id, r.get("overlap", 1), r.get("gold_label"), _dumps(r.get("gold_answer")),
                     r.get("model_version"), r.get("score"), r.get("cluster"), r.get("image_url"),
                     json.dumps(r.get("task_json")), now, now))

    def discard_importing(self, case_ids: list[str]) -> None:
        """Forget cases whose import Label Studio refused: they have no task, and the hub gets them back."""
        with self.transaction() as db:
            db.executemany("DELETE FROM tasks WHERE case_id = ? AND state = 'importing'", [(c,) for c in case_ids])

    def bind(self, case_id: str, task_id: int, *, prediction_id: int | None, overlap: int | None = None,
             project_id: int | None = None, state: str = "open") -> None:
        """Tie a case to its Label Studio task (after an import, or when adopting a task found in Label Studio)."""
        now = self.clock()
        with self.transaction() as db:
            # a task id Label Studio reused (SQLite reuses the highest id after a delete) frees the old row
            db.execute("UPDATE tasks SET task_id = NULL, state = 'deleted' WHERE task_id = ? AND case_id != ?",
                       (task_id, case_id))
            cur = db.execute(
                "UPDATE tasks SET task_id = ?, prediction_id = COALESCE(?, prediction_id), state = ?,"
                " overlap = COALESCE(?, overlap), updated_at = ? WHERE case_id = ?",
                (task_id, prediction_id, state, overlap, now, case_id))
            if cur.rowcount == 0:
                db.execute(
                    "INSERT INTO tasks(case_id, task_id, project_id, state, overlap, prediction_id, pushed_at,"
                    " updated_at, dirty) VALUES(?, ?, ?, ?, ?, ?, ?, ?, 1)",
                    (case_id, task_id, project_id or 0, state, overlap or 1, prediction_id, now, now))

    def set_cluster_done(self, case_ids: list[str], *, done: bool = True) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE tasks SET cluster_set = ? WHERE case_id = ?", [(int(done), c) for c in case_ids])

    def set_task(self, case_id: str, **fields: Any) -> None:
        allowed = {"state", "overlap", "dirty", "gold_label", "gold_answer", "image_url", "model_version",
                   "prediction_id", "task_json"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown task fields {sorted(bad)}")
        if "task_json" in fields:
            fields["task_json"] = json.dumps(fields["task_json"])
        if "gold_answer" in fields:
            fields["gold_answer"] = _dumps(fields["gold_answer"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE tasks SET {cols}, updated_at = ? WHERE case_id = ?",
                       (*[int(v) if isinstance(v, bool) else v for v in fields.values()], self.clock(), case_id))

    def task(self, *, case_id: str | None = None, task_id: int | None = None) -> TaskRow | None:
        if case_id is not None:
            row = self._one("SELECT * FROM tasks WHERE case_id = ?", (case_id,))
        else:
            row = self._one("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        return task_row(row) if row else None

    def tasks(self, *states: str) -> list[TaskRow]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._all(f"SELECT * FROM tasks WHERE state IN ({marks}) ORDER BY pushed_at, case_id", states)
        else:
            rows = self._all("SELECT * FROM tasks ORDER BY pushed_at, case_id")
        return [task_row(r) for r in rows]

    def dirty_tasks(self) -> list[TaskRow]:
        return [task_row(r) for r in self._all("SELECT * FROM tasks WHERE dirty = 1 ORDER BY task_id")]

    def mark_dirty(self, task_id: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE tasks SET dirty = 1 WHERE task_id = ?", (task_id,))

    def open_slots(self) -> int:
        """Annotations the queue still waits for: for each open task, its overlap minus its valid answers."""
        row = self._one(
            "SELECT COALESCE(SUM(MAX(t.overlap - COALESCE(a.n, 0), 0)), 0) AS slots FROM tasks t LEFT JOIN ("
            " SELECT task_id, COUNT(*) AS n FROM annotations WHERE deleted = 0 AND cancelled = 0"
            " AND ground_truth = 0 AND label IS NOT NULL GROUP BY task_id) a ON a.task_id = t.task_id"
            " WHERE t.state IN ('open', 'importing')")
        return int(row["slots"]) if row else 0

    def version_counts(self) -> dict[str, int]:
        """Tasks in the queue (open or done) by the model version whose prediction they were pushed with."""
        rows = self._all("SELECT COALESCE(model_version, '') AS v, COUNT(*) AS n FROM tasks"
                         " WHERE state IN ('open', 'done') GROUP BY v ORDER BY v")
        return {r["v"]: int(r["n"]) for r in rows}

    def state_counts(self) -> dict[str, int]:
        return {r["state"]: int(r["n"]) for r in self._all("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")}

    # -----------------------------------------------------------------------------------------
    # annotations
    # -----------------------------------------------------------------------------------------

    def annotation(self, annotation_id: int) -> AnnotationRow | None:
        row = self._one("SELECT * FROM annotations WHERE annotation_id = ?", (annotation_id,))
        return annotation_row(row) if row else None

    def annotations_of(self, task_id: int, *, include_deleted: bool = False) -> list[AnnotationRow]:
        sql = "SELECT * FROM annotations WHERE task_id = ?" + ("" if include_deleted else " AND deleted = 0")
        return [annotation_row(r) for r in self._all(sql + " ORDER BY annotation_id", (task_id,))]

    def upsert_annotation(self, *, annotation_id: int, task_id: int, case_id: str, user_id: int | None,
                          annotator: str, created_at: float, updated_at: float, ground_truth: bool,
                          cancelled: bool, label: int | None, refused: str | None,
                          answer: dict[str, Any] | None = None) -> str:
        """Apply one observation of an annotation. Returns ``new``, ``changed``, ``same`` or ``stale``.

        ``label`` is a class answer; ``answer`` a detect answer's boxes (a Detection's dict).

        An older observation than the one held (by ``updated_at``) is stale; so is any observation of an
        annotation already deleted, unless its creation time differs (Label Studio reused the id).
        """
        with self.transaction() as db:
            row = db.execute("SELECT * FROM annotations WHERE annotation_id = ?", (annotation_id,)).fetchone()
            if row is not None:
                same_identity = abs(row["created_at"] - created_at) < 1e-3 and row["task_id"] == task_id
                if same_identity and (row["deleted"] or updated_at < row["updated_at"] - 1e-6):
                    return "stale"
                if same_identity and (row["label"], row["answer"], row["refused"], bool(row["cancelled"]),
                                      bool(row["ground_truth"]), row["annotator"]) == (
                        label, _dumps(answer), refused, cancelled, ground_truth, annotator):
                    if updated_at > row["updated_at"]:
                        db.execute("UPDATE annotations SET updated_at = ? WHERE annotation_id = ?",
                                   (updated_at, annotation_id))
                    return "same"
                if not same_identity:
                    self._tombstone(db, row)
                    db.execute("UPDATE tasks SET dirty = 1 WHERE task_id = ?", (row["task_id"],))
                    db.execute("DELETE FROM annotations WHERE annotation_id = ?", (annotation_id,))
                    row = None
            if row is None:
                db.execute(
                    "INSERT INTO annotations(annotation_id, task_id, case_id, user_id, annotator, created_at,"
                    " updated_at, ground_truth, cancelled, label, answer, refused, first_seen)"
                    " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (annotation_id, task_id, case_id, user_id, annotator, created_at, updated_at, int(ground_truth),
                     int(cancelled), label, _dumps(answer), refused, self.clock()))
                outcome = "new"
            else:
                db.execute(
                    "UPDATE annotations SET annotator = ?, updated_at = ?, ground_truth = ?, cancelled = ?,"
                    " label = ?, answer = ?, refused = ? WHERE annotation_id = ?",
                    (annotator, max(updated_at, row["updated_at"]), int(ground_truth), int(cancelled), label,
                     _dumps(answer), refused, annotation_id))
                outcome = "changed"
            db.execute("UPDATE tasks SET dirty = 1 WHERE task_id = ?", (task_id,))
            return outcome

    def delete_annotation(self, annotation_id: int) -> bool:
        """Mark an annotation deleted (its label, if the hub holds one, is queued for deletion)."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM annotations WHERE annotation_id = ? AND deleted = 0",
                             (annotation_id,)).fetchone()
            if row is None:
                return False
            self._tombstone(db, row)
            db.execute("UPDATE annotations SET deleted = 1, sent = NULL WHERE annotation_id = ?", (annotation_id,))
            db.execute("UPDATE tasks SET dirty = 1 WHERE task_id = ?", (row["task_id"],))
            return True

    def delete_task(self, task_id: int) -> TaskRow | None:
        """A task is gone from Label Studio: its annotations are deleted and its case must be released."""
        task = self.task(task_id=task_id)
        if task is None or task.state not in ("open", "done", "importing"):
            return None
        for a in self.annotations_of(task_id):
            self.delete_annotation(a.annotation_id)
        self.set_task(task.case_id, state="releasing", dirty=True)
        return task

    def _tombstone(self, db: sqlite3.Connection, row: sqlite3.Row) -> None:
        if row["sent"]:
            payload = json.loads(row["sent"])
            payload["deleted"] = True
            db.execute("INSERT OR REPLACE INTO tombstones(annotation_id, payload, created) VALUES(?, ?, ?)",
                       (row["annotation_id"], json.dumps(payload), self.clock()))

    def mark_sent(self, annotation_id: int, payload: dict[str, Any] | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE annotations SET sent = ?, sent_at = ? WHERE annotation_id = ?",
                       (json.dumps(payload, sort_keys=True) if payload is not None else None,
                        self.clock() if payload is not None else None, annotation_id))

    def set_verdicts(self, verdicts: list[tuple[int, str, float | None, str]]) -> None:
        """What the hub decided about each answer ``(annotation_id, status, agreement, reason)``."""
        with self.transaction() as db:
            db.executemany("UPDATE annotations SET hub_status = ?, hub_agreement = ?, hub_reason = ? "
                           "WHERE annotation_id = ?", [(st, ag, why, a) for a, st, ag, why in verdicts])

    def tombstones(self) -> list[dict[str, Any]]:
        return [json.loads(r["payload"]) for r in self._all("SELECT payload FROM tombstones ORDER BY annotation_id")]

    def drop_tombstone(self, annotation_id: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM tombstones WHERE annotation_id = ?", (annotation_id,))

    # -----------------------------------------------------------------------------------------
    # users, gold, throughput
    # -----------------------------------------------------------------------------------------

    def user_name(self, user_id: int) -> str | None:
        row = self._one("SELECT name FROM users WHERE user_id = ?", (user_id,))
        return str(row["name"]) if row else None

    def put_users(self, users: dict[int, str]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO users(user_id, name) VALUES(?, ?)", list(users.items()))

    def gold_answers(self) -> list[tuple[str, int | Detection, int | Detection]]:
        """``(annotator, answer, known_label)`` for every crowd answer on a gold task (classes, then boxes)."""
        rows = self._all(
            "SELECT a.annotator, a.label, COALESCE(t.gold_label, g.label) AS known FROM annotations a"
            " JOIN tasks t ON t.task_id = a.task_id"
            " LEFT JOIN (SELECT task_id, MAX(label) AS label FROM annotations WHERE ground_truth = 1 AND deleted = 0"
            "            AND label IS NOT NULL GROUP BY task_id) g ON g.task_id = a.task_id"
            " WHERE a.deleted = 0 AND a.cancelled = 0 AND a.ground_truth = 0 AND a.label IS NOT NULL"
            " AND COALESCE(t.gold_label, g.label) IS NOT NULL")
        out: list[tuple[str, int | Detection, int | Detection]] = [
            (r["annotator"], int(r["label"]), int(r["known"])) for r in rows]
        boxes = self._all(
            "SELECT a.annotator, a.answer, t.gold_answer FROM annotations a JOIN tasks t ON t.task_id = a.task_id"
            " WHERE a.deleted = 0 AND a.cancelled = 0 AND a.ground_truth = 0 AND a.answer IS NOT NULL"
            " AND t.gold_answer IS NOT NULL")
        return out + [(r["annotator"], Detection.from_json(r["answer"]), Detection.from_json(r["gold_answer"]))
                      for r in boxes]

    def tasks_of_annotator(self, annotator: str) -> list[int]:
        rows = self._all("SELECT DISTINCT task_id FROM annotations WHERE annotator = ? AND deleted = 0", (annotator,))
        return [int(r["task_id"]) for r in rows]

    def completion_times(self, *, since: float) -> list[float]:
        """When the bridge first saw each crowd answer (skips included: they free a slot too) since ``since``."""
        rows = self._all("SELECT first_seen FROM annotations WHERE ground_truth = 0 AND first_seen >= ?"
                         " ORDER BY first_seen", (since,))
        return [float(r["first_seen"]) for r in rows]

    def delivery_delays(self) -> list[float]:
        """Seconds from an annotation's creation in Label Studio to the hub accepting its label."""
        rows = self._all("SELECT created_at, sent_at FROM annotations WHERE sent_at IS NOT NULL")
        return [float(r["sent_at"] - r["created_at"]) for r in rows]

    def agreement_summary(self) -> dict[str, Any]:
        """Mean agreement and status counts over the hub's last verdicts on the answers it holds."""
        rows = self._all("SELECT hub_status, hub_agreement FROM annotations WHERE sent IS NOT NULL AND deleted = 0")
        agreements = [r["hub_agreement"] for r in rows if r["hub_agreement"] is not None]
        statuses: dict[str, int] = {}
        for r in rows:
            key = r["hub_status"] or "unknown"
            statuses[key] = statuses.get(key, 0) + 1
        refused = self._one("SELECT COUNT(*) AS n FROM annotations WHERE refused IS NOT NULL AND deleted = 0")
        return {
            "labels": len(rows),
            "statuses": statuses,
            "mean_agreement": sum(agreements) / len(agreements) if agreements else None,
            "refused": int(refused["n"]) if refused else 0,
        }


def _dumps(value: dict[str, Any] | None) -> str | None:
    """A JSON column's text (keys sorted, so the same payload always compares equal)."""
    return None if value is None else json.dumps(value, sort_keys=True)
