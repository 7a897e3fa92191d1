"""Import boundaries of the labeling bridge (DESIGN.md §2), checked in a fresh interpreter, and its CLI."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from typer.testing import CliRunner

from tests.test_boundaries import loaded_modules

LABELING = Path(__file__).resolve().parents[2] / "labeling"
HEAVY = {"torch", "torchvision", "sqlmodel", "fastapi", "sqlalchemy", "onnxruntime"}


def test_only_the_studio_module_imports_the_label_studio_sdk() -> None:
    importers = sorted(p.name for p in LABELING.glob("*.py")
                       if re.search(r"^\s*(from|import)\s+label_studio_sdk", p.read_text(), re.M))
    assert importers == ["studio.py"]


def test_the_bridges_logic_loads_without_the_sdk_or_server_stacks() -> None:
    code = ("import fleet.consensus, labeling.configs, labeling.records, labeling.ledger, labeling.push, "
            "labeling.pull, labeling.bridge, labeling.hub_client, labeling.status")
    assert not loaded_modules(code) & (HEAVY | {"label_studio_sdk"})


def test_flywheel_label_help_is_light() -> None:
    code = ("from typer.testing import CliRunner\nfrom fleet.cli import app\n"
            "r = CliRunner().invoke(app, ['label', '--help'])\nassert r.exit_code == 0, r.output\n"
            "assert 'sync' in r.output and 'status' in r.output, r.output\n")
    assert not loaded_modules(code) & (HEAVY | {"label_studio_sdk"})


def test_status_reports_queue_throughput_and_agreement(tmp_path: Path) -> None:
    from labeling.cli import app
    from labeling.ledger import Ledger

    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, clock=lambda: time.time() - 5)
    ledger.put("class_names", ["cat", "dog"])
    ledger.bind("c1", 1, prediction_id=1, overlap=2, project_id=1)
    ledger.bind("c2", 2, prediction_id=2, overlap=1, project_id=1)
    ledger.upsert_annotation(annotation_id=5, task_id=1, case_id="c1", user_id=3, annotator="a@x", created_at=990.0,
                             updated_at=990.0, ground_truth=False, cancelled=False, label=1, refused=None)
    ledger.mark_sent(5, {"case_id": "c1", "label": {"task": "classify", "label": 1}, "annotation_id": 5})
    ledger.set_verdicts([(5, "held", 1.0, "waiting for 1 more annotator(s) of 2")])  # what the hub decided
    ledger.close()
    result = CliRunner().invoke(app, ["status", "--state", str(path), "--json", "--window", "600"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["queue"]["open_slots"] == 2  # one more answer on c1, one on c2
    assert info["queue"]["tasks"] == {"open": 2}
    assert info["agreement"]["statuses"] == {"held": 1}
    assert info["throughput"]["per_second"] > 0
    text = CliRunner().invoke(app, ["status", "--state", str(path)])
    assert text.exit_code == 0 and "queue" in text.output and "agreement" in text.output


def test_status_without_a_ledger_says_how_to_make_one(tmp_path: Path) -> None:
    from labeling.cli import app

    result = CliRunner().invoke(app, ["status", "--state", str(tmp_path / "none.sqlite")])
    assert result.exit_code == 2 and "flywheel label sync" in result.output


def test_sync_refuses_to_run_without_credentials() -> None:
    from labeling.cli import app

    result = CliRunner().invoke(app, ["sync"], env={"FLYWHEEL_LABELER_TOKEN": "", "FLYWHEEL_LS_TOKEN": ""})
    assert result.exit_code == 2 and "hub-token" in result.output
