"""``flywheel evaluate``: an exported model run as the fleet runs it (onnxruntime, the device's decoding) gives
the metrics the trainer measured on the torch model it came from, overall and per slice; bad input is refused
with what was received."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fleet.cli import app
from fleet.errors import InvalidInput
from fleet.protocol import ModelManifest
from training.evaluate_onnx import evaluate_exported


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["evaluate", *args])
    return result.exit_code, result.output


def test_an_exported_detector_scores_what_the_trainer_measured(trained_detector: Path) -> None:
    report = json.loads((trained_detector / "report.json").read_text())
    test = report["metrics"]["test"]
    data = f"npz:{trained_detector.parent / 'scenes96.npz'}"
    code, out = _run("--model", str(trained_detector / "model.onnx"), "--data", data, "--json")
    assert code == 0, out
    got = json.loads(out.strip().splitlines()[-1])
    assert got["task"] == "detect" and got["model_version"] == "det-parent" and got["n"] == test["n"] == 48
    assert got["map"] == pytest.approx(test["map"], abs=1e-6) and got["map_50"] == pytest.approx(test["map_50"],
                                                                                                  abs=1e-6)
    assert got["map"] > 0.05
    for key in ("condition=day", "condition=night"):
        assert got["per_slice"][key]["map"] == pytest.approx(test["per_slice"][key]["map"], abs=1e-6)
    code, text = _run("--model", str(trained_detector / "model.onnx"), "--data", data)
    assert code == 0 and f"map {test['map']:.4f} on 48 images" in text and "condition=night" in text


def test_an_exported_classifier_scores_its_test_accuracy(trained: Path, digits_npz: Path) -> None:
    report = json.loads((trained / "report.json").read_text())
    got = evaluate_exported(trained / "model.onnx", f"npz:{digits_npz}")
    assert got["task"] == "classify" and got["n"] == report["metrics"]["test"]["n"]
    assert got["accuracy"] == pytest.approx(report["metrics"]["test"]["accuracy"], abs=1e-9)
    assert got["accuracy"] > 0.5 and got["per_slice"]


def test_bad_input_is_refused_with_what_was_received(trained_detector: Path, tmp_path: Path) -> None:
    model = trained_detector / "model.onnx"
    data = f"npz:{trained_detector.parent / 'scenes96.npz'}"
    code, out = _run("--model", str(tmp_path / "none.onnx"), "--data", data)
    assert code == 1 and "is not a file" in out
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.onnx").write_bytes(model.read_bytes())
    code, out = _run("--model", str(lone / "model.onnx"), "--data", data)
    assert code == 1 and "no manifest at" in " ".join(out.split())
    (lone / "manifest.json").write_text('{"hello": 1}')
    code, out = _run("--model", str(lone / "model.onnx"), "--data", data)
    assert code == 1 and "is not a model manifest" in " ".join(out.split())
    with pytest.raises(InvalidInput, match=f"must be npz:PATH or coco:PATH; received folder:{tmp_path}"):
        evaluate_exported(model, f"folder:{tmp_path}")
    with pytest.raises(InvalidInput, match="--split must be test or train"):
        evaluate_exported(model, data, split="val")
    only_train = tmp_path / "train.npz"
    with np.load(trained_detector.parent / "scenes96.npz") as z:
        np.savez(only_train, **{k.removesuffix("_train"): z[k] for k in z.files if k.endswith("_train")},
                 class_names=z["class_names"])
    got = evaluate_exported(model, f"npz:{only_train}", split="train", max_images=16)
    assert got["n"] == 16
    with pytest.raises(InvalidInput, match="has no test split"):
        evaluate_exported(model, f"npz:{only_train}")


def test_detector_embeddings_are_centred_on_the_training_images(trained_detector: Path) -> None:
    """Pooled feature maps share a large common part; the export centres them on the training images' mean, so
    cosine distance tells scenes apart (the hub's dedup and diversity rely on it)."""
    from fleet.inference.runtime import ModelRuntime

    manifest = ModelManifest.from_dict(json.loads((trained_detector / "manifest.unsigned.json").read_text()))
    rt = ModelRuntime(trained_detector / "model.onnx", manifest, threads=1)
    ckpt = torch.load(trained_detector / "checkpoint.pt", weights_only=False)
    calib = ckpt["meta"]["calibration"].numpy()
    e = rt.run([im[0] for im in calib]).embedding
    scale = float(np.linalg.norm(e, axis=1).mean())
    assert float(np.linalg.norm(e.mean(0))) < 1e-3 * scale * np.sqrt(len(e))
    with np.load(trained_detector.parent / "scenes96.npz") as z:
        test = rt.run(list(z["x_test"][:40])).embedding
    unit = test / np.linalg.norm(test, axis=1, keepdims=True)
    d = (1 - unit @ unit.T)[np.triu_indices(len(unit), 1)]
    assert np.median(d) > 0.2 and np.mean(d < 0.02) < 0.05  # distinct scenes are not near-duplicates
