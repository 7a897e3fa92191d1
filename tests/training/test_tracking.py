"""``flywheel train --tracking-uri``: a turn's record in a real local MLflow store, read back with MLflow's client."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.protocol import SignedManifest
from training.tracking import flatten_metrics, gate_metrics

mlflow = pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")
from mlflow.tracking import MlflowClient  # noqa: E402


def flywheel(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def only_run(uri: str, experiment: str = "flywheel") -> Any:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def check_artifacts(client: MlflowClient, run_id: str, out: Path, tmp_path: Path) -> dict[str, Any]:
    """model.onnx, manifest.json and report.json are in the run, byte for byte what the turn wrote; the model is the
    one the signed manifest names. Returns the report."""
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"model.onnx", "manifest.json", "report.json"}, names
    got = Path(client.download_artifacts(run_id, "", str(tmp_path / "downloaded")))
    manifest = SignedManifest.from_json((got / "manifest.json").read_text()).manifest
    assert hashlib.sha256((got / "model.onnx").read_bytes()).hexdigest() == manifest.onnx_sha256
    for name in names:
        assert (got / name).read_bytes() == (out / name).read_bytes(), name
    report: dict[str, Any] = json.loads((got / "report.json").read_text())
    return report


def test_a_classifier_turn_is_logged_to_mlflow(digits_npz: Path, tmp_path: Path,
                                               signing_key: tuple[Path, str]) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    out = tmp_path / "run"
    baseline = {"version": "track-0", "metrics": {"test": {
        "accuracy": 0.1, "n": 397, "per_slice": {"condition=night": {"accuracy": 0.1, "n": 133}}}}}
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    code, text = flywheel("train", "--data", f"npz:{digits_npz}", "--out", str(out), "--epochs", "2", "--width", "8",
                          "--threads", "1", "--seed", "3", "--version", "track-1", "--parent", "track-0",
                          "--sign-key", str(signing_key[0]), "--eval-each-epoch", "--no-progress",
                          "--gate-against", str(tmp_path / "baseline.json"), "--min-accuracy", "0.2",
                          "--tracking-uri", uri)
    assert code == 0, text
    run = only_run(uri)
    client = MlflowClient(tracking_uri=uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "track-1"
    params = run.data.params
    assert {k: params[k] for k in ("task", "model", "width", "epochs", "seed", "version", "parent")} == {
        "task": "classify", "model": "smallcnn", "width": "8", "epochs": "2", "seed": "3", "version": "track-1",
        "parent": "track-0"}
    assert params["data"] == f"npz:{digits_npz}" and float(params["lr"]) > 0 and len(params["data_fingerprint"]) == 64
    assert "token" not in params and "sign_key" not in params
    tags = run.data.tags
    assert tags["flywheel.version"] == "track-1" and tags["flywheel.task"] == "classify"
    assert tags["flywheel.parent"] == "track-0" and tags["flywheel.status"] == "ready"
    assert tags["flywheel.gate"] == "passed"

    report = json.loads((out / "report.json").read_text())
    history = report["training"]["history"]
    for key in ("loss", "images_per_s", "train_accuracy", "lr", "test_accuracy"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [0, 1], key
        assert [m.value for m in logged] == pytest.approx([h[key] for h in history]), key

    metrics = run.data.metrics
    assert metrics["eval/test/accuracy"] == pytest.approx(report["metrics"]["test"]["accuracy"])
    assert metrics["eval/test/per_slice/condition_night/accuracy"] == pytest.approx(
        report["metrics"]["test"]["per_slice"]["condition=night"]["accuracy"])
    assert metrics["gate/passed"] == 1.0 and metrics["time/train"] > 0
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    assert set(checks) == {"test minimum", "test", "test/condition=night"}, checks
    assert metrics["gate/test minimum/accuracy/margin"] == pytest.approx(checks["test minimum"]["candidate"] - 0.2)
    assert metrics["gate/test/accuracy/baseline"] == 0.1
    assert metrics["gate/test/condition_night/accuracy/candidate"] == pytest.approx(
        checks["test/condition=night"]["candidate"])
    assert check_artifacts(client, run.info.run_id, out, tmp_path)["version"] == "track-1"
    # the artifacts sit beside the database, not in the working directory
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())


def test_a_detector_turn_is_logged_to_mlflow(scenes_npz: Path, tmp_path: Path, signing_key: tuple[Path, str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "det"
    code, text = flywheel("train", "--task", "detect", "--data", f"npz:{scenes_npz}", "--out", str(out),
                          "--epochs", "2", "--width", "8", "--batch-size", "8", "--threads", "1",
                          "--version", "dtrack-1", "--sign-key", str(signing_key[0]), "--no-progress",
                          "--tracking-uri", uri, "--experiment", "detectors")
    assert code == 0, text
    run = only_run(uri, "detectors")
    client = MlflowClient(tracking_uri=uri)
    assert run.data.params["task"] == "detect" and run.data.params["model"] == "fcos_tiny"
    assert run.data.tags["flywheel.task"] == "detect" and run.data.tags["flywheel.version"] == "dtrack-1"
    report = json.loads((out / "report.json").read_text())
    terms = report["training"]["history"][0]["losses"]
    for key in ("loss", "images_per_s", *(f"losses/{t}" for t in terms)):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    metrics = run.data.metrics
    assert metrics["eval/test/map_50"] == pytest.approx(report["metrics"]["test"]["map_50"])
    assert metrics["gate/passed"] == (1.0 if report["gate"]["passed"] else 0.0)
    check_artifacts(client, run.info.run_id, out, tmp_path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["not a folder", "unknown scheme", "no server", "file store", "deleted experiment"])
def test_a_bad_tracking_uri_fails_before_anything_trains(kind: str, digits_npz: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "a-file").write_text("not a folder")
    uri = {"not a folder": f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}", "unknown scheme": "bogus://x",
           "no server": f"http://127.0.0.1:{_closed_port()}", "file store": f"file:{tmp_path / 'mlruns'}",
           "deleted experiment": f"sqlite:///{tmp_path / 'mlflow.db'}"}[kind]
    if kind == "deleted experiment":
        client = MlflowClient(tracking_uri=uri)
        client.delete_experiment(client.create_experiment("flywheel"))
    out = tmp_path / "run"
    code, text = flywheel("train", "--data", f"npz:{digits_npz}", "--out", str(out), "--epochs", "1", "--width", "8",
                          "--threads", "1", "--no-progress", "--tracking-uri", uri)
    assert code == 1, text
    expected = "is deleted; restore it or pass another --experiment" if kind == "deleted experiment" else \
        f"Error: --tracking-uri {uri!r} cannot be used"
    assert expected in " ".join(text.split()), text
    if kind == "file store":  # MLflow's own reason names the way out
        assert "MLFLOW_ALLOW_FILE_STORE" in text
    assert not (out / "checkpoint.pt").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "data" not in report and "training" not in report


def test_a_store_failing_mid_run_leaves_the_result_standing(make_args: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from training.train import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    calls: list[int] = []
    original = MlflowClient.log_batch

    def gone_after_the_parameters(self: MlflowClient, run_id: str, metrics: Any = (), **kw: Any) -> None:
        if metrics:
            calls.append(1)
            raise ConnectionError("the tracking server went away")
        original(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", gone_after_the_parameters)
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        report = main(make_args(tracking_uri=uri, epochs=2))
    assert report["status"] == "ready" and (tmp_path / "run" / "model.onnx").is_file()
    assert len(report["training"]["history"]) == 2
    assert calls == [1]  # tried once, then off
    warnings = [r.getMessage() for r in caplog.records if r.name == "training.tracking"]
    assert len(warnings) == 1 and "tracking is off for the rest of run" in warnings[0], warnings
    run = only_run(uri)
    assert run.data.params["epochs"] == "2" and not run.data.metrics


def test_metric_names_follow_mlflows_alphabet() -> None:
    tree = {"test": {"accuracy": 0.5, "n": 10, "per_slice": {"condition=night": {"accuracy": float("nan")}},
                     "confusion": [[1, 2]], "name": "x", "ok": True}}
    assert flatten_metrics(tree, "eval") == {"eval/test/accuracy": 0.5, "eval/test/n": 10.0}
    gate = {"passed": False, "checks": [{"name": "test/condition=night", "metric": "accuracy", "candidate": 0.7,
                                         "baseline": 0.8, "tolerance": 0.05, "n": 20, "passed": False}]}
    got = gate_metrics(gate)
    assert got["gate/passed"] == 0.0 and got["gate/test/condition_night/accuracy/baseline"] == 0.8
    assert got["gate/test/condition_night/accuracy/margin"] == pytest.approx(-0.05)
