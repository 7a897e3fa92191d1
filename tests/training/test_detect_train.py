"""The detector's turn on CPU: it learns, resumes to the same weights, replays a base set, gates against its
parent, trains from hub snapshots, runs torchvision's mobile detectors, and works from the command line (DDP:
test_distributed.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fleet.cli import app
from fleet.errors import Conflict, InvalidInput
from fleet.protocol import SignedManifest
from fleet.signing import verify_manifest
from tests.support.inproc import InProcHub
from training.checkpoint import load_checkpoint
from training.config import TrainArgs
from training.detect.data import load_box_npz
from training.detect.evaluate import detection_metrics, predict
from training.detect.models import build_detector
from training.train import main

from .conftest import add_detect_cases, trainer, write_scenes_npz

MakeArgs = Callable[..., TrainArgs]


def test_the_detector_learns_to_find_digits(trained_detector: Path) -> None:
    report = json.loads((trained_detector / "report.json").read_text())
    assert report["status"] == "ready" and report["task"] == "detect" and report["version"] == "det-parent"
    test = report["metrics"]["test"]
    ckpt = load_checkpoint(trained_detector / "checkpoint.pt")
    meta = ckpt["meta"]
    torch.manual_seed(0)
    untrained = build_detector("fcos_tiny", num_classes=4, in_channels=1, image_size=(96, 96))
    data = load_box_npz(trained_detector.parent / "scenes96.npz").test
    assert data is not None
    before = detection_metrics(predict(untrained, data.images.images, mean=meta["input"]["mean"],
                                       std=meta["input"]["std"]), data, meta["class_names"])
    assert before["map_50"] < 0.02 and test["map_50"] > 0.15 and test["map_50"] > before["map_50"] + 0.12
    assert test["map"] > before["map"] and test["map"] <= test["map_50"]
    losses = [h["loss"] for h in report["training"]["history"]]
    assert losses[-1] < 0.8 * losses[0] and set(report["training"]["history"][0]["losses"]) == {
        "classification", "bbox_regression", "bbox_ctrness"}
    assert set(test["per_slice"]) == {"condition=day", "condition=night", "source=data"}
    assert 300_000 < report["training"]["parameters"] < 600_000  # the ~0.4M FCOS at width 16
    assert {"checkpoint.pt", "model.onnx", "report.json"} <= set(report["artifacts"])
    assert report["export"]["manifest"]["detector"]["operating_threshold"] == round(test["operating_threshold"], 6)
    # what it trained on, for the hub's adaptive selection: frames, and objects of each class
    metrics = report["export"]["manifest"]["metrics"]
    train = load_box_npz(trained_detector.parent / "scenes96.npz").train
    assert metrics["train_n"] == len(train) == 200
    assert [metrics[f"train_n/class={c}"] for c in meta["class_names"]] == train.class_counts(4)


def test_an_interrupted_run_resumes_to_the_same_weights(make_det_args: MakeArgs, tmp_path: Path) -> None:
    full = main(make_det_args(out=tmp_path / "full", epochs=2))

    class Killed(Exception):
        pass

    def kill_in_second_epoch(phase: str, done: int, total: int) -> None:
        if phase.startswith("train epoch 2/") and done == 2:
            raise Killed

    with pytest.raises(Killed):
        main(make_det_args(out=tmp_path / "cut", epochs=2), progress=kill_in_second_epoch)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 0
    with pytest.raises(InvalidInput, match="batch_size: checkpoint 8, now 4"):
        main(make_det_args(out=tmp_path / "cut", epochs=2, batch_size=4, resume=True))
    resumed = main(make_det_args(out=tmp_path / "cut", epochs=2, resume=True))
    assert resumed["training"]["resumed_from_epoch"] == 1
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"]["test"]["map"] == full["metrics"]["test"]["map"]


def test_new_boxes_are_trained_beside_a_replayed_base(make_det_args: MakeArgs, scenes_npz: Path,
                                                      tmp_path: Path) -> None:
    new = write_scenes_npz(tmp_path / "new.npz", n_train=16, n_test=6, size=64, seed=7)
    report = main(make_det_args(data=f"npz:{new}", base=f"npz:{scenes_npz}", replay_ratio=0.75, epochs=1,
                                regression_sets=[f"npz:{scenes_npz}"], eval_each_epoch=True))
    data = report["data"]
    assert data["new"]["n"] == 16 and data["base"]["n"] == 48 and data["base"]["per_epoch"] == 48
    assert data["epoch_size"] == 64 and report["training"]["history"][0]["images"] == 64
    assert data["eval"] == {"test": 6 + 24, "regression": 24}  # the regression set's test split
    assert 0 <= report["training"]["history"][0]["test_map_50"] <= 1
    assert report["metrics"]["regression"]["boxes"] > 0
    assert {"source=data", "source=base"} <= set(report["metrics"]["test"]["per_slice"])
    twice = main(make_det_args(out=tmp_path / "twice", data=f"npz:{new}", base=f"npz:{scenes_npz}", replay_ratio=1.0,
                               new_repeats=2, epochs=1))  # each new scene twice an epoch, beside the whole base
    assert twice["data"]["base"]["new_repeats"] == 2 and twice["data"]["epoch_size"] == 2 * 16 + 48
    assert twice["training"]["history"][0]["images"] == 80


def test_a_warm_start_is_the_baseline_the_map_gate_holds_against(make_det_args: MakeArgs, tmp_path: Path) -> None:
    parent = main(make_det_args(out=tmp_path / "parent", epochs=1, version="p-1"))
    child = main(make_det_args(out=tmp_path / "child", warm_start=tmp_path / "parent" / "checkpoint.pt",
                               tolerance=1.0, slice_tolerance=1.0, min_slice_size=1))
    assert child["parent_version"] == "p-1" and child["warm_start"]["loaded"] > 0
    assert child["baseline"]["name"].startswith("warm start")
    assert child["baseline"]["metrics"]["test"]["map"] == pytest.approx(parent["metrics"]["test"]["map"])
    assert child["gate"]["passed"] and {c["metric"] for c in child["gate"]["checks"]} == {"map", "map_50"}
    assert child["export"]["manifest"]["parent_version"] == "p-1"

    rejected = main(make_det_args(out=tmp_path / "rejected", warm_start=tmp_path / "parent" / "checkpoint.pt",
                                  min_accuracy=0.99))
    assert rejected["status"] == "rejected" and not rejected["published"]
    assert any(r.startswith("test: mAP@[.5:.95]") and "below the required minimum 0.9900" in r
               for r in rejected["gate"]["reasons"])
    assert not (tmp_path / "rejected" / "model.onnx").exists()
    with pytest.raises(InvalidInput, match="is a 'detect' model; this run trains a 'classify' model"):
        main(TrainArgs(data=f"npz:{tmp_path}/x.npz", out=tmp_path / "c", warm_start=tmp_path / "parent" /
                       "checkpoint.pt", threads=1))


def test_a_detector_on_a_hub_with_no_labels_is_refused_and_leaves_no_snapshot(make_det_args: MakeArgs, scenes_npz: Path,
                                                                          tmp_path: Path, hub: InProcHub) -> None:
    out = tmp_path / "empty"
    with pytest.raises(Conflict, match=r"nothing to snapshot: the hub holds no accepted or gold labels yet"):
        main(make_det_args(data="hub:http://hub", base=f"npz:{scenes_npz}", out=out),
             client_factory=lambda _: trainer(hub))
    assert hub.snapshots() == [] and [p.name for p in out.iterdir()] == ["report.json"]  # the failed run's
    assert json.loads((out / "report.json").read_text())["status"] == "failed"


def test_boxes_from_a_hub_snapshot_train_a_detector(make_det_args: MakeArgs, scenes_npz: Path, tmp_path: Path,
                                                    hub: InProcHub) -> None:
    add_detect_cases(hub, 12, class_names=tuple(str(i) for i in range(4)))
    report = main(make_det_args(data="hub:http://hub", base=f"npz:{scenes_npz}", holdout=0.25),
                  client_factory=lambda _: trainer(hub))
    [snapshot] = hub.snapshots()
    assert report["data"]["snapshot"]["id"] == snapshot and report["data"]["snapshot"]["blobs"] == 12
    assert report["data"]["shape"] == [1, 64, 64] and report["status"] == "ready"
    held = report["data"]["eval"]["test"] - 24  # the base's 24 test scenes, and the snapshot's held-out cases
    assert held > 0 and report["data"]["new"]["n"] + held == 12
    assert report["metrics"]["test"]["per_slice"]["condition=fog"]["n"] == held
    assert report["export"]["manifest"]["data_snapshot"] == f"hub-snapshot:{snapshot}"


@pytest.mark.parametrize(("model", "status"), [("ssdlite320_mobilenet_v3_large", "ready"),
                                               ("fasterrcnn_mobilenet_v3_large_320_fpn", "evaluated")])
def test_torchvisions_mobile_detectors_train_from_scratch(model: str, status: str, tmp_path: Path) -> None:
    data = write_scenes_npz(tmp_path / "tiny.npz", n_train=4, n_test=2, size=64)
    report = main(TrainArgs(data=f"npz:{data}", out=tmp_path / "run", task="detect", model=model, epochs=1,
                            batch_size=2, threads=1, parity_threshold=1e-3))
    assert report["data"]["shape"] == [3, 320, 320] and report["training"]["model"] == model
    assert report["status"] == status and np.isfinite(report["training"]["history"][0]["loss"])
    if status == "evaluated":
        assert "has no dense layout" in report["export"]["skipped"]


def test_a_torchvision_state_dict_starts_a_run(make_det_args: MakeArgs, tmp_path: Path) -> None:
    donor = build_detector("fcos_tiny", num_classes=10, in_channels=1, image_size=(64, 64), width=8)
    torch.save(donor.net.state_dict(), tmp_path / "fcos.pth")
    report = main(make_det_args(init_weights=tmp_path / "fcos.pth", epochs=1))
    init = report["init_weights"]
    assert init["loaded"] == init["total"] - 2  # all but the class layer (10 classes there, 4 here)
    assert {s.split()[0] for s in init["skipped"]} == {"head.classification_head.cls_logits.weight",
                                                        "head.classification_head.cls_logits.bias"}
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(InvalidInput, match="matches only 0 of the .* tensors of fcos_tiny"):
        main(make_det_args(out=tmp_path / "o", init_weights=tmp_path / "other.pth"))


def test_detector_arguments_are_checked(make_det_args: MakeArgs) -> None:
    with pytest.raises(InvalidInput, match="--balance applies to classifiers only; received 'loss' with --task"):
        make_det_args(balance="loss").validate()
    with pytest.raises(InvalidInput, match="unknown --task 'segment'"):
        make_det_args(task="segment").validate()
    with pytest.raises(InvalidInput, match="--init-weights applies to detectors"):
        make_det_args(task="classify", init_weights=Path("x.pth")).validate()
    with pytest.raises(InvalidInput, match="fcos_tiny needs an input size divisible by 32; received \\(48, 48\\)"):
        main(make_det_args(image_size=(48, 48)))
    with pytest.raises(InvalidInput, match="unknown --augment 'standard' for a detector"):
        main(make_det_args(augment="standard"))
    args = make_det_args(batch_size=None, optimizer=None).validate()
    assert (args.batch_size, args.optimizer, args.balance, args.lr) == (16, "adamw", "none", 0.003)


def flywheel(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_train_and_export_a_detector_from_the_command_line(scenes_npz: Path, tmp_path: Path,
                                                           signing_key: tuple[Path, str]) -> None:
    code, out = flywheel("train", "--task", "detect", "--data", f"npz:{scenes_npz}", "--out", str(tmp_path / "r"),
                         "--epochs", "1", "--width", "8", "--batch-size", "8", "--threads", "1", "--version", "dcli-1",
                         "--sign-key", str(signing_key[0]), "--no-progress")
    assert code == 0, out
    assert "ready: dcli-1" in out
    signed = SignedManifest.from_json((tmp_path / "r" / "manifest.json").read_text())
    assert verify_manifest(signed, signing_key[1]).task == "detect"
    code, out = flywheel("export", str(tmp_path / "r" / "checkpoint.pt"), "--out", str(tmp_path / "e"), "--version",
                         "dcli-2", "--eval-data", f"npz:{scenes_npz}", "--sign-key", str(signing_key[0]))
    assert code == 0, out
    manifest = verify_manifest(SignedManifest.from_json((tmp_path / "e" / "manifest.json").read_text()),
                               signing_key[1])
    assert manifest.version == "dcli-2" and manifest.outputs == ["boxes", "scores", "embedding"]
    code, out = flywheel("train", "--task", "detect", "--data", f"npz:{scenes_npz}", "--out", str(tmp_path / "b"),
                         "--balance", "sampler")
    assert code == 2 and "--balance applies to classifiers only" in out


def test_a_coco_folder_trains_a_detector(make_det_args: MakeArgs, tmp_path: Path) -> None:
    from fleet.sim.scenes import digit_scenes
    from tests.support.data import png_bytes

    s = digit_scenes(30, seed=3, size=64, digits=[0, 1])
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (img, boxes, labels) in enumerate(zip(s.images, s.boxes, s.labels, strict=True)):
        (root / "images" / f"{i:03d}.png").write_bytes(png_bytes(img))
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": 64, "height": 64,
                       "condition": "night" if i % 2 else "day"})
        for (x1, y1, x2, y2), c in zip(boxes * 64, labels, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                         "area": float((x2 - x1) * (y2 - y1))})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "zero"}, {"id": 2, "name": "one"}]}
    (root / "annotations.json").write_text(json.dumps(doc))
    report = main(make_det_args(data=f"coco:{root}", holdout=0.3))
    assert report["data"]["class_names"] == ["zero", "one"] and report["data"]["shape"] == [1, 64, 64]
    assert report["data"]["new"]["n"] + report["data"]["eval"]["test"] == 30
    assert {"condition=day", "condition=night"} <= set(report["metrics"]["test"]["per_slice"])
    assert report["export"]["manifest"]["class_names"] == ["zero", "one"]
