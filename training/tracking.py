"""Experiment tracking: a turn's parameters, per-epoch metrics, gate report and exported model, logged to MLflow.

``flywheel train --tracking-uri URI [--experiment NAME]`` opens a :class:`Tracker` before the turn starts;
:func:`track_params`, :func:`track_epoch` and :func:`track_turn` say what a turn logs, whatever the task (the
classifier's and the detector's loops share them through :class:`training.loop.LoopCore`). Only the main rank
tracks; the others get a :class:`NullTracker`.

The rule: **tracking never costs a training result.** :func:`open_tracker` reaches the store, creates the
experiment and the run before any data is loaded, and raises :class:`TrackingError` for a bad URI or an
unreachable store, so a mistake costs seconds, not an hour of training. After that, a call that fails (the
server went away, the disk filled) logs one warning, switches tracking off for the rest of the run, and the turn
goes on: its checkpoint, report and model stand as if tracking had never been asked for.

MLflow is the optional ``tracking`` extra (``mlflow-skinny`` with SQLAlchemy/Alembic for a ``sqlite:///`` store),
imported only when a URI is given. MLflow 3 refuses its old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``;
a ``sqlite:///PATH/mlflow.db`` store keeps its artifacts beside the database, in ``PATH/mlartifacts``. How long
the check waits for an unreachable server is MLflow's (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._TIMEOUT``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fleet.errors import MissingExtra
from training.errors import TrackingError

if TYPE_CHECKING:
    from training.config import TrainArgs

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "flywheel"
# The arguments that describe a model (never the token, the signing key or the hub URL).
PARAMS = ("task", "data", "base", "replay_ratio", "new_repeats", "snapshot", "holdout", "model", "width", "epochs",
          "batch_size", "lr", "optimizer", "weight_decay", "label_smoothing", "seed", "balance", "augment",
          "warm_start", "init_weights", "version", "parent", "int8", "tolerance", "slice_tolerance", "min_accuracy")
REPORT_ARTIFACT = "report.json"
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]")  # what MLflow accepts in a metric name on every platform
_BATCH = 500  # metrics per request (MLflow takes at most 1000)


class Tracker(Protocol):
    """Where a turn's record goes. Each method may fail only as documented in the module: never after start."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def end(self, status: str) -> None:
        """Close the run: ``FINISHED``, ``FAILED`` or ``KILLED``; a second call does nothing."""


class NullTracker:
    """The default: tracking not asked for (or not this rank's job)."""

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def end(self, status: str) -> None:
        pass


class MlflowTracker:
    """One MLflow run (``client``: an ``MlflowClient``). A failing call warns once and turns tracking off."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri
        self.broken = False
        self.ended = False

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._call("log parameters", self.client.log_batch, params=[Param(k, v) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [Metric(k, v, ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(rows), _BATCH):
            self._call("log metrics", self.client.log_batch, metrics=rows[i: i + _BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", self.client.log_batch, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_artifact(self, path: Path) -> None:
        self._call(f"upload {path.name}", self.client.log_artifact, str(path))

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = True
        self._call("close the run", self.client.set_terminated, status=status)

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> None:
        """``method(run_id, *args, **kwargs)`` unless tracking is already off."""
        if self.broken:
            return
        try:
            method(self.run_id, *args, **kwargs)
        except Exception as exc:  # the rule of the module: tracking never costs the training result
            self.broken = True
            log.warning("experiment tracking at %s failed to %s (%s: %s); tracking is off for the rest of run %s, "
                        "the turn goes on", self.uri, what, type(exc).__name__, exc, self.run_id)


def open_tracker(uri: str | None, experiment: str = DEFAULT_EXPERIMENT) -> Tracker:
    """A :class:`NullTracker` without ``uri``; else an MLflow run in ``experiment`` (created if missing), opened now.

    Raises :class:`TrackingError` naming the URI and MLflow's own reason when the store cannot be used, and
    :class:`fleet.errors.MissingExtra` without MLflow.
    """
    if not uri:
        return NullTracker()
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise MissingExtra("--tracking-uri needs MLflow, which is not installed; install it with: "
                           "pip install 'edge-flywheel[tracking]'") from exc
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {experiment!r} at {uri} is deleted; restore it or pass another "
                                "--experiment")
        exp_id = found.experiment_id if found is not None else client.create_experiment(
            experiment, artifact_location=_artifact_location(uri))
        run = client.create_run(exp_id, tags={"flywheel.status": "running"})
    except TrackingError:
        raise
    except Exception as exc:
        reason = str(exc).strip()[:500].rstrip(".")
        raise TrackingError(
            f"--tracking-uri {uri!r} cannot be used: {type(exc).__name__}: {reason}. Expected a reachable MLflow "
            "store, e.g. sqlite:///PATH/mlflow.db or http://HOST:5000; nothing was trained"
        ) from exc
    log.info("tracking to %s: experiment %r, run %s", uri, experiment, run.info.run_id)
    return MlflowTracker(client, run.info.run_id, uri)


def track_params(tracker: Tracker, args: TrainArgs, report: dict[str, Any]) -> None:
    """The arguments that describe the model (:data:`PARAMS`, the parent settled), the data's fingerprint, and the
    tags: run name and ``flywheel.version`` (the model version), ``flywheel.task``, ``flywheel.parent``."""
    settled = {**args.to_dict(), "parent": report.get("parent_version")}
    params = {k: str(settled[k]) for k in PARAMS if settled.get(k) is not None}
    fingerprint = (report.get("data") or {}).get("fingerprint")
    if fingerprint:
        params["data_fingerprint"] = str(fingerprint)
    tracker.log_params(params)
    tags = {"mlflow.runName": str(args.version), "flywheel.version": str(args.version), "flywheel.task": args.task}
    if settled["parent"]:
        tags["flywheel.parent"] = str(settled["parent"])
    tracker.set_tags(tags)


def track_epoch(tracker: Tracker, stats: dict[str, Any]) -> None:
    """One epoch of the loop's history (``loss``, ``images_per_s``, ``lr``, ``test_accuracy`` ...; nested terms
    such as the detector's ``losses`` as ``losses/NAME``) at step ``stats["epoch"]``."""
    metrics = flatten_metrics({k: v for k, v in stats.items() if k != "epoch"})
    tracker.log_metrics(metrics, step=int(stats["epoch"]))


def track_turn(tracker: Tracker, report: dict[str, Any], out: Path) -> None:
    """The end of a turn: its evaluation (``eval/SET/...``), gate (``gate/passed``, ``gate/CHECK/METRIC/candidate``,
    ``.../baseline``, ``.../margin``) and timings (``time/PHASE``) as metrics, the status as tags, and as
    artifacts ``report.json`` and the exported model with its manifest."""
    metrics = flatten_metrics(report.get("metrics") or {}, "eval")
    gate = report.get("gate")
    if gate:
        metrics.update(gate_metrics(gate))
    metrics.update(flatten_metrics(report.get("timings") or {}, "time"))
    tracker.log_metrics(metrics)
    tags = {"flywheel.status": str(report.get("status"))}
    if gate:
        tags["flywheel.gate"] = "passed" if gate["passed"] else "rejected"
    tracker.set_tags(tags)
    export = report.get("export") or {}
    for key in ("onnx_path", "manifest_path"):
        if export.get(key) and Path(export[key]).is_file():
            tracker.log_artifact(Path(export[key]))
    if (out / REPORT_ARTIFACT).is_file():
        tracker.log_artifact(out / REPORT_ARTIFACT)


def gate_metrics(gate: dict[str, Any]) -> dict[str, float]:
    """``gate/passed`` (1 or 0) and, per check of :class:`training.gate.GateDecision`, the candidate, the baseline
    and the margin, which is >= 0 where the check holds: candidate - (baseline - tolerance), or for the absolute
    floor (a check without a baseline, whose tolerance is the floor) candidate - floor."""
    out = {"gate/passed": 1.0 if gate["passed"] else 0.0}
    for check in gate.get("checks", []):
        name = metric_name(f"gate/{check['name']}/{check.get('metric', 'accuracy')}")
        cand, base, tol = check.get("candidate"), check.get("baseline"), float(check["tolerance"])
        if not _finite(cand):
            continue
        out[f"{name}/candidate"] = float(cand)
        if _finite(base):
            out[f"{name}/baseline"] = float(base)
        out[f"{name}/margin"] = float(cand) - (float(base) - tol if _finite(base) else tol)
    return out


def flatten_metrics(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested dict, keyed by their path (``a/b/c``) in MLflow's metric alphabet (other
    characters become ``_``: ``condition=night`` -> ``condition_night``); lists, strings and None are left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = metric_name(f"{prefix}/{key}" if prefix else str(key))
        if isinstance(value, dict):
            out.update(flatten_metrics(value, name))
        elif _finite(value):
            out[name] = float(value)
    return out


def metric_name(text: str) -> str:
    return _BAD_NAME_CHARS.sub("_", text)[:250]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _artifact_location(uri: str) -> str | None:
    """A new experiment's artifact root for a ``sqlite:///`` store: ``mlartifacts`` beside the database (MLflow's
    default, ``./mlruns``, would follow the working directory). Other stores choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()
