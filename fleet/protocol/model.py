"""Model messages: how to feed a model (:class:`InputSpec`), what it is (:class:`ModelManifest`) and the
signature that lets a device trust it (:class:`SignedManifest`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    SCHEMA_VERSION,
    Message,
    canonical_json,
    check_finite,
    check_int,
    check_name,
    check_one_of,
    check_sha256,
    check_str,
    opt,
)
from fleet.protocol.tasks import MAX_BOXES

# the ONNX outputs a model of each task must declare, in order:
# - classify: ``logits (n, k)``, ``embedding (n, d)``;
# - detect (the "dense" layout): ``boxes (n, A, 4)`` every anchor's decoded box, normalised x1, y1, x2, y2;
#   ``scores (n, A, k)`` every anchor's per-class score in [0, 1] (for FCOS, sigmoid(class) * centerness);
#   ``embedding (n, d)``. Thresholding, top-k and NMS run on the device (:class:`DetectorSpec`), so each kept
#   box keeps its whole class distribution for the triggers, and the graph exports without NMS operators.
OUTPUTS = {"classify": ["logits", "embedding"], "detect": ["boxes", "scores", "embedding"]}


@dataclass
class DetectorSpec(Message):
    """How the device turns a detector's dense outputs into boxes (the manifest says it; the device never
    hard-codes it): drop anchors whose best class score is under ``score_threshold``, keep the
    ``pre_nms_top_k`` best, suppress same-class overlaps above ``nms_iou`` and keep at most ``max_detections``.
    ``operating_threshold`` is the score at which the product counts a box as found (what a user sees); the
    triggers' ambiguity band sits around it."""

    VERSIONED: ClassVar[bool] = False

    score_threshold: float = 0.05
    nms_iou: float = 0.5
    pre_nms_top_k: int = 1000
    max_detections: int = 100
    operating_threshold: float = 0.5

    def validate(self) -> None:
        for name in ("score_threshold", "nms_iou", "operating_threshold"):
            v = check_finite(getattr(self, name), f"detector.{name}")
            if not 0.0 <= v <= 1.0:
                raise ProtocolError(f"detector.{name} must be in [0, 1]; received {v}")
        check_int(self.pre_nms_top_k, "detector.pre_nms_top_k", lo=1, hi=100_000)
        check_int(self.max_detections, "detector.max_detections", lo=1, hi=MAX_BOXES)
        if self.operating_threshold < self.score_threshold:
            raise ProtocolError(f"detector.operating_threshold ({self.operating_threshold}) must not be under "
                                f"detector.score_threshold ({self.score_threshold})")


@dataclass
class InputSpec(Message):
    """How to turn a frame into the model's input tensor; the edge reads this, never hard-codes it."""

    VERSIONED: ClassVar[bool] = False

    height: int
    width: int
    channels: int  # 1 or 3
    mean: list[float]
    std: list[float]
    layout: str = "NCHW"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0  # applied to uint8 pixels before mean/std

    def validate(self) -> None:
        check_int(self.height, "input.height", lo=1, hi=16384)
        check_int(self.width, "input.width", lo=1, hi=16384)
        if self.channels not in (1, 3):
            raise ProtocolError(f"input.channels must be 1 or 3; received {self.channels!r}")
        for name, seq in (("mean", self.mean), ("std", self.std)):
            if not isinstance(seq, list) or len(seq) != self.channels:
                raise ProtocolError(f"input.{name} must list {self.channels} numbers; received {seq!r:.80}")
            for v in seq:
                check_finite(v, f"input.{name}")
        if any(s <= 0 for s in self.std):
            raise ProtocolError(f"input.std must be positive; received {self.std}")
        check_one_of(self.layout, ("NCHW", "NHWC"), "input.layout")
        check_one_of(self.dtype, ("float32",), "input.dtype")
        check_finite(self.scale, "input.scale")


@dataclass
class ModelManifest(Message):
    """Everything a device needs to know about a model besides its ONNX bytes. Signed with ed25519."""

    PARTS: ClassVar[dict[str, type[Message] | str]] = {"input": InputSpec, "detector": DetectorSpec}

    version: str
    onnx_sha256: str
    onnx_size: int
    input: InputSpec
    class_names: list[str]
    embedding_dim: int
    task: str = "classify"
    parent_version: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    data_snapshot: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS["classify"]))
    detector: DetectorSpec | None = None  # a detect model's post-processing; None for classify
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.version, "version")
        opt(self.parent_version, check_name, "parent_version")
        check_sha256(self.onnx_sha256, "onnx_sha256")
        check_int(self.onnx_size, "onnx_size", lo=1)
        self.input.validate()
        check_one_of(self.task, tuple(OUTPUTS), "task")  # a task whose model layout the contract defines
        if not isinstance(self.class_names, list) or not 2 <= len(self.class_names) <= 100_000:
            raise ProtocolError(f"class_names must list at least 2 names; received {self.class_names!r:.80}")
        for n in self.class_names:
            check_str(n, "class name", max_len=128)
        check_int(self.embedding_dim, "embedding_dim", lo=1, hi=65536)
        for k, v in {**self.thresholds, **self.metrics}.items():
            check_str(k, "threshold/metric name", max_len=128)
            check_finite(v, f"threshold/metric {k!r}")
        check_finite(self.created_at, "created_at")
        opt(self.data_snapshot, check_str, "data_snapshot", max_len=128)
        if self.outputs != OUTPUTS[self.task]:
            raise ProtocolError(f"a {self.task!r} model's outputs must be {OUTPUTS[self.task]}; "
                                f"received {self.outputs!r:.80}")
        if (self.task == "detect") != (self.detector is not None):
            raise ProtocolError(f"a {self.task!r} model {'needs' if self.task == 'detect' else 'takes no'} "
                                f"'detector' post-processing settings; received {self.detector!r:.80}")
        if self.detector is not None:
            self.detector.validate()

    def canonical_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        return canonical_json(self.to_dict())


@dataclass
class SignedManifest(Message):
    """A manifest and the ed25519 signature over its canonical bytes."""

    PARTS: ClassVar[dict[str, type[Message] | str]] = {"manifest": ModelManifest}

    manifest: ModelManifest
    signature: str  # base64 of the 64-byte ed25519 signature
    key_id: str  # sha256 (hex, first 16) of the raw public key that made it
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        self.manifest.validate()
        check_str(self.signature, "signature", max_len=128)
        check_str(self.key_id, "key_id", max_len=64)
