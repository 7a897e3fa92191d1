"""Export to ONNX (outputs ``logits`` and ``embedding``), check parity, quantize, sign the manifest.

Files written to the output folder:

* ``model.fp32.onnx``: the float model; ``model.int8.onnx`` when int8 was asked for;
* ``model.onnx``: the one that ships (int8 only if its top-1 agreement with fp32 is >= 99%);
* ``manifest.json``: the :class:`fleet.protocol.SignedManifest` (``manifest.unsigned.json`` without a key).

A parity failure raises :class:`training.errors.ParityError` before any manifest is written, so a
model that does not compute what was evaluated can never be published.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fleet.protocol import InputSpec, ModelManifest
from fleet.signing import sign_manifest
from training.errors import ParityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

OPSET = 17
OUTPUTS = ["logits", "embedding"]
INT8_MIN_AGREEMENT = 0.99


@dataclass
class ExportResult:
    onnx_path: Path
    shipped: str  # "fp32" or "int8"
    sha256: str
    size: int
    parity_max_abs_diff: float
    parity_threshold: float
    int8_agreement: float | None
    int8_note: str | None
    manifest_path: Path
    signed: bool
    manifest: ModelManifest
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["manifest"] = self.manifest.to_dict()
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def export_onnx(model: torch.nn.Module, path: Path, *, input_shape: tuple[int, int, int], opset: int = OPSET,
                outputs: list[str] = OUTPUTS) -> None:
    """Write ``model`` (returning one tensor per name in ``outputs``, each batch-first) as ONNX with a dynamic
    batch axis.

    Uses the TorchScript exporter (``dynamo=False``), the most reliable for a dynamic batch; falls back
    to the torch.export-based exporter where the former is unavailable.
    """
    model = _cpu_copy(model)
    dummy = torch.zeros(2, *input_shape)
    axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - any failure of the legacy exporter: try the new one
        log.warning("TorchScript ONNX export failed (%s); trying the dynamo exporter", exc)
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=outputs,
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False)


def parity_check(model: torch.nn.Module, onnx_path: Path, x: np.ndarray, *, threshold: float = 1e-3,
                 outputs: list[str] = OUTPUTS) -> float:
    """Max abs difference of every output between torch (CPU, fp32) and onnxruntime on ``x`` (n, c, h, w).

    Raises ParityError if it exceeds ``threshold`` or the ONNX outputs are not ``outputs``, in order.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    if names != outputs or [i.name for i in sess.get_inputs()] != ["input"]:
        raise ParityError(f"{onnx_path.name}: outputs {names}, expected {outputs} from input 'input'")
    got = sess.run(outputs, {"input": x.astype(np.float32)})
    with torch.inference_mode():
        want = [t.numpy() for t in _cpu_copy(model)(torch.from_numpy(x.astype(np.float32)))]
    diff = max(float(np.max(np.abs(g - w))) if g.size else 0.0 for g, w in zip(got, want, strict=True))
    if not np.isfinite(diff) or diff > threshold:
        raise ParityError(
            f"ONNX parity check failed: max abs difference {diff:.3g} between torch and onnxruntime on "
            f"{len(x)} images exceeds {threshold:g}; nothing is published"
        )
    return diff


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, *, batch_size: int = 32) -> None:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on ``calibration`` (n, c, h, w) float32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {"input": calibration[i: i + batch_size].astype(np.float32)}

    prep = out_path.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
        source = prep
    except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw graph instead
        log.warning("int8 pre-processing failed (%s); quantizing without it", exc)
        source = fp32_path
    try:
        quantize_static(str(source), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        prep.unlink(missing_ok=True)


def top1_agreement(a: Path, b: Path, x: np.ndarray) -> float:
    """Share of images (n, c, h, w) on which two ONNX models predict the same class."""
    import onnxruntime as ort

    preds = []
    for path in (a, b):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        preds.append(sess.run(["logits"], {"input": x.astype(np.float32)})[0].argmax(axis=1))
    return float(np.mean(preds[0] == preds[1]))


def export_model(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    meta: dict[str, Any],
    version: str,
    parent_version: str | None,
    images: np.ndarray,
    metrics: dict[str, float] | None = None,
    thresholds: dict[str, float] | None = None,
    data_snapshot: str | None = None,
    key: Ed25519PrivateKey | None = None,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    parity_threshold: float = 1e-3,
) -> ExportResult:
    """Export, check parity, optionally quantize, then write and sign the manifest.

    ``meta`` is a checkpoint's ``meta`` (class_names, input spec); ``images`` (n, c, h, w) uint8 are the
    parity and agreement batch, ``calibration`` (uint8) the int8 calibration images (default: ``images``).
    """
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.from_dict(meta["input"])
    shape = (spec.channels, spec.height, spec.width)
    fp32 = out_dir / "model.fp32.onnx"
    export_onnx(model, fp32, input_shape=shape)
    x = normalize_images(images, spec) if len(images) else np.random.default_rng(0).normal(size=(64, *shape))
    diff = parity_check(model, fp32, x.astype(np.float32), threshold=parity_threshold)
    log.info("parity: max abs difference %.2e on %d images", diff, len(x))
    shipped, agreement, note = fp32, None, None
    if int8:
        calib = normalize_images(calibration if calibration is not None and len(calibration) else images, spec)
        q = out_dir / "model.int8.onnx"
        quantize_int8(fp32, q, calib.astype(np.float32))
        agreement = top1_agreement(fp32, q, x.astype(np.float32))
        if agreement >= INT8_MIN_AGREEMENT:
            shipped, note = q, f"int8 shipped: top-1 agreement {agreement:.4f} >= {INT8_MIN_AGREEMENT}"
        else:
            note = f"int8 not shipped: top-1 agreement {agreement:.4f} < {INT8_MIN_AGREEMENT}; shipping fp32"
        log.info(note)
    final = out_dir / "model.onnx"
    shutil.copyfile(shipped, final)
    data = final.read_bytes()
    manifest = ModelManifest(
        version=version,
        parent_version=parent_version,
        onnx_sha256=hashlib.sha256(data).hexdigest(),
        onnx_size=len(data),
        input=spec,
        class_names=list(meta["class_names"]),
        embedding_dim=int(meta["embedding_dim"]),
        thresholds=dict(thresholds or {}),
        data_snapshot=data_snapshot,
        metrics={k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)},
        created_at=time.time(),
    )
    path = write_manifest(manifest, out_dir, key)
    return ExportResult(
        onnx_path=final, shipped="int8" if shipped != fp32 else "fp32", sha256=manifest.onnx_sha256,
        size=manifest.onnx_size, parity_max_abs_diff=diff, parity_threshold=parity_threshold,
        int8_agreement=agreement, int8_note=note, manifest_path=path, signed=key is not None,
        manifest=manifest, seconds=time.perf_counter() - t0,
    )


def write_manifest(manifest: ModelManifest, out_dir: Path, key: Ed25519PrivateKey | None) -> Path:
    """Validate ``manifest`` and write it signed (``manifest.json``), or unsigned without a key."""
    manifest.validate()
    if key is not None:
        path = out_dir / "manifest.json"
        path.write_text(sign_manifest(manifest, key).to_json())
    else:
        path = out_dir / "manifest.unsigned.json"
        path.write_text(manifest.to_json())
        log.warning("no signing key given: wrote %s; devices will refuse an unsigned model", path.name)
    return path


def input_spec(shape: tuple[int, int, int], mean: list[float], std: list[float]) -> InputSpec:
    c, h, w = shape
    return InputSpec(height=h, width=w, channels=c, mean=list(mean), std=list(std), layout="NCHW", scale=1.0 / 255.0)


def normalize_images(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (n, c, h, w) -> the model's float input as the device computes it: ``(x * scale - mean) / std``."""
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) * np.float32(spec.scale) - mean) / std


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(getattr(model, "module", model)).cpu().float().eval()
    return m.to(memory_format=torch.contiguous_format)
