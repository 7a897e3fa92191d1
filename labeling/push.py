"""Push: the hub's selection becomes Label Studio tasks, in batches, at the pace annotators work.

Each task's image is the hub's signed, expiring URL (the annotator's browser loads it directly); the
model's prediction goes in as a pre-annotation with ``model_version`` and ``score``, and its diversity
``cluster`` is set on it, so the project's uncertainty sampling gives each annotator the most
informative, least redundant task next. The throttle holds the queue near a target depth derived from
how fast annotators finish, so the fleet never floods them.

A bulk import whose answer is lost is "in doubt": the cases are looked up in Label Studio before
anything is imported again, so a retry never duplicates a task.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from fleet.errors import FlywheelError, InvalidInput, RetryableError
from labeling.configs import IMAGE_FIELD, classification_result
from labeling.hub_client import HubNotFound, SelectedCase

if TYPE_CHECKING:
    from labeling.bridge import Bridge

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# throttle (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throttle:
    """Keep ``horizon_s`` seconds of annotator work queued, measured over the last ``window_s``."""

    horizon_s: float = 900.0
    window_s: float = 600.0
    min_depth: int = 20
    max_depth: int = 2000
    max_batch: int = 1000

    def __post_init__(self) -> None:
        if self.horizon_s <= 0 or self.window_s <= 0:
            raise InvalidInput(f"horizon_s and window_s must be positive; received {self.horizon_s}, {self.window_s}")
        if not 0 <= self.min_depth <= self.max_depth:
            raise InvalidInput(f"need 0 <= min_depth <= max_depth; received {self.min_depth}, {self.max_depth}")
        if self.max_batch < 1:
            raise InvalidInput(f"max_batch must be at least 1; received {self.max_batch}")


def throughput(times: np.ndarray[Any, Any], *, now: float, window_s: float) -> float:
    """Annotations per second over the last ``window_s`` seconds. times: (n,) unix seconds of completions."""
    t = np.asarray(times, dtype=np.float64)
    if window_s <= 0:
        raise InvalidInput(f"window_s must be positive; received {window_s}")
    return float(np.count_nonzero((t > now - window_s) & (t <= now))) / window_s


def target_depth(rate: float, *, horizon_s: float, min_depth: int, max_depth: int) -> int:
    """Queue depth (in annotations) that keeps ``horizon_s`` of work ahead of annotators finishing ``rate``/s."""
    if not math.isfinite(rate) or rate < 0:
        raise InvalidInput(f"rate must be a finite, non-negative number; received {rate!r}")
    return int(min(max(math.ceil(rate * horizon_s), min_depth), max_depth))


def push_budget(open_slots: int, target: int, *, expected_overlap: float = 1.0, max_batch: int = 1000) -> int:
    """How many tasks to add: the shortfall in annotations, divided by the annotations a task needs."""
    if expected_overlap < 1:
        raise InvalidInput(f"expected_overlap must be at least 1; received {expected_overlap}")
    shortfall = max(target - open_slots, 0)
    return int(min(math.floor(shortfall / expected_overlap), max_batch))


def budget_now(bridge: Bridge) -> tuple[int, dict[str, float]]:
    """The push budget for this turn, with the figures it came from."""
    th = bridge.config.throttle
    now = bridge.clock()
    times = np.asarray(bridge.ledger.completion_times(since=now - th.window_s))
    rate = throughput(times, now=now, window_s=th.window_s)
    target = target_depth(rate, horizon_s=th.horizon_s, min_depth=th.min_depth, max_depth=th.max_depth)
    slots = bridge.ledger.open_slots()
    budget = push_budget(slots, target, expected_overlap=bridge.config.expected_overlap, max_batch=th.max_batch)
    return budget, {"rate_per_s": rate, "target_depth": target, "open_slots": slots}


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


def task_json(case: SelectedCase) -> dict[str, Any]:
    """A Label Studio task for one case: the signed image URL, and the prediction as a pre-annotation."""
    return {
        "data": {
            IMAGE_FIELD: case.image_url,
            "case_id": case.case_id,
            "model_version": case.model_version,
            "predicted": case.predicted_name,
            "score": case.score,
            "cluster": case.cluster,
            "tags": case.tags,
        },
        "predictions": [{
            "model_version": case.model_version,
            "score": case.score,
            "result": classification_result(case.predicted_name),
        }],
    }


def push_once(bridge: Bridge) -> int:
    """Settle earlier pushes, then ask the hub for as many cases as the throttle allows and push them."""
    settle(bridge)
    budget, figures = budget_now(bridge)
    log.info("push: %d open annotation slots, target %d (%.3f annotations/s) -> budget %d tasks",
             figures["open_slots"], figures["target_depth"], figures["rate_per_s"], budget)
    if budget < 1:
        return 0
    # until every selected case is in the ledger, a failure leaves them queued in the hub: the flag
    # makes the next turn adopt them from the hub's queued pool
    bridge.ledger.put("selection_in_doubt", True)
    try:
        selection = bridge.hub.select(budget, strategy=bridge.config.strategy)
    except RetryableError:
        log.warning("selection answer lost; queued cases will be adopted from the hub's pool next turn")
        raise
    pushed = push_cases(bridge, selection.cases)
    bridge.ledger.put("selection_in_doubt", False)
    return pushed


def push_cases(bridge: Bridge, cases: Sequence[SelectedCase], *, gold: dict[str, int] | None = None) -> int:
    """Create tasks for ``cases`` in batches; ``gold`` maps case ids to known answers (gold tasks)."""
    if not cases:
        return 0
    names = list(cases[0].class_names)
    for c in cases:
        if list(c.class_names) != names:
            raise InvalidInput(f"one push mixes models with different classes: {names} and {list(c.class_names)} "
                               f"(case {c.case_id})")
    versions = sorted({c.model_version for c in cases})
    project = bridge.project(names, versions[-1])
    if project.model_version != versions[-1]:
        bridge.studio.update_project(project.id, model_version=versions[-1])
        bridge.ledger.put("model_version", versions[-1])
        project = bridge.project(names, versions[-1])
    gold = gold or {}
    pushed = 0
    size = bridge.config.batch_size
    started = time.perf_counter()
    for start in range(0, len(cases), size):
        chunk = cases[start:start + size]
        for c in chunk:  # a case already queued can still become a gold task
            if c.case_id in gold and _live(bridge, c.case_id):
                bridge.ledger.set_task(c.case_id, gold_label=gold[c.case_id], dirty=True)
        batch = [c for c in chunk if not _live(bridge, c.case_id)]
        if not batch:
            continue
        payloads = [task_json(c) for c in batch]
        rows: list[dict[str, Any]] = [
            {"case_id": c.case_id, "gold_label": gold.get(c.case_id), "model_version": c.model_version,
             "score": c.score, "cluster": c.cluster, "image_url": c.image_url, "task_json": p}
            for c, p in zip(batch, payloads, strict=True)]
        bridge.ledger.record_importing(project.id, rows)
        try:
            task_ids = bridge.studio.import_tasks(project.id, payloads)
        except RetryableError as exc:
            log.warning("import of %d tasks is in doubt (%s); checking Label Studio before retrying", len(rows), exc)
            settle(bridge)
        else:
            _bind(bridge, task_ids)
        pushed += len(batch)
    queued_at = time.perf_counter()
    try:
        set_clusters(bridge)
    except FlywheelError as exc:  # the tasks are queued already; the next turn sets the rest
        log.warning("clusters not all set yet (%s); the next turn sets them", exc)
    bridge.push_timing = {"tasks": pushed, "queue_s": queued_at - started,
                          "clusters_s": time.perf_counter() - queued_at}
    return pushed


def push_gold(bridge: Bridge, items: Sequence[tuple[SelectedCase, int]]) -> int:
    """Gold tasks: cases whose answer is known, queued like any other task (annotators cannot tell).

    The known answer stays in the bridge's ledger, never in the task, where annotators could read it.
    An answer that matches it is posted with status ``gold``; one that does not is held; both score
    the annotator (:func:`labeling.consensus.score_annotators`).
    """
    gold = {c.case_id: int(label) for c, label in items}
    for c, label in items:
        if not 0 <= label < len(c.class_names):
            raise InvalidInput(f"gold label {label} of case {c.case_id} is not a class index of {list(c.class_names)}")
    return push_cases(bridge, [c for c, _ in items], gold=gold)


def settle(bridge: Bridge) -> None:
    """Finish what an interrupted push left: imports in doubt, clusters not yet set, orphaned selections."""
    doubtful = bridge.ledger.tasks("importing")
    if doubtful:
        time.sleep(bridge.config.in_doubt_grace_s)  # an import still being processed must land first
        found: dict[str, int] = {}
        for t in bridge.studio.iter_tasks(bridge.project_id, full=False):
            if t.case_id is not None and t.case_id not in found:
                found[t.case_id] = t.id
        present = [found[t.case_id] for t in doubtful if t.case_id in found]
        if present:
            _bind(bridge, present)
        missing = [t for t in doubtful if t.case_id not in found]
        if missing:
            log.info("re-importing %d tasks Label Studio never received", len(missing))
            task_ids = bridge.studio.import_tasks(bridge.project_id, [t.task_json or {} for t in missing])
            _bind(bridge, task_ids)
    set_clusters(bridge)
    if bridge.ledger.get("selection_in_doubt"):
        adopt_orphans(bridge)


def set_clusters(bridge: Bridge, *, chunk: int = 100) -> int:
    """Set the diversity cluster on every pushed prediction that lacks it, a chunk at a time (progress
    is kept if Label Studio goes away half way). Label Studio's bulk import drops ``cluster`` and only
    its one-prediction endpoint sets it, so this is the slow part of a push; tasks are already in the
    queue, ordered by score, while it runs."""
    pending = [t for t in bridge.ledger.tasks("open", "done")
               if not t.cluster_set and t.prediction_id is not None and t.cluster is not None]
    for start in range(0, len(pending), chunk):
        part = pending[start:start + chunk]
        bridge.studio.set_clusters([(int(t.prediction_id or 0), int(t.cluster or 0)) for t in part])
        bridge.ledger.set_cluster_done([t.case_id for t in part])
    return len(pending)


def adopt_orphans(bridge: Bridge) -> int:
    """Push the hub's queued cases that have no task here (a selection whose answer was lost)."""
    cases = bridge.hub.iter_pool("queued")
    orphans = [SelectedCase.from_json(c) for c in cases if not _live(bridge, str(c.get("case_id")))]
    pushed = 0
    if orphans:
        log.info("adopting %d queued cases without a task", len(orphans))
        pushed = push_cases(bridge, orphans)
    bridge.ledger.put("selection_in_doubt", False)
    return pushed


def refresh_images(bridge: Bridge, *, limit: int = 100) -> int:
    """Give open tasks whose signed image URL expires within the margin a fresh URL from the hub (at most
    ``limit`` a turn, soonest to expire first: each costs a hub read and a Label Studio update)."""
    now = bridge.clock()
    margin = bridge.config.image_refresh_margin_s
    refreshed = 0
    expiring = sorted((e, t.case_id) for t in bridge.ledger.tasks("open")
                      if (e := _expiry(t.image_url)) is not None and e - now <= margin)
    for _, case_id in expiring[:limit]:
        t = bridge.ledger.task(case_id=case_id)
        if t is None or t.task_id is None:
            continue
        try:
            fresh = bridge.hub.get_case(t.case_id)
        except HubNotFound:
            continue
        url = fresh.get("image_url")
        if not isinstance(url, str) or url == t.image_url:
            continue
        task = bridge.studio.get_task(t.task_id)
        if task is None:
            continue
        bridge.studio.update_task_data(t.task_id, {**task.data, IMAGE_FIELD: url})
        bridge.ledger.set_task(t.case_id, image_url=url)
        refreshed += 1
    return refreshed


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _live(bridge: Bridge, case_id: str) -> bool:
    t = bridge.ledger.task(case_id=case_id)
    return t is not None and t.state in ("open", "done", "importing")


def _bind(bridge: Bridge, task_ids: Sequence[int]) -> None:
    """Record the tasks an import created (their clusters are set afterwards by :func:`set_clusters`)."""
    done: list[str] = []
    for task in bridge.studio.iter_tasks(bridge.project_id, ids=list(task_ids)):
        if task.case_id is None:
            continue
        row = bridge.ledger.task(case_id=task.case_id)
        pred = next((p for p in task.predictions if row is None or p.model_version == row.model_version), None)
        bridge.ledger.bind(task.case_id, task.id, prediction_id=pred.id if pred else None, overlap=task.overlap,
                           project_id=bridge.project_id)
        if pred is None or row is None or row.cluster is None or pred.cluster == row.cluster:
            done.append(task.case_id)
    bridge.ledger.set_cluster_done(done)


def _expiry(url: str | None) -> float | None:
    if not url:
        return None
    values = parse_qs(urlparse(url).query).get("exp")
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None
