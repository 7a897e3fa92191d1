"""A real, tiny detector as ONNX in the dense layout, built by hand (no torch, no training): it finds coloured
squares on a dark frame, so tests can assert the boxes it must find.

How it works, per pixel, on the frame scaled to [0, 1]: ``mask`` is 1 where any channel is bright (> 0.5);
one convolution counts the bright pixels within ``reach`` to the left, above, to the right and below, which
inside a square are its distances to the square's edges (an FCOS-style ``ltrb`` regression); the graph
decodes them into normalised ``x1, y1, x2, y2``, the square's exact box at every anchor inside it. A class's
score is ``sigmoid(gain * (channel - 0.5)) * centerness * mask``, so a red square is class 0, a green one
class 1, a blue one class 2 (``class_channels`` reorders that), a yellow one both 0 and 1, and the anchor nearest
a square's centre scores highest. Anchors sit every ``stride`` pixels, at the middle of each cell.

Squares must be at most ``reach`` pixels wide and, on a shared row or column, more than ``reach`` apart.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fleet.protocol import DetectorSpec, InputSpec, ModelManifest
from fleet.protocol.model import OUTPUTS
from tests.support.models import ModelFiles

Square = tuple[int, int, int, int, tuple[int, int, int]]  # x1, y1, x2, y2 (pixels, end exclusive), colour


def build_square_detector(
    *,
    height: int = 32,
    width: int = 32,
    stride: int = 4,
    reach: int = 16,
    class_channels: Sequence[int] = (0, 1, 2),
    gain: float = 12.0,
    embedding_dim: int = 16,
    outputs: Sequence[str] = tuple(OUTPUTS["detect"]),
    dynamic_size: bool = False,
    poison: str | None = None,
    seed: int = 0,
) -> bytes:
    """The detector as ONNX bytes: input ``input (n, 3, height, width)`` in [0, 1]; outputs ``boxes (n, A, 4)``,
    ``scores (n, A, k)`` with ``k = len(class_channels)`` (class ``c`` looks at channel ``class_channels[c]``)
    and ``embedding (n, embedding_dim)``, named as ``outputs`` says. one anchor per ``stride`` x ``stride`` cell.

    ``dynamic_size=True`` declares the input's height and width symbolic, so the number of anchors shows only
    when the model runs. ``poison="nan"`` makes every score NaN; ``poison="range"`` triples the scores (out of
    [0, 1]); ``poison="anchors"`` drops the last anchor from the scores (boxes and scores disagree on ``A``).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, r, s = len(class_channels), reach, stride
    consts: dict[str, np.ndarray] = {}

    def const(name: str, value: object, dtype: type = np.float32) -> str:
        arr = np.asarray(value, dtype)
        assert name not in consts or np.array_equal(consts[name], arr, equal_nan=True), f"two constants named {name}"
        consts[name] = arr
        return name

    counts = np.zeros((4, 1, 2 * r, 2 * r), np.float32)  # output (y, x) reads input (y + p - r, x + q - r)
    counts[0, 0, r, :r] = 1  # left: x - r .. x - 1
    counts[1, 0, :r, r] = 1  # top
    counts[2, 0, r, r:] = 1  # right: x .. x + r - 1
    counts[3, 0, r:, r] = 1  # bottom
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    size = np.array([width, height, width, height], np.float32)[:, None, None]
    grid = np.stack([xs, ys, xs, ys]) / size  # (4, h, w): x1 = (x - left) / w, ..., y2 = (y + bottom) / h
    sign = np.array([-1, -1, 1, 1], np.float32)[:, None, None] / size
    pick = np.zeros((k, 3, 1, 1), np.float32)
    pick[np.arange(k), list(class_channels), 0, 0] = gain
    rng = np.random.default_rng(seed)
    n_anchors = len(range(s // 2, height, s)) * len(range(s // 2, width, s))
    nodes = [
        helper.make_node("ReduceMax", ["input"], ["brightest"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["brightest", const("half", 0.5)], ["centred"]),
        helper.make_node("Mul", ["centred", const("steep", 1000.0)], ["steep_mask"]),
        helper.make_node("Add", ["steep_mask", "half"], ["raw_mask"]),
        helper.make_node("Clip", ["raw_mask", const("zero", 0.0), const("one", 1.0)], ["mask"]),
        helper.make_node("Conv", ["mask", const("counts", counts)], ["ltrb"], pads=[r, r, r - 1, r - 1]),
        # boxes: the anchor's pixel moved by its distances, normalised
        helper.make_node("Mul", ["ltrb", const("sign", sign)], ["moves"]),
        helper.make_node("Add", ["moves", const("grid", grid)], ["dense_boxes"]),
        # centerness from the distances to the edges as seen from the pixel's centre
        helper.make_node("Add", ["ltrb", const("centre", np.array([0.5, 0.5, -0.5, -0.5])[:, None, None])],
                         ["dist_raw"]),
        helper.make_node("Relu", ["dist_raw"], ["dist"]),
        helper.make_node("Split", ["dist", const("halves", [2, 2], np.int64)], ["lt", "rb"], axis=1),
        helper.make_node("Min", ["lt", "rb"], ["near"]),
        helper.make_node("Max", ["lt", "rb"], ["far"]),
        helper.make_node("Div", ["near", "far"], ["ratios"]),
        helper.make_node("ReduceProd", ["ratios"], ["ratio"], axes=[1], keepdims=1),
        helper.make_node("Sqrt", ["ratio"], ["centerness"]),
        # per-class scores: how bright the class's channel is, times centerness, only on bright pixels
        helper.make_node("Conv", ["input", const("pick", pick), const("bias", np.full(k, -gain / 2))], ["cls"]),
        helper.make_node("Sigmoid", ["cls"], ["cls_prob"]),
        helper.make_node("Mul", ["cls_prob", "centerness"], ["cls_ctr"]),
        helper.make_node("Mul", ["cls_ctr", "mask"], ["dense_scores"]),
    ]
    for name in ("boxes", "scores"):
        c = 4 if name == "boxes" else k
        nodes += [
            helper.make_node("Slice", [f"dense_{name}", const("starts", [s // 2, s // 2], np.int64),
                                       const("ends", [height, width], np.int64), const("axes", [2, 3], np.int64),
                                       const("steps", [s, s], np.int64)], [f"{name}_grid"]),
            helper.make_node("Reshape", [f"{name}_grid", const(f"{name}_shape", [0, c, -1], np.int64)],
                             [f"{name}_cna"]),
            helper.make_node("Transpose", [f"{name}_cna"], [f"{name}_out"], perm=[0, 2, 1]),
        ]
    if poison == "nan":
        nodes.append(helper.make_node("Mul", ["scores_out", const("nan", np.nan)], ["scores_final"]))
    elif poison == "anchors":
        nodes.append(helper.make_node("Slice", ["scores_out", const("first", [0], np.int64),
                                                const("all_but_last", [-1], np.int64), const("axis_1", [1], np.int64)],
                                      ["scores_final"]))
    elif poison == "range":
        nodes.append(helper.make_node("Mul", ["scores_out", const("three", 3.0)], ["scores_final"]))
    else:
        nodes.append(helper.make_node("Identity", ["scores_out"], ["scores_final"]))
    nodes += [
        helper.make_node("Concat", ["input", "mask", "ltrb"], ["features"], axis=1),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", const("w_emb", rng.normal(0, 0.5, (8, embedding_dim))),
                                  const("b_emb", np.zeros(embedding_dim))], ["embedding_out"]),
    ]
    finals = {"boxes": "boxes_out", "scores": "scores_final", "embedding": "embedding_out"}
    a_dim: int | str = "anchors" if dynamic_size else n_anchors - (poison == "anchors")
    shapes = {"boxes": ["n", "anchors" if dynamic_size else n_anchors, 4], "scores": ["n", a_dim, k],
              "embedding": ["n", embedding_dim]}
    graph_outputs = []
    for role, name in zip(OUTPUTS["detect"], outputs, strict=True):
        nodes.append(helper.make_node("Identity", [finals[role]], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[role]))
    graph = helper.make_graph(
        nodes, "squares", [helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, ["n", 3, "h", "w"] if dynamic_size else ["n", 3, height, width])],
        graph_outputs, initializer=[numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def make_detector_files(
    directory: Path,
    version: str,
    *,
    private_key: object | None = None,
    parent: str | None = None,
    height: int = 32,
    width: int = 32,
    class_channels: Sequence[int] = (0, 1, 2),
    embedding_dim: int = 16,
    detector: DetectorSpec | None = None,
    class_names: list[str] | None = None,
    **build: object,
) -> ModelFiles:
    """Write ``{version}.onnx`` (:func:`build_square_detector`) and return its ``task: detect`` manifest, signed
    when a private key is given. ``class_names`` defaults to red, green, blue in ``class_channels`` order."""
    from fleet.signing import sign_manifest

    data = build_square_detector(height=height, width=width, class_channels=class_channels,
                                 embedding_dim=embedding_dim, **build)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{version}.onnx"
    path.write_bytes(data)
    colours = ("red", "green", "blue")
    manifest = ModelManifest(
        version=version,
        parent_version=parent,
        onnx_sha256=hashlib.sha256(data).hexdigest(),
        onnx_size=len(data),
        input=InputSpec(height=height, width=width, channels=3, mean=[0.0] * 3, std=[1.0] * 3),
        class_names=class_names or [colours[c] for c in class_channels],
        embedding_dim=embedding_dim,
        task="detect",
        outputs=list(OUTPUTS["detect"]),
        detector=detector or DetectorSpec(),
        created_at=time.time(),
    )
    signed = sign_manifest(manifest, private_key) if private_key is not None else None  # type: ignore[arg-type]
    return ModelFiles(onnx_path=path, manifest=manifest, signed=signed)


def draw_squares(height: int, width: int, squares: Sequence[Square]) -> np.ndarray:
    """A black ``(height, width, 3)`` uint8 frame with each square filled with its colour."""
    frame = np.zeros((height, width, 3), np.uint8)
    for x1, y1, x2, y2, colour in squares:
        frame[y1:y2, x1:x2] = colour
    return frame


def square_box(square: Square, height: int, width: int) -> list[float]:
    """The normalised x1, y1, x2, y2 the detector must find for ``square``."""
    x1, y1, x2, y2, _ = square
    return [x1 / width, y1 / height, x2 / width, y2 / height]
