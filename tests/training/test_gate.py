"""The promotion gate: overall tolerance, per-slice tolerances, regression sets, absolute floor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.errors import InvalidInput
from training.gate import GateConfig, decide, metrics_from_report, parse_slice_tolerances


def m(acc: float, n: int = 100, **slices: tuple[float, int]) -> dict[str, Any]:
    return {"accuracy": acc, "n": n,
            "per_slice": {k.replace("_", "="): {"accuracy": a, "n": sn} for k, (a, sn) in slices.items()}}


def test_improvement_passes() -> None:
    d = decide({"test": m(0.92, condition_night=(0.8, 30))}, {"test": m(0.90, condition_night=(0.7, 30))},
               GateConfig(), baseline_name="v1")
    assert d.passed and "v1" in d.reasons[0]
    assert [c.name for c in d.checks] == ["test", "test/condition=night"]


def test_overall_drop_within_tolerance_holds_beyond_fails() -> None:
    base = {"test": m(0.90)}
    assert decide({"test": m(0.895)}, base, GateConfig(tolerance=0.01)).passed
    d = decide({"test": m(0.87)}, base, GateConfig(tolerance=0.01))
    assert not d.passed
    assert "test: accuracy 0.8700 fell below the baseline 0.9000 by 0.0300 (tolerance 0.0100" in d.reasons[0]


def test_a_regressing_slice_fails_even_when_overall_improves() -> None:
    cand = {"test": m(0.95, condition_night=(0.60, 40), condition_day=(0.99, 60))}
    base = {"test": m(0.90, condition_night=(0.75, 40), condition_day=(0.95, 60))}
    d = decide(cand, base, GateConfig(slice_tolerance=0.05))
    assert not d.passed and len(d.reasons) == 1 and d.reasons[0].startswith("test/condition=night")
    # a slice-specific tolerance can allow it
    assert decide(cand, base, GateConfig(slice_tolerances={"condition=night": 0.2})).passed


def test_small_slices_are_reported_not_gated() -> None:
    cand = {"test": m(0.95, condition_fog=(0.0, 3))}
    base = {"test": m(0.90, condition_fog=(1.0, 3))}
    assert decide(cand, base, GateConfig(min_slice_size=10)).passed


def test_regression_set_counts_as_a_slice() -> None:
    cand = {"test": m(0.95), "regression": m(0.50, n=50)}
    base = {"test": m(0.90), "regression": m(0.70, n=50)}
    d = decide(cand, base, GateConfig(slice_tolerance=0.1))
    assert not d.passed and d.reasons[0].startswith("regression:")
    assert decide(cand, base, GateConfig(slice_tolerances={"regression": 0.25})).passed


def test_no_baseline_uses_the_absolute_floor() -> None:
    assert decide({"test": m(0.5)}, None, GateConfig()).passed
    d = decide({"test": m(0.5)}, None, GateConfig(min_accuracy=0.8))
    assert not d.passed and "below the required minimum 0.8000" in d.reasons[0]


def test_parse_slice_tolerances() -> None:
    assert parse_slice_tolerances(["0.03", "condition=night:0.1", "regression:0"]) == (
        0.03, {"condition=night": 0.1, "regression": 0.0})
    with pytest.raises(InvalidInput, match="received 'night:lots'"):
        parse_slice_tolerances(["night:lots"])


def test_metrics_from_report(tmp_path: Path) -> None:
    p = tmp_path / "report.json"
    p.write_text(json.dumps({"version": "v3", "metrics": {"test": m(0.9)}}))
    metrics, name = metrics_from_report(p)
    assert metrics["test"]["accuracy"] == 0.9 and "v3" in name
    p.write_text("{}")
    with pytest.raises(InvalidInput, match="not a run report"):
        metrics_from_report(p)
