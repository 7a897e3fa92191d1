"""Run an ONNX model under onnxruntime, with preprocessing read from its manifest's input spec.

Any frame size and 1, 3 or 4 channels go in; the manifest's InputSpec (size, channels, scale,
mean/std, layout) decides what the model sees, and its task which outputs come out: a classifier's
``logits`` and ``embedding``, or a detector's dense ``boxes``, ``scores`` and ``embedding``, decoded into
kept boxes per frame as its DetectorSpec says (:mod:`fleet.inference.detector`). Nothing about a model is
hard-coded here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.errors import PermanentError
from fleet.inference.detector import Detections
from fleet.inference.detector import decode as decode_dense_outputs
from fleet.protocol import InputSpec, ModelManifest
from fleet.protocol.model import OUTPUTS

log = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "nearest")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as Pillow's convert("L")
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


class ModelError(PermanentError):
    """A model that cannot be loaded or fails its health check; the message says why."""


@dataclass
class Outputs:
    """What one forward pass returns: ``embedding`` (n, d) and, for a classifier, ``logits`` (n, k); for a
    detector, ``detections`` (the boxes kept on each frame) and the dense outputs they came from,
    ``boxes`` (n, A, 4) and ``scores`` (n, A, k). Float32."""

    logits: NDArray[Any] | None
    embedding: NDArray[Any]
    detections: Detections | None = None
    boxes: NDArray[Any] | None = None
    scores: NDArray[Any] | None = None


class Preprocessor:
    """Turns uint8 frames into the model's float32 input tensor, per an InputSpec.

    ``images``: a sequence of (h, w) or (h, w, c) uint8 arrays, c in (1, 3, 4), any size; or one array of frames
    stacked at the model's own size, (n, H, W[, C]), scaled in one pass.
    Returns (n, C, H, W) or (n, H, W, C) float32 as the spec's layout says.
    """

    def __init__(self, spec: InputSpec, *, interpolation: str = "bilinear") -> None:
        if interpolation not in INTERPOLATIONS:
            raise ModelError(f"unknown interpolation {interpolation!r}; expected one of {list(INTERPOLATIONS)}")
        self.spec = spec
        self.interpolation = interpolation
        std = np.asarray(spec.std, np.float32)
        self._a = (np.float32(spec.scale) / std).astype(np.float32)
        self._b = (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)
        self._tables: dict[tuple[int, int], Any] = {}

    def key(self) -> tuple[Any, ...]:
        """Two preprocessors with equal keys produce identical tensors (the shadow path shares one)."""
        s = self.spec
        return (s.height, s.width, s.channels, tuple(s.mean), tuple(s.std), s.scale, s.layout, self.interpolation)

    def __call__(self, images: Sequence[NDArray[Any]] | NDArray[Any]) -> NDArray[Any]:
        s = self.spec
        if isinstance(images, np.ndarray) and images.shape[1:3] == (s.height, s.width) and (
                images.shape[3:] == (s.channels,) or (images.ndim == 3 and s.channels == 1)):
            # frames stacked at the model's size: one fused scale-and-cast over all of them
            xs: NDArray[Any] = np.multiply(images.reshape(len(images), s.height, s.width, s.channels), self._a,
                                           dtype=np.float32)
            xs += self._b
            return np.ascontiguousarray(xs.transpose(0, 3, 1, 2)) if s.layout == "NCHW" else xs
        if len(images) == 1:  # the per-frame path: one fused scale-and-cast, no batch buffer
            x: NDArray[Any] = np.multiply(self._resize(self._channels(images[0])), self._a, dtype=np.float32)
            x += self._b
            if s.layout == "NCHW":
                return np.ascontiguousarray(x.transpose(2, 0, 1))[None]
            return x[None]
        batch = np.empty((len(images), s.height, s.width, s.channels), np.float32)
        for i, img in enumerate(images):
            batch[i] = self._resize(self._channels(img))
        batch *= self._a
        batch += self._b
        if s.layout == "NCHW":
            return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return batch

    def _channels(self, img: NDArray[Any]) -> NDArray[Any]:
        """(h, w, spec.channels), uint8 or float32."""
        if img.ndim == 2:
            img = img[:, :, None]
        c = img.shape[2]
        if c == 4:
            img, c = img[:, :, :3], 3
        if c == self.spec.channels:
            return img
        if self.spec.channels == 3:  # gray -> rgb
            return np.repeat(img, 3, axis=2)
        return (img.astype(np.float32) @ _LUMA)[:, :, None]  # rgb -> gray

    def _resize(self, img: NDArray[Any]) -> NDArray[Any]:
        h, w = img.shape[:2]
        th, tw = self.spec.height, self.spec.width
        if (h, w) == (th, tw):
            return img
        tables = self._tables.get((h, w))
        if tables is None:
            tables = self._tables[(h, w)] = (_axis(h, th, self.interpolation), _axis(w, tw, self.interpolation))
        (y0, y1, wy), (x0, x1, wx) = tables
        if self.interpolation == "nearest":
            out: NDArray[Any] = img[y0][:, x0]
            return out
        f = img.astype(np.float32)
        wy, wx = wy[:, None, None], wx[None, :, None]
        top = f[y0] * (1 - wy) + f[y1] * wy  # (th, w, c)
        out = top[:, x0] * (1 - wx) + top[:, x1] * wx
        return out


class ModelRuntime:
    """One loaded model: an onnxruntime session on CPU with ``threads`` intra-op threads."""

    def __init__(
        self,
        onnx_path: str | Path,
        manifest: ModelManifest,
        *,
        threads: int = 1,
        interpolation: str = "bilinear",
    ) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        self.version = manifest.version
        self.path = Path(onnx_path)
        self.threads = threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            raise ModelError(f"model {manifest.version!r} does not load in onnxruntime: {exc}") from exc
        self._check_io()
        self.preprocess = Preprocessor(manifest.input, interpolation=interpolation)

    def _check_io(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"model {self.version!r} must take one input; it takes {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        spec = self.manifest.input
        if spec.layout == "NCHW":
            want = [spec.channels, spec.height, spec.width]
        else:
            want = [spec.height, spec.width, spec.channels]
        if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want, strict=True)):
            raise ModelError(
                f"model {self.version!r} input shape {shape} does not match its manifest's input spec "
                f"({spec.layout}, expected [n, {', '.join(map(str, want))}])"
            )
        if self.manifest.task == "detect":
            self._check_detect_outputs()
            return
        names = [o.name for o in self.session.get_outputs()]
        if "logits" not in names or "embedding" not in names:
            hint = " (those of a 'detect' model)" if set(OUTPUTS["detect"]) <= set(names) else ""
            raise ModelError(f"model {self.version!r} must have outputs 'logits' and 'embedding'; it has {names}{hint}")

    def _check_detect_outputs(self) -> None:
        """Refuse a detector whose outputs do not match its manifest: names ``boxes``, ``scores``, ``embedding``;
        shapes ``(n, A, 4)``, ``(n, A, k)`` with ``k`` the manifest's class count and ``(n, d)`` with ``d`` its
        ``embedding_dim``. Symbolic dimensions are left to the health check, which runs the model."""
        outputs = {o.name: o for o in self.session.get_outputs()}
        v, want_names = self.version, OUTPUTS["detect"]
        if not set(want_names) <= set(outputs):
            hint = " (those of a 'classify' model)" if set(OUTPUTS["classify"]) <= set(outputs) else ""
            raise ModelError(f"model {v!r} (task 'detect') must have outputs {want_names}; "
                             f"it has {list(outputs)}{hint}")
        k, d = len(self.manifest.class_names), self.manifest.embedding_dim
        want: dict[str, tuple[tuple[Any, ...], str]] = {
            "boxes": (("n", "A", 4), "4 = x1, y1, x2, y2"),
            "scores": (("n", "A", k), f"k = {k} classes in the manifest's class_names"),
            "embedding": (("n", d), f"d = the manifest's embedding_dim {d}"),
        }
        for name, (shape, why) in want.items():
            got = outputs[name].shape
            if len(got) != len(shape) or any(isinstance(g, int) and isinstance(w, int) and g != w
                                             for g, w in zip(got, shape, strict=True)):
                raise ModelError(f"model {v!r}: output {name!r} has shape {got}, expected "
                                 f"({', '.join(map(str, shape))}) with {why}")
            if outputs[name].type not in FLOAT_TYPES:
                raise ModelError(f"model {v!r}: output {name!r} is {outputs[name].type}, expected one of "
                                 f"{list(FLOAT_TYPES)}")
        a_boxes, a_scores = outputs["boxes"].shape[1], outputs["scores"].shape[1]
        if isinstance(a_boxes, int) and isinstance(a_scores, int) and a_boxes != a_scores:
            raise ModelError(f"model {v!r}: outputs 'boxes' and 'scores' must cover the same anchors; they have "
                             f"{a_boxes} and {a_scores}")

    def infer(self, tensor: NDArray[Any], *, decode: bool = True) -> Outputs:
        """Forward pass on an already preprocessed batch. A detector's dense outputs are decoded into
        ``detections`` unless ``decode`` is False (the agent decodes a whole trigger window at once, off the
        inference path: one call over 64 frames costs a tenth of 64 calls, and each call between two forward
        passes slowed the next one, measured in fleet/edge/inference.py's docstring)."""
        if self.manifest.detector is not None:
            return self._detect(tensor, decode=decode)
        logits, embedding = self.session.run(["logits", "embedding"], {self.input_name: tensor})
        return Outputs(logits=logits, embedding=embedding)

    def _detect(self, tensor: NDArray[Any], *, decode: bool = True) -> Outputs:
        """A detector's forward pass, its dense outputs checked against the manifest and decoded."""
        m = self.manifest
        assert m.detector is not None
        boxes, scores, embedding = self.session.run(OUTPUTS["detect"], {self.input_name: tensor})
        n, k, d = len(tensor), len(m.class_names), m.embedding_dim
        a = boxes.shape[1] if boxes.ndim >= 2 else "A"
        for name, arr, want in (("boxes", boxes, (n, a, 4)), ("scores", scores, (n, a, k)),
                                ("embedding", embedding, (n, d))):
            if tuple(arr.shape) != want:
                raise ModelError(f"model {m.version!r}: {name} shape {tuple(arr.shape)}, expected {want}")
        return Outputs(logits=None, embedding=embedding,
                       detections=decode_dense_outputs(boxes, scores, m.detector) if decode else None,
                       boxes=boxes, scores=scores)

    def run(self, images: Sequence[NDArray[Any]]) -> Outputs:
        """Preprocess frames and run the model on them."""
        return self.infer(self.preprocess(images))


def health_check(runtime: ModelRuntime, frames: Sequence[NDArray[Any]]) -> None:
    """Run the model on stored frames; raise ModelError unless shapes are right and values finite."""
    m = runtime.manifest
    if not frames:
        frames = synthetic_frames(m.input, 4)
    try:
        out = runtime.run(frames)
    except ModelError:
        raise
    except Exception as exc:  # a runtime failure inside onnxruntime
        raise ModelError(f"model {m.version!r} failed to run on {len(frames)} health-check frames: {exc}") from exc
    n, k, d = len(frames), len(m.class_names), m.embedding_dim
    if out.detections is not None:  # a detector: its outputs' shapes were checked as it ran
        _check_finite(m, ("boxes", out.boxes), ("scores", out.scores), ("embedding", out.embedding))
        assert out.scores is not None
        lo, hi = (float(out.scores.min()), float(out.scores.max())) if out.scores.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ModelError(f"model {m.version!r}: health check: scores range over [{lo:.4g}, {hi:.4g}], "
                             f"expected per-class scores in [0, 1]")
        return
    assert out.logits is not None  # a classifier
    for name, arr, want in (("logits", out.logits, (n, k)), ("embedding", out.embedding, (n, d))):
        if tuple(arr.shape) != want:
            raise ModelError(f"model {m.version!r}: health check: {name} shape {tuple(arr.shape)}, expected {want}")
        _check_finite(m, (name, arr))


def _check_finite(m: ModelManifest, *named: tuple[str, NDArray[Any] | None]) -> None:
    for name, arr in named:
        if arr is not None and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ModelError(f"model {m.version!r}: health check: {name} holds {bad} NaN or infinite values")


def synthetic_frames(spec: InputSpec, n: int, *, seed: int = 0) -> list[NDArray[Any]]:
    """Deterministic noise frames at the model's input size (used before any real frame is stored)."""
    rng = np.random.default_rng(seed)
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _axis(src: int, dst: int, interpolation: str) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Source indices and weights for resizing one axis from ``src`` to ``dst`` (half-pixel centres)."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    if interpolation == "nearest":
        idx = np.clip(np.floor(pos + 0.5), 0, src - 1).astype(np.intp)
        return idx, idx, np.zeros(dst, np.float32)
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, src - 1)
    weight = (pos - lo).astype(np.float32)
    return lo, hi, weight
