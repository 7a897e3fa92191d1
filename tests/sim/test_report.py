"""The demo's report: a table, results.json, PNG plots and an HTML page that links them."""

from __future__ import annotations

import json
from pathlib import Path

from fleet.sim.report import ArmResult, TurnResult, render_conditions, render_table, write_report


def _turns() -> list[TurnResult]:
    return [
        TurnResult(0, ArmResult(0.5, {"clear": 0.9, "fog": 0.1}, 0), ArmResult(0.5, {"clear": 0.9, "fog": 0.1}, 0)),
        TurnResult(1, ArmResult(0.7, {"clear": 0.9, "fog": 0.5}, 40), ArmResult(0.55, {"clear": 0.92, "fog": 0.2}, 40),
                   frames_seen=1200, uploads=200, model_errors=100, errors_captured=70, seconds=20.0),
    ]


def test_report_files(tmp_path: Path) -> None:
    html = write_report(_turns(), tmp_path, title="t", settings={"seed": 0}, labeler="oracle")
    text = html.read_text()
    for png in ("accuracy_vs_labels.png", "per_condition.png", "error_capture.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["turns"][1]["error_capture"] == 0.7 and data["labeler"] == "oracle"


def test_tables_render() -> None:
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(render_table(_turns(), labeler="oracle"))
    console.print(render_conditions(_turns()[-1]))
    out = console.export_text()
    assert "fog 0.50 / 0.20" in out and "70%" in out and "0.700" in out


def test_short_turns_are_marked_in_the_table_and_the_report(tmp_path: Path) -> None:
    from rich.console import Console

    turns = _turns()
    turns[1].spent, turns[1].budget = 12, 40
    turns[1].short, turns[1].short_fault = "labeled 12 of 40 (the hub selected 40): Label Studio refused 28", True
    console = Console(record=True, width=160)
    console.print(render_table(turns, labeler="studio"))
    assert "short 12/40" in console.export_text()
    html = write_report(turns, tmp_path, title="t", settings={}, labeler="studio", error="turn 1: could not spend")
    text = html.read_text()
    assert "(short, fault: 12/40)" in text and "Label Studio refused 28" in text
    assert "stopped early" in text and "turn 1: could not spend" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["error"] == "turn 1: could not spend" and data["turns"][1]["short_fault"] is True


def test_a_report_with_no_turns_is_still_written(tmp_path: Path) -> None:
    html = write_report([], tmp_path, title="t", settings={}, labeler="oracle", error="the base model failed")
    assert "the base model failed" in html.read_text()
