"""The promotion gate: a candidate ships only if it keeps what the current model could do.

Rules, checked on every evaluation set both models were measured on:

* overall accuracy of the ``test`` set: candidate >= baseline - ``tolerance``;
* every other set's overall accuracy (e.g. ``regression``, past edge cases) and every slice with at
  least ``min_slice_size`` images: candidate >= baseline - that slice's tolerance (``slice_tolerances``
  by slice name, e.g. ``condition=night``, or ``regression``; else ``slice_tolerance``);
* with ``min_accuracy`` set, the test accuracy must also reach it, baseline or not.

Without a baseline only the absolute check applies. The decision lists every check and, when it
fails, a reason per failed check that names the numbers.

The metrics checked are the task's: ``accuracy`` for classifiers; ``map`` (mAP@[.5:.95]) and ``map_50``
(mAP@.5) for detectors, each held within the same tolerance, the first one also against ``min_accuracy``.
A metric that is undefined (NaN: a slice without any true box) on either side is not checked.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet.errors import InvalidInput

PRIMARY = "test"
METRIC_NAMES = {"accuracy": "accuracy", "map": "mAP@[.5:.95]", "map_50": "mAP@.5"}


@dataclass(frozen=True)
class GateConfig:
    tolerance: float = 0.0
    slice_tolerance: float = 0.02
    slice_tolerances: dict[str, float] = field(default_factory=dict)
    min_slice_size: int = 10
    min_accuracy: float = 0.0

    def tolerance_for(self, set_name: str, slice_name: str | None) -> float:
        for key in ([f"{set_name}/{slice_name}", slice_name] if slice_name else [set_name]):
            if key in self.slice_tolerances:
                return self.slice_tolerances[key]
        return self.slice_tolerance


@dataclass
class Check:
    name: str
    candidate: float
    baseline: float | None
    tolerance: float
    n: int
    passed: bool
    metric: str = "accuracy"


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    checks: list[Check]
    baseline: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    candidate: dict[str, dict[str, Any]],
    baseline: dict[str, dict[str, Any]] | None,
    config: GateConfig,
    *,
    baseline_name: str | None = None,
    metrics: tuple[str, ...] = ("accuracy",),
) -> GateDecision:
    """candidate/baseline: {set name: metrics from training.evaluate.accuracy_metrics (``accuracy``) or
    training.detect.evaluate.detection_metrics (``map``, ``map_50``)}; ``metrics``: which to check."""
    checks: list[Check] = []
    reasons: list[str] = []

    def check(name: str, metric: str, cand: float | None, base: float | None, tol: float, n: int) -> None:
        if not _defined(cand) or not _defined(base):
            return
        assert cand is not None and base is not None
        ok = cand >= base - tol - 1e-12
        checks.append(Check(name, round(cand, 6), round(base, 6), tol, n, ok, metric))
        if not ok:
            reasons.append(
                f"{name}: {METRIC_NAMES.get(metric, metric)} {cand:.4f} fell below the baseline {base:.4f} by "
                f"{base - cand:.4f} (tolerance {tol:.4f}, n={n})"
            )

    test = candidate.get(PRIMARY)
    primary = metrics[0]
    if config.min_accuracy > 0:
        value = test.get(primary) if test else None
        value = float(value) if _defined(value) else float("nan")
        ok = test is not None and value >= config.min_accuracy
        checks.append(Check(f"{PRIMARY} minimum", round(value, 6), None, config.min_accuracy,
                            test["n"] if test else 0, ok, primary))
        if not ok:
            reasons.append(f"{PRIMARY}: {METRIC_NAMES.get(primary, primary)} {value:.4f} is below the required "
                           f"minimum {config.min_accuracy:.4f}")
    for set_name, cand in candidate.items():
        base = (baseline or {}).get(set_name)
        if base is None:
            continue
        tol = config.tolerance if set_name == PRIMARY else config.tolerance_for(set_name, None)
        for metric in metrics:
            check(set_name, metric, cand.get(metric), base.get(metric), tol, cand["n"])
        for slice_name, sm in cand.get("per_slice", {}).items():
            bm = base.get("per_slice", {}).get(slice_name)
            if bm is None or sm["n"] < config.min_slice_size:
                continue
            for metric in metrics:
                check(f"{set_name}/{slice_name}", metric, sm.get(metric), bm.get(metric),
                      config.tolerance_for(set_name, slice_name), sm["n"])
    passed = not reasons
    if baseline is None:
        note = "no baseline to compare against; judged on absolute checks only"
        reasons = reasons or [note]
    elif passed:
        reasons = [f"held or improved on all {len(checks)} checks against {baseline_name or 'the baseline'}"]
    return GateDecision(passed=passed, reasons=reasons, checks=checks, baseline=baseline_name)


def _defined(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def parse_slice_tolerances(values: list[str]) -> tuple[float | None, dict[str, float]]:
    """``["0.02", "condition=night:0.05", "regression:0.01"]`` -> (0.02, {...}); the bare number is the default."""
    default: float | None = None
    named: dict[str, float] = {}
    for v in values:
        name, sep, num = v.rpartition(":")
        try:
            tol = float(num)
        except ValueError:
            raise InvalidInput(f"--slice-tolerance must be NUMBER or SLICE:NUMBER; received {v!r}") from None
        if not (math.isfinite(tol) and tol >= 0):
            raise InvalidInput(f"--slice-tolerance must be a finite number >= 0; received {v!r}")
        if sep:
            named[name] = tol
        else:
            default = tol
    return default, named


def metrics_from_report(path: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """The candidate metrics a previous run's report.json recorded, to gate against."""
    try:
        report = json.loads(Path(path).read_text())
        metrics = report["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"--gate-against {path}: not a run report with 'metrics' ({exc})") from exc
    return metrics, f"report {path} (version {report.get('version')})"
