"""The training loop and a whole turn on CPU: accuracy, checkpoints, resume, warm start, hub data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fleet.errors import Conflict, InvalidInput
from fleet.hub.selection import TRAIN_N_CLASS as HUB_TRAIN_N_CLASS
from tests.support.data import digits_arrays, png_bytes
from tests.support.inproc import InProcHub
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import TrainArgs
from training.hub_client import HubClient
from training.report import MAX_CLASS_COUNTS, TRAIN_N_CLASS, training_counts
from training.train import main

from .conftest import add_case, trainer

MakeArgs = Callable[..., TrainArgs]


def test_digits_turn_learns_and_reports(trained: Path) -> None:
    report = json.loads((trained / "report.json").read_text())
    assert report["status"] == "ready" and report["version"] == "parent-1"
    test = report["metrics"]["test"]
    assert test["accuracy"] > 0.85, test["accuracy"]
    assert set(test["per_slice"]) == {"condition=day", "condition=night", "source=data"}
    assert test["per_class"]["7"]["n"] > 0 and len(test["confusion"]) == 10
    assert set(report["timings"]) >= {"data", "train", "evaluate", "gate", "export", "total"}
    assert {"checkpoint.pt", "model.onnx", "report.json"} <= set(report["artifacts"])
    assert report["gate"]["passed"] and report["training"]["device"] == "cpu"
    assert len(report["training"]["history"]) == 6
    # the manifest says what the model trained on: the hub's adaptive selection reads its cold start from it
    manifest = json.loads((trained / "manifest.unsigned.json").read_text())
    data = report["data"]
    trained_on = data["new"]["n"] + (data["base"]["n"] if data["base"] else 0)
    assert manifest["metrics"]["train_n"] == trained_on > 0, (manifest["metrics"], data)
    per_class = {k: v for k, v in manifest["metrics"].items() if k.startswith(TRAIN_N_CLASS)}
    assert set(per_class) == {f"{TRAIN_N_CLASS}{c}" for c in manifest["class_names"]}, per_class
    assert sum(per_class.values()) == trained_on and min(per_class.values()) > 0, per_class
    assert TRAIN_N_CLASS == HUB_TRAIN_N_CLASS  # what the hub's adaptive selection reads
    assert manifest["metrics"]["test_accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)


def test_training_counts_give_each_class_or_only_the_total() -> None:
    assert training_counts(np.asarray([0, 2, 2, 2]), ["a", "b", "c"]) == {
        "train_n": 4.0, f"{TRAIN_N_CLASS}a": 1.0, f"{TRAIN_N_CLASS}b": 0.0, f"{TRAIN_N_CLASS}c": 3.0}
    many = [f"class-{i}" for i in range(MAX_CLASS_COUNTS + 1)]
    assert training_counts(np.arange(len(many)), many) == {"train_n": float(len(many))}  # over a manifest's room
    assert training_counts(np.asarray([0, 1]), ["a", "x" * 128]) == {"train_n": 2.0}  # a name over 128 characters


def test_checkpoint_holds_everything_to_resume_and_export(trained: Path) -> None:
    ckpt = load_checkpoint(trained / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "epochs", "args", "rng", "meta"} <= set(ckpt)
    assert ckpt["epoch"] == 5 and ckpt["epochs"] == 6
    meta = ckpt["meta"]
    assert meta["input"]["height"] == 8 and meta["input"]["channels"] == 1 and meta["class_names"][3] == "3"
    assert meta["calibration"].dtype == torch.uint8 and meta["calibration"].shape[1:] == (1, 8, 8)


def test_interrupted_run_resumes_to_the_same_weights(make_args: MakeArgs, tmp_path: Path) -> None:
    full = main(make_args(out=tmp_path / "full", epochs=2))

    class Killed(Exception):
        pass

    def kill_in_second_epoch(phase: str, done: int, total: int) -> None:
        if phase.startswith("train epoch 2/") and done == 3:
            raise Killed

    with pytest.raises(Killed):
        main(make_args(out=tmp_path / "cut", epochs=2), progress=kill_in_second_epoch)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 0
    resumed = main(make_args(out=tmp_path / "cut", epochs=2, resume=True))
    assert resumed["training"]["resumed_from_epoch"] == 1
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"]["test"]["accuracy"] == full["metrics"]["test"]["accuracy"]


def test_existing_checkpoint_needs_resume_and_the_same_arguments(make_args: MakeArgs, tmp_path: Path) -> None:
    main(make_args(epochs=1))
    with pytest.raises(InvalidInput, match="already exists; pass --resume"):
        main(make_args(epochs=1))
    with pytest.raises(InvalidInput, match="epochs: checkpoint 1, now 2"):
        main(make_args(epochs=2, resume=True))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and "epochs" in report["error"]


def test_new_repeats_weigh_the_new_data_against_the_base(make_args: MakeArgs, digits_npz: Path,
                                                         tmp_path: Path) -> None:
    x, y = digits_arrays()
    new = tmp_path / "new.npz"
    np.savez(new, x_train=x[:60] // 4, y_train=y[:60], x_test=x[60:80] // 4, y_test=y[60:80])
    args = dict(data=f"npz:{new}", base=f"npz:{digits_npz}", replay_ratio=1.0, epochs=1)
    report = main(make_args(out=tmp_path / "r3", new_repeats=3, **args))
    data = report["data"]
    assert data["new"]["n"] == 60 and data["base"]["new_repeats"] == 3
    assert data["epoch_size"] == 3 * 60 + data["base"]["per_epoch"] and data["base"]["per_epoch"] == data["base"]["n"]
    with pytest.raises(InvalidInput, match="--new-repeats 2 weighs the new data against a replayed base; give --base"):
        main(make_args(out=tmp_path / "nobase", new_repeats=2))
    with pytest.raises(InvalidInput, match="--new-repeats must be an integer >= 1; received 0"):
        main(make_args(out=tmp_path / "zero", new_repeats=0, **args))
    assert not (tmp_path / "nobase").exists() and not (tmp_path / "zero").exists()

    # a checkpoint saved before the option existed holds no new_repeats: it ran each new image once an epoch
    main(make_args(out=tmp_path / "old", **args))
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    del ckpt["args"]["new_repeats"]
    save_checkpoint(ckpt, path)
    with pytest.raises(InvalidInput, match="new_repeats: checkpoint 1, now 2"):
        main(make_args(out=tmp_path / "old", new_repeats=2, resume=True, **args))
    assert main(make_args(out=tmp_path / "old", resume=True, **args))["status"] == "ready"


def test_warm_start_is_the_gate_baseline_and_parent(make_args: MakeArgs, trained: Path) -> None:
    report = main(make_args(warm_start=trained / "checkpoint.pt", epochs=1, tolerance=1.0, slice_tolerance=1.0))
    assert report["parent_version"] == "parent-1"
    assert report["baseline"]["name"].startswith("warm start") and report["baseline"]["metrics"]["test"]["n"] == 397
    assert report["warm_start"]["loaded"] > 0
    assert report["gate"]["passed"] and report["export"]["manifest"]["parent_version"] == "parent-1"


def test_hub_snapshot_with_base_replay(make_args: MakeArgs, digits_npz: Path, tmp_path: Path, hub: InProcHub) -> None:
    """New labels come from a hub snapshot (dark images), replayed against the digits base set."""
    x, y = digits_arrays()
    for i in range(60):
        add_case(hub, f"c{i}", int(y[i]), png_bytes((x[i] // 4).astype(np.uint8)), {"condition": "dark"})
    clients: dict[str, HubClient] = {}

    def factory(url: str) -> HubClient:
        return clients.setdefault(url, trainer(hub, url))

    report = main(make_args(data="hub:http://hub", base=f"npz:{digits_npz}", replay_ratio=0.75, holdout=0.25),
                  client_factory=factory)
    data = report["data"]
    snapshot_id = data["snapshot"]["id"]
    assert snapshot_id.startswith("snap-") and data["snapshot"]["blobs"] == 60
    assert data["base"]["per_epoch"] == 3 * data["new"]["n"] and data["epoch_size"] == 4 * data["new"]["n"]
    slices = report["metrics"]["test"]["per_slice"]
    assert slices["source=snapshot"]["n"] + slices["source=base"]["n"] == report["metrics"]["test"]["n"]
    assert "condition=dark" in slices
    assert report["export"]["manifest"]["data_snapshot"] == f"hub-snapshot:{snapshot_id}"


def test_hub_data_without_a_shape_is_refused(make_args: MakeArgs) -> None:
    with pytest.raises(InvalidInput, match="hub data needs the input shape"):
        main(make_args(data="hub:http://hub"), client_factory=lambda url: None)  # type: ignore[arg-type,return-value]


def test_fashion_mnist_slice_one_epoch(fashion_small: Path, make_args: MakeArgs) -> None:
    report = main(make_args(data=f"npz:{fashion_small}", epochs=1, width=8, augment="standard"))
    assert report["data"]["shape"] == [1, 28, 28]
    assert report["metrics"]["test"]["accuracy"] > 0.3  # one short epoch of a tiny model; chance is 0.1
    assert report["training"]["history"][0]["images_per_s"] > 0


def test_regression_set_and_gate_against_a_report(make_args: MakeArgs, digits_npz: Path, trained: Path,
                                                   tmp_path: Path) -> None:
    x, y = digits_arrays()
    reg = tmp_path / "regression.npz"
    np.savez(reg, x=x[-100:], y=y[-100:], tags=np.array(["edge"] * 100))
    report: dict[str, Any] = main(make_args(regression_sets=[f"npz:{reg}"], gate_against=trained / "report.json",
                                            epochs=1, width=4))
    assert report["metrics"]["regression"]["n"] == 100
    assert "condition=edge" in report["metrics"]["regression"]["per_slice"]
    # a weak one-epoch model cannot hold the parent's accuracy: rejected, with reasons, nothing exported
    assert report["status"] == "rejected" and not report["gate"]["passed"]
    assert any(r.startswith("test:") for r in report["gate"]["reasons"])
    assert "export" not in report and not (tmp_path / "run" / "model.onnx").exists()


def test_rgb_image_folder_with_a_torchvision_model(tmp_path: Path, make_args: MakeArgs) -> None:
    """Any class count, 3 channels, odd image sizes: a folder of RGB images, mobilenet_v3_small, exported."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(24):
            img = rng.integers(0, 60, (14, 18, 3)).astype(np.uint8)
            img[..., c] += 150
            (tmp_path / "imgs" / name / f"{i}.png").write_bytes(png_bytes(img))
    report = main(make_args(data=f"folder:{tmp_path / 'imgs'}", model="mobilenet_v3_small", width=None,
                            image_size=(16, 16), epochs=2, batch_size=16, holdout=0.25))
    assert report["data"]["shape"] == [3, 16, 16] and report["data"]["class_names"] == ["blue", "green", "red"]
    assert report["status"] == "ready" and report["export"]["parity_max_abs_diff"] < 1e-3
    assert report["export"]["manifest"]["input"]["channels"] == 3


def test_training_on_a_hub_with_no_labels_is_refused_and_leaves_no_snapshot(make_args: MakeArgs, digits_npz: Path,
                                                                           tmp_path: Path, hub: InProcHub) -> None:
    """The hub refuses to freeze an empty snapshot: no snapshot is left on the hub, no model here."""
    with pytest.raises(Conflict, match=r"nothing to snapshot: the hub holds no accepted or gold labels yet \(0 "):
        main(make_args(data="hub:http://hub", base=f"npz:{digits_npz}"), client_factory=lambda url: trainer(hub, url))
    assert hub.snapshots() == []  # and the run folder holds only the failed run's report
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["report.json"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["error"].startswith("Conflict: POST /v1/snapshots: HTTP 409: nothing to snapshot")
