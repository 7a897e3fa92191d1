"""Per-box trigger cost on a detector's windows, as a share of the detector inference it accompanies.

What runs, in one process, on the same frames (numpy, BLAS and onnxruntime on one thread each, as on a device):

* the detector: no detector ONNX exists in this branch yet, so a stand-in built with ``onnx.helper`` (no torch,
  nothing downloaded) in the contract's dense layout (``fleet/protocol/model.py``): a 256x256x3 input, four
  3x3 convolutions down to stride 8 (widths w, 2w, 4w, 4w) and a two-layer 3x3 head tower, then 1x1 class
  and box convolutions at each of the 32x32 = 1,024 anchors: ``scores (n, 1024, 10)`` = sigmoid of the class
  logits (RetinaNet-style), ``boxes (n, 1024, 4)`` = anchor centre -/+ exp(regression) distances, normalised;
  ``embedding (n, 128)`` from the pooled features. With w = 32 it costs about 0.6 GMAC per frame, the size
  of a small mobile detector (SSDLite-MobileNetV2 at 320x320 is about 0.8 GMAC). Random weights; on calibration
  frames the class weights are scaled and the class bias set so that ``--candidates`` anchors per frame
  (default 100 of 1,024) score at least the decoder's 0.05 threshold and ``--confident`` (default 8) at least
  0.5, the operating threshold (a random head's logits barely spread); the ``dense`` row makes every anchor a
  candidate instead (the decoder's worst case: ``pre_nms_top_k`` = 1,000 candidates per frame).
* per window of ``--window`` frames (default 32), inferred one frame at a time, then once for the window:
  :func:`trigger.decode_dense` of the model's outputs and of a challenger's (the same outputs with noise:
  its inference is the challenger's cost, its decoding is counted here) with the DetectorSpec defaults
  (score 0.05, top-k 1,000, NMS 0.5, 100 boxes per frame), then :class:`trigger.Evaluator` on a spec with
  all 18 box triggers (the 12 uncertainty aggregations calibrated to 2% each, ambiguous share
  and count, human and challenger disagreement, flicker and instability over the window's stream) and a
  global upload budget (60 a minute, on a clock that runs at the stream's 30 fps). A human's boxes (the
  model's, jittered, one missed now and then) come with a quarter of the frames; building them is the
  human's part and is not timed.

The figure that matters is (decode + triggers) / inference in the same run (target <= 3%), measured as this
thread's CPU time (robust to other jobs on a shared machine) and as wall time.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_box_triggers.py            # print the table
    .venv/bin/python benchmarks/bench_box_triggers.py --append   # and append it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one BLAS thread, like a device

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import append, machine  # noqa: E402

from trigger import TRIGGERS, Boxes, Evaluator, FrameBatch, decode_dense  # noqa: E402

SIZE, STRIDE, CLASSES, EMBED = 256, 8, 10, 128
GRID = SIZE // STRIDE
ANCHORS = GRID * GRID
FPS = 30.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=12, help="measured windows per pass")
    ap.add_argument("--window", type=int, default=32, help="frames per window")
    ap.add_argument("--passes", type=int, default=3, help="measured passes; the median pass is reported")
    ap.add_argument("--width", type=int, default=32, help="stand-in detector width w")
    ap.add_argument("--candidates", type=int, default=100, help="anchors per frame scoring >= 0.05 (typical row)")
    ap.add_argument("--confident", type=int, default=8, help="anchors per frame scoring >= 0.5 (typical row)")
    ap.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    frames = _video(args.windows * args.window + args.window, rng)  # one extra window to warm up
    calib = _video(16, np.random.default_rng(1))
    scale, bias = _calibrate(args.width, calib, args.candidates, args.confident)
    session = _session(_graph(args.width, bias, scale))
    rows = {}
    for regime in ("typical", "dense"):
        per_pass = [_run(session, frames, args.window, regime, np.random.default_rng(p)) for p in range(args.passes)]
        rows[regime] = {k: statistics.median(p[k] for p in per_pass) for k in per_pass[0]}
    table = _table(rows, args, load)
    print(f"{table}\n\nMachine: {machine()}.")
    if args.append:
        append(ROOT / "benchmarks" / "RESULTS.md", "Per-box triggers vs detector inference (`benchmarks/"
               "bench_box_triggers.py`)", table)
        print("appended to benchmarks/RESULTS.md")
    return 0


# ---------------------------------------------------------------------------------------------
# the stand-in detector
# ---------------------------------------------------------------------------------------------


def _layers(w: int) -> list[tuple[str, int, int, int]]:
    """(name, in, out, stride) of the 3x3 convolutions."""
    return [("c1", 3, w, 2), ("c2", w, 2 * w, 2), ("c3", 2 * w, 4 * w, 2), ("c4", 4 * w, 4 * w, 1),
            ("t1", 4 * w, 4 * w, 1), ("t2", 4 * w, 4 * w, 1)]


def _macs(w: int) -> float:
    total, side = 0.0, SIZE
    for _, cin, cout, stride in _layers(w):
        side //= stride
        total += side * side * 9 * cin * cout
    total += ANCHORS * 4 * w * (CLASSES + 4) + 4 * w * EMBED
    return total


def _graph(w: int, bias: float | None, scale: float = 1.0, seed: int = 0) -> Any:
    """The stand-in's ONNX model, its class weights times ``scale``; ``bias=None`` outputs the raw class logits
    instead of the scores (for calibration)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype), name))
        return name

    x = "input"
    for name, cin, cout, stride in _layers(w):
        weight = rng.normal(0, math.sqrt(2.0 / (9 * cin)), (cout, cin, 3, 3))
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.w", weight), const(f"{name}.b", np.zeros(cout))],
                                      [f"{name}.conv"], kernel_shape=[3, 3], strides=[stride, stride],
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{name}.conv"], [name]))
        x = name
    c = 4 * w
    cls_w = rng.normal(0, 0.05, (CLASSES, c, 1, 1)) * scale
    nodes.append(helper.make_node("Conv", ["t2", const("cls.w", cls_w), const("cls.b", np.full(CLASSES, bias or 0.0))],
                                  ["cls"]))
    nodes.append(helper.make_node("Conv", ["t2", const("reg.w", rng.normal(0, 0.01, (4, c, 1, 1))),
                                           const("reg.b", np.full(4, math.log(1.5)))], ["reg"]))
    shape = const("shape", np.array([0, 0, ANCHORS]), np.int64)  # (n, channels, anchors)
    nodes += [
        helper.make_node("Reshape", ["cls", shape], ["cls.flat"]),
        helper.make_node("Transpose", ["cls.flat"], ["cls.t"], perm=[0, 2, 1]),
        helper.make_node("Exp", ["reg"], ["reg.exp"]),
        helper.make_node("Reshape", ["reg.exp", shape], ["reg.flat"]),
        helper.make_node("Transpose", ["reg.flat"], ["dist"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["dist", const("sign", np.array([-1, -1, 1, 1]) * STRIDE / SIZE)], ["offset"]),
        helper.make_node("Add", [const("centres", _centres()), "offset"], ["boxes"]),
        helper.make_node("GlobalAveragePool", ["c4"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["pooled.flat"]),
        helper.make_node("MatMul", ["pooled.flat", const("emb.w", rng.normal(0, 1 / math.sqrt(c), (c, EMBED)))],
                         ["embedding"]),
    ]
    first = "cls.t" if bias is None else "scores"
    if bias is not None:
        nodes.append(helper.make_node("Sigmoid", ["cls.t"], ["scores"]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in
               (("boxes", ["n", ANCHORS, 4]), (first, ["n", ANCHORS, CLASSES]), ("embedding", ["n", EMBED]))]
    graph = helper.make_graph(nodes, "standin_detector",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _centres() -> np.ndarray:
    c = (np.arange(GRID) + 0.5) / GRID
    cy, cx = np.meshgrid(c, c, indexing="ij")
    return np.stack([cx.ravel(), cy.ravel(), cx.ravel(), cy.ravel()], axis=1)[None]  # (1, A, 4)


def _calibrate(w: int, frames: np.ndarray, candidates: float, confident: float) -> tuple[float, float]:
    """Class-weight scale and bias at which, on ``frames``, ``candidates`` anchors per frame have a best class
    score of at least 0.05 and ``confident`` of at least 0.5 (a random head's logits barely spread)."""
    raw = _session(_graph(w, None))
    best = np.concatenate([raw.run(None, {"input": _preprocess(f[None])})[1].max(axis=2).ravel() for f in frames])
    lo, hi = np.quantile(best, [1.0 - candidates / ANCHORS, 1.0 - confident / ANCHORS])
    scale = -math.log(0.05 / 0.95) / float(hi - lo)
    return scale, -scale * float(hi)


def _session(model: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# frames, the spec and the loop
# ---------------------------------------------------------------------------------------------


def _video(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 256, 256, 3) uint8: a few bright rectangles drifting over a smooth background, with sensor noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    background = (64 + 48 * np.sin(xx / 40.0)[..., None] * np.cos(yy / 55.0)[..., None]).astype(np.float32)
    pos = rng.uniform(0, SIZE - 48, (5, 2))
    vel = rng.normal(0, 2.0, (5, 2))
    colour = rng.uniform(120, 255, (5, 3))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        img = np.repeat(background, 3, axis=2) + rng.normal(0, 6, (SIZE, SIZE, 3)).astype(np.float32)
        for (x, y), col in zip(pos + vel * i, colour, strict=True):
            x0, y0 = int(x) % (SIZE - 48), int(y) % (SIZE - 48)
            img[y0 : y0 + 40, x0 : x0 + 48] = col
        out[i] = np.clip(img, 0, 255)
    return out


def _preprocess(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0 - 0.5)


def _spec() -> dict[str, Any]:
    leaves: list[dict[str, Any]] = []
    for name in sorted(TRIGGERS):
        if not name.startswith("box_"):
            continue
        if name in ("box_human_disagreement", "box_challenger_disagreement"):
            leaves.append({"trigger": name, "above": 0.5})
        elif name in ("box_flicker", "box_instability", "box_ambiguous_share"):
            leaves.append({"trigger": name, "above": 0.6})
        elif name == "box_ambiguous_count":
            leaves.append({"trigger": name, "above": 3})
        else:
            leaves.append({"trigger": name, "target_rate": 0.02, "window": 320, "floor": 0.05})
    assert len(leaves) == 18
    return {"id": "bench-box-triggers", "version": 1, "rule": {"any_of": leaves},
            "budgets": {"global": {"rate_per_min": 60, "burst": 20}}}


def _human(boxes: Boxes, rng: np.random.Generator) -> Boxes:
    """The human's boxes on a quarter of the frames: the model's confident ones, jittered, one missed in ten."""
    frames, labels = [], []
    for f in range(boxes.n):
        r = boxes.rows(f)
        sure = boxes.scores[r] >= 0.5
        kept = sure & (rng.random(sure.shape[0]) > 0.1)
        b = boxes.boxes[r][kept] + rng.normal(0, 0.005, (int(kept.sum()), 4))
        b = np.clip(np.sort(b.reshape(-1, 2, 2), axis=1).reshape(-1, 4), 0, 1)
        frames.append(b)
        labels.append(boxes.labels[r][kept])
    return Boxes.from_frames(frames, labels=labels, known=rng.random(boxes.n) < 0.25)


def _run(session: Any, frames: np.ndarray, window: int, regime: str, rng: np.random.Generator) -> dict[str, float]:
    clock = [0.0]  # simulated: the stream runs at FPS, so the upload budget refills as on a device
    ev = Evaluator(_spec(), clock=lambda: clock[0])
    inf_cpu = inf_wall = dec_cpu = dec_wall = trig_cpu = trig_wall = 0.0
    candidates = boxes_total = confident = kept = 0
    measured = 0
    for start in range(0, len(frames), window):
        clip = frames[start : start + window]
        outs = []
        a, a_cpu = time.perf_counter(), time.thread_time()
        for img in clip:  # one frame at a time, as the agent infers
            outs.append(session.run(None, {"input": _preprocess(img[None])}))
        b, b_cpu = time.perf_counter(), time.thread_time()
        dense_boxes = np.concatenate([o[0] for o in outs])
        scores = np.concatenate([o[1] for o in outs])
        emb = np.concatenate([o[2] for o in outs])
        if regime == "dense":
            scores = 0.05 + 0.95 * scores  # every anchor a candidate
        noise = rng.lognormal(0, 0.3, scores.shape).astype(np.float32)
        ch_scores = np.minimum(scores * noise, 1.0)
        ch_boxes = dense_boxes + rng.normal(0, 0.004, dense_boxes.shape).astype(np.float32)
        c, c_cpu = time.perf_counter(), time.thread_time()
        active = decode_dense(dense_boxes, scores)
        challenger = decode_dense(ch_boxes, ch_scores)
        d, d_cpu = time.perf_counter(), time.thread_time()
        human = _human(active, rng)  # the human's part: not timed
        stream = np.zeros(len(clip), np.int64)
        ts = (start + np.arange(len(clip))) / FPS
        clock[0] = float(ts[-1])
        e, e_cpu = time.perf_counter(), time.thread_time()
        decision = ev.evaluate(FrameBatch(boxes=active, challenger_boxes=challenger, human_boxes=human,
                                          embeddings=emb, stream=stream, timestamps=ts))
        f, f_cpu = time.perf_counter(), time.thread_time()
        if start == 0:
            continue  # warm-up window
        measured += len(clip)
        inf_cpu += b_cpu - a_cpu
        inf_wall += b - a
        dec_cpu += d_cpu - c_cpu
        dec_wall += d - c
        trig_cpu += f_cpu - e_cpu
        trig_wall += f - e
        candidates += int((scores.max(axis=2) >= 0.05).sum())
        boxes_total += active.m
        confident += int((active.scores >= 0.5).sum())
        kept += int(decision.keep.sum())
    per = 1e3 / measured
    return {"inference_cpu": inf_cpu * per, "inference_wall": inf_wall * per, "decode_cpu": dec_cpu * per,
            "decode_wall": dec_wall * per, "triggers_cpu": trig_cpu * per, "triggers_wall": trig_wall * per,
            "candidates": candidates / measured, "boxes": boxes_total / measured, "confident": confident / measured,
            "kept": kept / measured}


def _table(rows: dict[str, dict[str, float]], args: argparse.Namespace, load: float) -> str:
    import onnxruntime as ort

    lines = [
        f"Stand-in detector (onnx.helper, dense layout, {ANCHORS} anchors, {CLASSES} classes, width {args.width}: "
        f"{_macs(args.width) / 1e9:.2f} GMAC/frame) run by onnxruntime {ort.__version__} one frame at a time; "
        f"decoding (active and challenger) and the Evaluator with all 18 box triggers once per {args.window}-frame "
        f"window; numpy {np.__version__}; everything on 1 thread. {args.windows} windows per pass after a warm-up "
        f"window, median of {args.passes} passes. CPU = this thread's CPU time; wall = elapsed (load average "
        f"{load:.1f} at the start). Target: (decode + triggers) / inference <= 3%.",
        "",
        "| regime | candidates/frame | boxes/frame (>= 0.5) | inference ms/frame (CPU) | decode ms/frame (CPU) "
        "| triggers ms/frame (CPU) | (decode + triggers) / inference (CPU) | same (wall) | kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for regime, r in rows.items():
        share = (r["decode_cpu"] + r["triggers_cpu"]) / r["inference_cpu"]
        wall = (r["decode_wall"] + r["triggers_wall"]) / r["inference_wall"]
        lines.append(f"| {regime} | {r['candidates']:.0f} | {r['boxes']:.1f} ({r['confident']:.1f}) | "
                     f"{r['inference_cpu']:.2f} | "
                     f"{r['decode_cpu']:.3f} | {r['triggers_cpu']:.3f} | **{100 * share:.2f}%** | {100 * wall:.2f}% | "
                     f"{100 * r['kept']:.1f}% |")
    verdicts = []
    for regime, r in rows.items():
        share = (r["decode_cpu"] + r["triggers_cpu"]) / r["inference_cpu"]
        verdicts.append(f"{regime} {'meets' if share <= 0.03 else 'misses'} it ({100 * share:.2f}%; decoding "
                        f"{100 * r['decode_cpu'] / r['inference_cpu']:.2f}%, triggers "
                        f"{100 * r['triggers_cpu'] / r['inference_cpu']:.2f}%)")
    lines += ["", f"Target (decode + triggers) / inference <= 3% (CPU): {'; '.join(verdicts)}. Decoding counts "
              f"two models (active and challenger); the dense row is the decoder's bound, every anchor a "
              f"candidate."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
