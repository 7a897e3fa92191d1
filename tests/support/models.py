"""Tiny real ONNX models and signed manifests for tests that must not need torch."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleet.protocol import InputSpec, ModelManifest, SignedManifest


@dataclass
class ModelFiles:
    onnx_path: Path
    manifest: ModelManifest
    signed: SignedManifest | None


def build_tiny_onnx(
    *,
    channels: int = 1,
    height: int = 8,
    width: int = 8,
    num_classes: int = 3,
    embedding_dim: int = 16,
    seed: int = 0,
    poison: str | None = None,
) -> bytes:
    """A two-layer MLP as ONNX with outputs ``logits`` (n, k) and ``embedding`` (n, d).

    ``poison="nan"`` makes every logit NaN (a model that loads but fails the health check);
    ``poison="shape"`` drops the embedding output's width to 1 (wrong output shape).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    d_in = channels * height * width
    w1 = rng.normal(0, 1 / np.sqrt(d_in), (d_in, embedding_dim)).astype(np.float32)
    b1 = np.zeros(embedding_dim, np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(embedding_dim), (embedding_dim, num_classes)).astype(np.float32)
    b2 = rng.normal(0, 0.1, num_classes).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["embedding_raw"]),
        helper.make_node("Gemm", ["embedding_raw", "w2", "b2"], ["logits_raw"]),
    ]
    emb_dim_out = embedding_dim
    if poison == "nan":
        inits.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan"))
        nodes.append(helper.make_node("Mul", ["logits_raw", "nan"], ["logits"]))
    else:
        nodes.append(helper.make_node("Identity", ["logits_raw"], ["logits"]))
    if poison == "shape":
        inits.append(numpy_helper.from_array(np.array([0, 1], np.int64), "slice_start"))
        inits.append(numpy_helper.from_array(np.array([2**31, 1], np.int64), "slice_end"))
        nodes.append(helper.make_node("Slice", ["embedding_raw", "slice_start", "slice_end"], ["embedding"]))
        emb_dim_out = 1
    else:
        nodes.append(helper.make_node("Identity", ["embedding_raw"], ["embedding"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", channels, height, width])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", num_classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", emb_dim_out]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def make_model_files(
    directory: Path,
    version: str,
    *,
    private_key: object | None = None,
    parent: str | None = None,
    channels: int = 1,
    height: int = 8,
    width: int = 8,
    num_classes: int = 3,
    embedding_dim: int = 16,
    seed: int = 0,
    poison: str | None = None,
    class_names: list[str] | None = None,
    data_snapshot: str | None = None,
    metrics: dict[str, float] | None = None,
) -> ModelFiles:
    """Write ``{version}.onnx`` and return its manifest, signed when a private key is given (classes named
    ``class_i`` unless ``class_names`` says)."""
    from fleet.signing import sign_manifest

    data = build_tiny_onnx(
        channels=channels, height=height, width=width, num_classes=num_classes,
        embedding_dim=embedding_dim, seed=seed, poison=poison,
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{version}.onnx"
    path.write_bytes(data)
    manifest = ModelManifest(
        version=version,
        parent_version=parent,
        onnx_sha256=hashlib.sha256(data).hexdigest(),
        onnx_size=len(data),
        input=InputSpec(height=height, width=width, channels=channels,
                        mean=[0.5] * channels, std=[0.25] * channels),
        class_names=class_names or [f"class_{i}" for i in range(num_classes)],
        embedding_dim=embedding_dim,
        data_snapshot=data_snapshot,
        metrics=dict(metrics or {}),
        created_at=time.time(),
    )
    signed = sign_manifest(manifest, private_key) if private_key is not None else None  # type: ignore[arg-type]
    return ModelFiles(onnx_path=path, manifest=manifest, signed=signed)
