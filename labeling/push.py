"""Push: the hub's selection becomes Label Studio tasks, in batches, at the pace annotators work.

Each task's image is the hub's signed, expiring URL (the annotator's browser loads it directly); the
model's prediction goes in as a pre-annotation with ``model_version`` and a queue ``score``, and its diversity
``cluster`` is set on it, so the project's uncertainty sampling gives each annotator the most
informative, least redundant task next. The throttle holds the queue near a target depth derived from
how fast annotators finish, so the fleet never floods them.

Label Studio's bulk import keeps a prediction's ``score`` but drops its ``cluster`` (only its one-prediction
endpoint sets that, ~150 ms a request). So the diversity goes in with the import, in the score
(:func:`queue_scores`: rank within the cluster, then informativeness, scaled into [0, 1), the range Label Studio
accepts for a score): the queue serves every cluster's most
informative case before any cluster's second from the moment the import returns. The ``cluster`` field itself,
which adds Label Studio's per-annotator balancing, is then set a time budget per turn
(``BridgeConfig.cluster_budget_s``), off the push's path.

A bulk import whose answer is lost is "in doubt": the cases are looked up in Label Studio before
anything is imported again, so a retry never duplicates a task.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from fleet.errors import (
    Conflict,
    FlywheelError,
    InvalidInput,
    NotFound,
    PermanentError,
    ProtocolError,
    RetryableError,
)
from fleet.protocol import Detection, SelectedCase
from labeling.configs import IMAGE_FIELD, kind_for_task
from labeling.context import BridgeContext
from labeling.throttle import push_budget, target_depth, throughput

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the queue's depth
# ---------------------------------------------------------------------------------------------


def budget_now(bridge: BridgeContext) -> tuple[int, dict[str, float]]:
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


def task_json(case: SelectedCase, *, queue_version: str, cluster: int | None = None,
              queue_score: float | None = None) -> dict[str, Any]:
    """A Label Studio task for one case: the signed image URL, and the prediction as a pre-annotation (the
    predicted class, or the model's boxes in percent coordinates with each box's score).

    The prediction carries the queue's version (see :data:`labeling.bridge.QUEUE_VERSION`) and its place in the
    queue (lowest served first): ``queue_score`` (:func:`queue_scores`), else the case's image-level score
    (1 - informativeness). The model that made it, its score and its cluster are in the task's data, where the
    data manager shows them as columns.
    """
    prediction = case.case.prediction
    return {
        "data": {
            IMAGE_FIELD: case.image_url,
            "case_id": case.case_id,
            "model_version": case.model_version,
            "predicted": _predicted_text(case),
            "score": case.score,
            "cluster": case.cluster if cluster is None else cluster,
            "tags": case.case.tags,
        },
        "predictions": [{
            "model_version": queue_version,
            "score": case.score if queue_score is None else queue_score,
            "result": kind_for_task(prediction.task).prediction(prediction, case.class_names),
        }],
    }


def push_once(bridge: BridgeContext) -> int:
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
        selection = bridge.hub.select(budget, strategy=bridge.config.strategy, balance=bridge.config.balance,
                                      seed=bridge.config.selection_seed)
    except RetryableError:
        log.warning("selection answer lost; queued cases will be adopted from the hub's pool next turn")
        raise
    pushed = push_cases(bridge, selection.cases)
    bridge.ledger.put("selection_in_doubt", False)
    return pushed


def push_cases(bridge: BridgeContext, cases: Sequence[SelectedCase], *,
               gold: Mapping[str, int | Detection] | None = None) -> int:
    """Create tasks for ``cases`` in batches; ``gold`` maps case ids to known answers (gold tasks).

    Every Label Studio refusal (4xx) on this path is handled where it happens: a refused project update is
    reported and the project is used as it is (:meth:`Bridge.project`); a refused import gives its cases
    back to the hub's pool and is reported; a refused cluster is reported and the task stays queued.
    """
    if not cases:
        return 0
    names = list(cases[0].class_names)
    task = bridge.kind.task
    for c in cases:
        if c.case.task != task:
            raise InvalidInput(f"case {c.case_id} is a {c.case.task!r} case; this project labels {task!r} cases "
                               f"(BridgeConfig.task; one project per task)")
        if list(c.class_names) != names:
            raise InvalidInput(f"one push mixes models with different classes: {names} and {list(c.class_names)} "
                               f"(case {c.case_id})")
    project = bridge.project(names)
    clusters = _global_clusters(bridge, cases)
    order = queue_scores(cases, clusters)
    gold = gold or {}
    pushed = 0
    size = bridge.config.batch_size
    started = time.perf_counter()
    for start in range(0, len(cases), size):
        chunk = cases[start:start + size]
        for c in chunk:  # a case already queued can still become a gold task
            if c.case_id in gold and _live(bridge, c.case_id):
                bridge.ledger.set_task(c.case_id, **_gold_fields(gold[c.case_id]), dirty=True)
        batch = [c for c in chunk if not _live(bridge, c.case_id)]
        if not batch:
            continue
        payloads = [task_json(c, queue_version=bridge.config.queue_version, cluster=clusters[c.case_id],
                              queue_score=order[c.case_id]) for c in batch]
        rows: list[dict[str, Any]] = [
            {"case_id": c.case_id, **_gold_fields(gold.get(c.case_id)), "model_version": c.model_version,
             "score": c.score, "cluster": clusters[c.case_id], "image_url": c.image_url, "task_json": p}
            for c, p in zip(batch, payloads, strict=True)]
        bridge.ledger.record_importing(project.id, rows)
        try:
            task_ids = bridge.studio.import_tasks(project.id, payloads)
        except RetryableError as exc:
            log.warning("import of %d tasks is in doubt (%s); checking Label Studio before retrying", len(rows), exc)
            settle(bridge)
        except PermanentError as exc:
            _refused(bridge, [c.case_id for c in batch], exc)
            continue
        else:
            _bind(bridge, task_ids)
        pushed += len(batch)
    queued_at = time.perf_counter()
    ensure_queue_version(bridge)
    left = -1
    try:
        left = set_clusters(bridge, budget_s=bridge.config.cluster_budget_s)
    except FlywheelError as exc:  # the tasks are queued already; the next turn sets the rest
        log.warning("clusters not all set yet (%s); the next turn sets them", exc)
    bridge.push_timing = {"tasks": pushed, "queue_s": queued_at - started,
                          "clusters_s": time.perf_counter() - queued_at, "clusters_left": float(left)}
    return pushed


RANKS = 100  # ranks within a cluster the queue score tells apart; later ones share the last rank, by score
MAX_FRACTION = 0.999999  # the case's own score, kept below the next rank


def queue_scores(cases: Sequence[SelectedCase], clusters: Mapping[str, int]) -> dict[str, float]:
    """Each case's place in Label Studio's queue (lowest served first), in [0, 1) as Label Studio requires of a
    prediction's score: ``(rank + score) / RANKS``, where ``rank`` is the case's rank within its diversity cluster
    (0 = the cluster's most informative case; at most ``RANKS - 1``) and ``score`` its own score
    (1 - informativeness, in [0, 1)).

    Label Studio's uncertainty sampling serves tasks by score (and, once set, by how many tasks of the
    prediction's cluster the annotator has done). With this score the queue serves every cluster's most
    informative case, most informative first, before any cluster's second, and so on: a round-robin over the
    clusters, in the one field Label Studio's bulk import keeps. A later push's first-rank cases go before this
    push's second-rank ones, so the queue stays ordered while it fills.
    """
    members: dict[int, list[SelectedCase]] = {}
    for c in cases:
        members.setdefault(clusters[c.case_id], []).append(c)
    out: dict[str, float] = {}
    for group in members.values():
        for rank, c in enumerate(sorted(group, key=lambda c: (c.score, c.case_id))):
            own = min(round(max(float(c.score), 0.0), 6), MAX_FRACTION)
            out[c.case_id] = round((min(rank, RANKS - 1) + own) / RANKS, 10)
    return out


def push_gold(bridge: BridgeContext, items: Sequence[tuple[SelectedCase, int | Detection]]) -> int:
    """Gold tasks: cases whose answer is known (a class index, or the true boxes of a detect case), queued like
    any other task (annotators cannot tell).

    The known answer stays in the bridge's ledger, never in the task, where annotators could read it.
    An answer that matches it (boxes: box F1 at the hub's bar) is posted with status ``gold``; one that does
    not is held; both score the annotator (:func:`fleet.consensus.score_annotators`).
    """
    gold: dict[str, int | Detection] = {}
    for c, label in items:
        if isinstance(label, Detection):
            try:
                label.validate()
                label.check_classes(len(c.class_names), f"gold boxes of case {c.case_id}")
            except ProtocolError as exc:
                raise InvalidInput(str(exc)) from None
            if c.case.task != "detect":
                raise InvalidInput(f"gold boxes given for case {c.case_id}, a {c.case.task!r} case")
            gold[c.case_id] = label.as_label()
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(c.class_names):
            gold[c.case_id] = int(label)
        else:
            raise InvalidInput(f"gold label {label!r} of case {c.case_id} is neither a class index of "
                               f"{list(c.class_names)} nor a Detection")
    return push_cases(bridge, [c for c, _ in items], gold=gold)


def settle(bridge: BridgeContext) -> None:
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
            try:
                task_ids = bridge.studio.import_tasks(bridge.project_id, [t.task_json or {} for t in missing])
            except PermanentError as exc:
                _refused(bridge, [t.case_id for t in missing], exc)
            else:
                _bind(bridge, task_ids)
    ensure_queue_version(bridge)
    set_clusters(bridge, budget_s=bridge.config.cluster_budget_s)
    if bridge.ledger.get("selection_in_doubt"):
        adopt_orphans(bridge)


def set_clusters(bridge: BridgeContext, *, chunk: int = 100, budget_s: float | None = None) -> int:
    """Set the diversity cluster on pushed predictions that lack it, a chunk at a time (progress is kept if
    Label Studio goes away half way), for at most ``budget_s`` seconds (None: all of them); return how many
    are left for a later turn. Label Studio's bulk import drops ``cluster`` and only its one-prediction
    endpoint sets it, so this is the slow part; tasks are already in the queue, in round-robin order over
    the clusters (:func:`queue_scores`), while it runs. A cluster Label Studio refuses is reported, not retried."""
    pending = [t for t in bridge.ledger.tasks("open", "done")
               if not t.cluster_set and t.prediction_id is not None and t.cluster is not None]
    started = time.perf_counter()
    for start in range(0, len(pending), chunk):
        if budget_s is not None and time.perf_counter() - started >= budget_s:
            log.info("clusters: %d of %d set this turn; the rest next turn", start, len(pending))
            return len(pending) - start
        part = pending[start:start + chunk]
        refused = bridge.studio.set_clusters([(int(t.prediction_id or 0), int(t.cluster or 0)) for t in part])
        if refused:
            pid, why = next(iter(refused.items()))
            bridge.problem(f"Label Studio refused the cluster of {len(refused)} prediction(s) (first: {pid}: {why}); "
                           f"those tasks stay queued by score alone")
        bridge.ledger.set_cluster_done([t.case_id for t in part])
    return 0


def ensure_queue_version(bridge: BridgeContext) -> bool:
    """Keep the project's queue on the bridge's queue version; True when it is.

    A project made before the queue version existed (or changed by hand) points at another version, and
    Label Studio then serves the bridge's tasks at random, without their pre-annotations. Open tasks
    whose prediction has another version get a copy under the queue version (one bulk request), and
    only then is the project pointed at it (Label Studio refuses a version no prediction carries). A
    refusal is reported and tried again next turn; it never stops tasks being imported.
    """
    queue = bridge.config.queue_version
    if not (bridge.ledger.get("class_names") or bridge.config.class_names):
        return False  # no project yet: it is created with the queue version
    project = bridge.project()
    if project.model_version == queue:
        return True
    stale = [t for t in bridge.ledger.tasks("open") if t.task_id is not None and t.task_json
             and _prediction_version(t.task_json) != queue]
    try:
        if stale:
            carried = [{**(t.task_json or {})["predictions"][0], "task": t.task_id, "model_version": queue}
                       for t in stale]
            created = bridge.studio.import_predictions(project.id, carried)
            if created < len(carried):  # Label Studio drops a prediction it finds invalid and says only how many
                bridge.problem(f"Label Studio created {created} of the {len(carried)} predictions carried to queue "
                               f"version {queue!r} (it drops one it finds invalid, such as a score outside "
                               f"[0, 1]); the others' tasks are served without a pre-annotation")
            for t in stale:
                bridge.ledger.set_task(t.case_id, task_json={**(t.task_json or {}), "predictions": [
                    {**(t.task_json or {})["predictions"][0], "model_version": queue}]})
            _bind(bridge, [int(t.task_id or 0) for t in stale], rebind=True)
        if stale or any(t.task_id is not None for t in bridge.ledger.tasks("open", "done")):
            bridge.studio.set_queue_version(project.id, queue)
        else:
            return False  # nothing carries the version yet: the first import will
    except PermanentError as exc:
        bridge.problem(f"Label Studio refused to point project {project.id}'s queue at {queue!r} "
                       f"(it stays on {project.model_version!r}; tasks are still imported): {exc}")
        return False
    log.info("project %d: queue version %r -> %r (%d open tasks carried)", project.id, project.model_version,
             queue, len(stale))
    bridge.refresh_project()
    return True


def adopt_orphans(bridge: BridgeContext) -> int:
    """Push the hub's queued cases that have no task here (a selection whose answer was lost)."""
    cases = bridge.hub.iter_pool("queued")
    orphans = [c for c in cases if not _live(bridge, c.case_id)]
    pushed = 0
    if orphans:
        log.info("adopting %d queued cases without a task", len(orphans))
        pushed = push_cases(bridge, orphans)
    bridge.ledger.put("selection_in_doubt", False)
    return pushed


def refresh_images(bridge: BridgeContext, *, limit: int = 100) -> int:
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
        except NotFound:
            continue
        url = fresh.image_url
        if url == t.image_url:
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


def _live(bridge: BridgeContext, case_id: str) -> bool:
    t = bridge.ledger.task(case_id=case_id)
    return t is not None and t.state in ("open", "done", "importing")


def _bind(bridge: BridgeContext, task_ids: Sequence[int], *, rebind: bool = False) -> None:
    """Record the tasks an import created with their queue prediction (whose cluster is set afterwards by
    :func:`set_clusters`); ``rebind`` after a new queue prediction was added to existing tasks."""
    queue = bridge.config.queue_version
    done: list[str] = []
    fresh: list[str] = []
    for task in bridge.studio.iter_tasks(bridge.project_id, ids=list(task_ids)):
        if task.case_id is None:
            continue
        row = bridge.ledger.task(case_id=task.case_id)
        pred = next((p for p in task.predictions if p.model_version == queue),
                    task.predictions[0] if task.predictions else None)
        bridge.ledger.bind(task.case_id, task.id, prediction_id=pred.id if pred else None, overlap=task.overlap,
                           project_id=bridge.project_id, state=row.state if rebind and row else "open")
        if pred is None or row is None or row.cluster is None or pred.cluster == row.cluster:
            done.append(task.case_id)
        else:
            fresh.append(task.case_id)
    bridge.ledger.set_cluster_done(done)
    if rebind:
        bridge.ledger.set_cluster_done(fresh, done=False)


def _refused(bridge: BridgeContext, case_ids: list[str], exc: FlywheelError) -> None:
    """Label Studio refused an import (a 4xx): the cases get no task, so they go back to the hub's pool."""
    bridge.ledger.discard_importing(case_ids)
    released = 0
    for cid in case_ids:
        try:
            bridge.hub.release(cid)
            released += 1
        except (NotFound, Conflict) as err:
            log.warning("case %s could not be released: %s", cid, err)
    bridge.problem(f"Label Studio refused {len(case_ids)} task(s) ({released} returned to the hub's pool): {exc}")


def _global_clusters(bridge: BridgeContext, cases: Sequence[SelectedCase]) -> dict[str, int]:
    """The hub numbers clusters within one selection; Label Studio balances the queue over cluster ids
    across the whole project. Offsetting each push by the clusters used so far keeps two selections'
    clusters apart (otherwise cluster 2 of today's selection would count as solved because cluster 2 of
    yesterday's was)."""
    base = int(bridge.ledger.get("cluster_base") or 0)
    out = {c.case_id: base + c.cluster for c in cases}
    bridge.ledger.put("cluster_base", base + max(c.cluster for c in cases) + 1)
    return out


def _gold_fields(value: int | Detection | None) -> dict[str, Any]:
    """A gold answer as the ledger's task columns: a class in ``gold_label``, boxes in ``gold_answer``."""
    if isinstance(value, Detection):
        return {"gold_label": None, "gold_answer": value.to_dict()}
    return {"gold_label": value, "gold_answer": None}


def _predicted_text(case: SelectedCase) -> str:
    """What the model predicted, for the data manager's column: the class, or the boxes' classes with counts."""
    prediction = case.case.prediction
    if isinstance(prediction, Detection):
        counts = Counter(case.class_names[b.label] for b in prediction.boxes)
        return ", ".join(f"{n} x{k}" for n, k in sorted(counts.items())) or "no boxes"
    return case.predicted_name


def _prediction_version(task: dict[str, Any]) -> str | None:
    preds = task.get("predictions") or []
    return str(preds[0].get("model_version")) if preds and isinstance(preds[0], dict) else None


def _expiry(url: str | None) -> float | None:
    if not url:
        return None
    values = parse_qs(urlparse(url).query).get("exp")
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None
