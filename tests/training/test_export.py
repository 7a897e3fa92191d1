"""ONNX export: outputs, dynamic batch, parity, int8 with an agreement floor, signed manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fleet.protocol import SignedManifest
from fleet.signing import load_private_key, verify_file_sha256, verify_manifest
from training import export as export_mod
from training.checkpoint import load_checkpoint
from training.data import load_npz
from training.errors import ParityError
from training.export import export_model
from training.models import Classifier, build_model


def load_model(run: Path) -> tuple[Classifier, dict]:
    ckpt = load_checkpoint(run / "checkpoint.pt")
    meta = ckpt["meta"]
    spec = meta["input"]
    m = build_model(meta["model"], num_classes=meta["num_classes"], in_channels=spec["channels"],
                    image_size=(spec["height"], spec["width"]), width=meta["width"])
    m.load_state_dict(ckpt["model"])
    return m, meta


def test_export_writes_a_signed_model_that_matches_torch(
    trained: Path, digits_npz: Path, signing_key: tuple[Path, str], tmp_path: Path
) -> None:
    model, meta = load_model(trained)
    images = load_npz(digits_npz).test.images[:64]  # type: ignore[union-attr]
    res = export_model(model, tmp_path, meta=meta, version="v2", parent_version="parent-1", images=images,
                       metrics={"test_accuracy": 0.9}, thresholds={"margin": 0.1},
                       key=load_private_key(signing_key[0]))
    assert res.parity_max_abs_diff < 1e-4 and res.shipped == "fp32" and res.signed
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "embedding"]
    assert [i.name for i in sess.get_inputs()] == ["input"]
    for n in (1, 7):  # dynamic batch axis
        logits, emb = sess.run(None, {"input": np.zeros((n, 1, 8, 8), np.float32)})
        assert logits.shape == (n, 10) and emb.shape == (n, meta["embedding_dim"])
    signed = SignedManifest.from_json(res.manifest_path.read_text())
    manifest = verify_manifest(signed, signing_key[1])
    verify_file_sha256(res.onnx_path, manifest.onnx_sha256, manifest.onnx_size)
    assert manifest.version == "v2" and manifest.parent_version == "parent-1"
    assert manifest.input.mean == meta["input"]["mean"] and manifest.input.scale == pytest.approx(1 / 255)
    assert manifest.class_names == [str(i) for i in range(10)] and manifest.outputs == ["logits", "embedding"]
    assert manifest.metrics == {"test_accuracy": 0.9} and manifest.thresholds == {"margin": 0.1}


def test_int8_ships_only_with_enough_agreement(trained: Path, digits_npz: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model, meta = load_model(trained)
    images = load_npz(digits_npz).test.images  # type: ignore[union-attr]
    res = export_model(model, tmp_path / "a", meta=meta, version="v3", parent_version=None, images=images,
                       int8=True, calibration=meta["calibration"].numpy())
    assert res.int8_agreement is not None and (tmp_path / "a" / "model.int8.onnx").exists()
    shipped = "int8" if res.int8_agreement >= 0.99 else "fp32"
    assert res.shipped == shipped
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "a" / f"model.{shipped}.onnx").read_bytes()
    # below the floor: fp32 ships
    monkeypatch.setattr(export_mod, "top1_agreement", lambda a, b, x: 0.9)
    res = export_model(model, tmp_path / "b", meta=meta, version="v3", parent_version=None, images=images[:64],
                       int8=True)
    assert res.shipped == "fp32" and "0.9000 < 0.99" in (res.int8_note or "")
    assert (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.fp32.onnx").read_bytes()


def test_parity_failure_raises_and_writes_no_manifest(trained: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model, meta = load_model(trained)
    real_export = export_mod.export_onnx

    def export_a_different_model(m: torch.nn.Module, path: Path, **kw: object) -> None:
        broken = build_model("smallcnn", num_classes=10, in_channels=1, image_size=(8, 8), width=meta["width"])
        real_export(broken, path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(export_mod, "export_onnx", export_a_different_model)
    with pytest.raises(ParityError, match="parity check failed: max abs difference .* exceeds 0.001"):
        export_model(model, tmp_path, meta=meta, version="v4", parent_version=None,
                     images=meta["calibration"].numpy())
    assert not (tmp_path / "model.onnx").exists()
    assert not list(tmp_path.glob("manifest*.json"))
