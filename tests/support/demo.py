"""What the demo's end-to-end tests check in a finished demo's workspace."""

from __future__ import annotations

import json
from pathlib import Path


def assert_control_arm_did_not_wait(ws: Path, turns_run: int, *, side_by_side: bool) -> None:
    """Each turn's random-arm retrain was launched before the flywheel arm's (it does not wait for the flywheel's
    labels), each on one CPU thread (what a one-thread run computes does not depend on what runs beside it). The
    order is the demo's launch times: a trainer stamps its report's ``started_at`` only once torch is imported,
    which can take the control arm's trainer longer than the flywheel's when the oracle labels at once.
    ``side_by_side``: the flywheel's trainer was also launched before the random arm's finished (with the oracle,
    whose labels take a second; Label Studio's round can outlast a small test's whole random-arm retrain)."""
    turns = json.loads((ws / "report" / "results.json").read_text())["turns"]
    for turn in range(1, turns_run + 1):
        launched = turns[turn]["launched"]
        assert launched.keys() == {f"rnd-{turn}", f"fw-{turn}"}, (turn, launched)
        assert launched[f"rnd-{turn}"] < launched[f"fw-{turn}"], (turn, launched)
        fw, rnd = (json.loads((ws / "models" / f"{arm}-{turn}" / "report.json").read_text()) for arm in ("fw", "rnd"))
        if side_by_side:
            rnd_ended = rnd["started_at"] + rnd["timings"]["total"]
            assert launched[f"fw-{turn}"] < rnd_ended, (turn, launched, rnd["timings"])
        assert fw["training"]["threads"] == rnd["training"]["threads"] == 1
