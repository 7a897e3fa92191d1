"""Frames/s of the edge agent loop on a detector against a bare onnxruntime loop on the same model and frames,
with the classifier's figure beside it from the same run (issue 15's measure).

The detector is the tests' hand-built square detector (tests/support/detectors.py: the dense layout, boxes,
per-class scores and an embedding; no training) at ``--size`` x ``--size`` with one anchor per 4x4 cell; the
frames are scenes of one to three coloured squares that move a little from frame to frame, as on a video
stream, so flicker has a previous frame to compare with. The agent runs the whole device loop: preprocessing,
the model, decoding and NMS in numpy (trigger.nms), the per-box triggers of the spec (the largest box entropy at a
calibrated 2%, ambiguous boxes, flicker against the stream's previous frame), dedup, a budget, PNG encoding,
spooling and the uplink against an in-process stand-in hub (benchmarks/bench_agent.py's, which answers every
upload). The bare loop scales the frame and calls ``session.run``. The classifier rows are
bench_agent.py's smallcnn on Fashion-MNIST, measured in the same rounds. Each round runs bare, agent,
classifier bare and classifier agent back to back; the figure is the median of the per-round ratios.

    python benchmarks/bench_agent_detect.py [--frames 1500] [--repeats 3] [--size 128] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks.bench_agent as cls_bench  # noqa: E402
from benchmarks._common import append  # noqa: E402

SPEC = {
    "id": "bench-detect", "version": 1,
    "rule": {"any_of": [
        {"trigger": "box_entropy_max", "target_rate": 0.02},
        {"trigger": "box_ambiguous_count", "above": 0.5},
        {"trigger": "box_flicker", "above": 0.4},
    ]},
    "dedup": {"max_hamming": 4, "memory": 512},
    "budgets": {"global": {"rate_per_min": 600, "burst": 50}},
}


def scenes(n: int, size: int, seed: int = 0) -> list[Any]:
    """``n`` frames of one stream: one to three squares drifting by a pixel or two a frame."""
    from fleet.edge.frame import Frame
    from tests.support.detectors import draw_squares

    rng = np.random.default_rng(seed)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    k = int(rng.integers(1, 4))
    pos = rng.integers(0, size - 16, size=(k, 2)).astype(float)
    out = []
    for i in range(n):
        if i % 50 == 0:  # a new scene now and then
            k = int(rng.integers(1, 4))
            pos = rng.integers(0, size - 16, size=(k, 2)).astype(float)
        pos = np.clip(pos + rng.normal(0, 1.0, pos.shape), 0, size - 16)
        squares = [(int(x), int(y), int(x) + 12, int(y) + 12, colours[j]) for j, (x, y) in enumerate(pos)]
        out.append(Frame(image=draw_squares(size, size, squares), frame_id=str(i), stream="cam", index=i,
                         stream_time=i / 30.0))
    return out


def detector_models(work: Path, key: Any, size: int) -> dict[str, tuple[str, bytes]]:
    from tests.support.detectors import make_detector_files

    out = {}
    for version in ("bench-v1", "bench-v2"):
        files = make_detector_files(work, version, private_key=key, height=size, width=size)
        assert files.signed is not None
        out[version] = (files.signed.to_json(), files.onnx_path.read_bytes())
    return out


def bare_detect_fps(onnx_path: Path, frames: list[Any]) -> tuple[float, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    cpu0, t0 = time.thread_time(), time.perf_counter()
    for f in frames:
        x = f.image.astype(np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
        session.run(["boxes", "scores", "embedding"], {"input": x[None]})
    return len(frames) / (time.perf_counter() - t0), (time.thread_time() - cpu0) / len(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=128, help="detector input height and width")
    ap.add_argument("--append", type=Path, default=None, help="Append the result table to this Markdown file.")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from fleet.signing import generate_keypair, load_private_key

    pair = generate_keypair()
    key = load_private_key(pair.private_pem)
    work = Path(tempfile.mkdtemp(prefix="bench-agent-detect-"))
    det_work, cls_work = work / "detect", work / "classify"
    det_work.mkdir()
    cls_work.mkdir()
    det_models = detector_models(det_work, key, args.size)
    cls_models = cls_bench.publish_models(cls_work, key)
    det_frames, cls_frames = scenes(args.frames, args.size), cls_bench.load_frames(args.frames)

    def agent(models: dict[str, tuple[str, bytes]], frames: list[Any], wdir: Path, spec: dict[str, Any],
              inference: str = "process") -> tuple[float, float, Any]:
        return cls_bench.agent_fps(wdir, pair.public_b64, models, frames, challenger=False, spec=spec,
                                   inference=inference)

    det_onnx, cls_onnx = det_work / "bench-v1.onnx", cls_work / "bench-v1.onnx"
    bare_detect_fps(det_onnx, det_frames[:200])  # warm-ups
    agent(det_models, det_frames[:200], det_work, SPEC)
    cls_bench.bare_fps(cls_onnx, cls_frames[:200])
    agent(cls_models, cls_frames[:200], cls_work, cls_bench.SPEC)
    runs: dict[str, list[float]] = {k: [] for k in ("det_bare", "det_agent", "det_thread", "cls_bare", "cls_agent",
                                                     "cls_thread")}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    flagged: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):
        fps, c = bare_detect_fps(det_onnx, det_frames)
        runs["det_bare"].append(fps)
        cpu["det_bare"].append(c)
        fps, c, s = agent(det_models, det_frames, det_work, SPEC)
        runs["det_agent"].append(fps)
        cpu["det_agent"].append(c)
        flagged["det"] = (s.flagged, s.uploaded)
        fps, c, s = agent(det_models, det_frames, det_work, SPEC, "thread")
        runs["det_thread"].append(fps)
        cpu["det_thread"].append(c)
        flagged["det_thread"] = (s.flagged, s.uploaded)
        fps, c = cls_bench.bare_fps(cls_onnx, cls_frames)
        runs["cls_bare"].append(fps)
        cpu["cls_bare"].append(c)
        fps, c, s = agent(cls_models, cls_frames, cls_work, cls_bench.SPEC)
        runs["cls_agent"].append(fps)
        cpu["cls_agent"].append(c)
        flagged["cls"] = (s.flagged, s.uploaded)
        fps, c, s = agent(cls_models, cls_frames, cls_work, cls_bench.SPEC, "thread")
        runs["cls_thread"].append(fps)
        cpu["cls_thread"].append(c)
        flagged["cls_thread"] = (s.flagged, s.uploaded)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ms = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
    def vs_bare(t: str, loop: str) -> float:
        return statistics.median(a / b for a, b in zip(runs[f"{t}_{loop}"], runs[f"{t}_bare"], strict=True))

    ratio = {t: vs_bare(t, "agent") for t in ("det", "cls")}
    ratio_thread = {t: vs_bare(t, "thread") for t in ("det", "cls")}
    per_round = {t: [round(a / b, 3) for a, b in zip(runs[f"{t}_agent"], runs[f"{t}_bare"], strict=True)]
                 for t in ("det", "cls")}
    load = os.getloadavg()[0]
    verdict = {t: "met" if ratio[t] >= 0.95 else "**not met**" for t in ratio}
    title = "Edge agent loop on a detector vs bare onnxruntime, classifier beside it"
    lines = [
        f"`python benchmarks/bench_agent_detect.py --frames {args.frames} --repeats {args.repeats} --size "
        f"{args.size}` on {platform.machine()}, {os.cpu_count()} logical CPUs (load average {load:.1f} while "
        f"measuring), Python {platform.python_version()}. Detector: the tests' square detector at "
        f"{args.size}x{args.size} ({(args.size // 4) ** 2} anchors, 3 classes); {args.frames} frames of one "
        "stream of drifting squares; spec: box_entropy_max at a calibrated 2%, ambiguous boxes, flicker, dedup, "
        "a 600/min budget. Classifier: bench_agent.py's smallcnn on Fashion-MNIST with its spec. Median of "
        f"{args.repeats} rounds (bare, the agent with its inference process, the agent with the models in its own "
        f"thread, back to back in each); per-round ratios of the agent (inference process): {json.dumps(per_round)}. "
        "CPU: the bare loop's thread; the agent's threads (the in-process stand-in hub's included) and its "
        "inference process.",
        "",
        "| model | loop | frames/s | vs bare | CPU ms/frame | flagged / uploaded |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for t, name in (("det", "detector"), ("cls", "classifier")):
        lines += [
            f"| {name} | bare onnxruntime | {med[f'{t}_bare']:.0f} | 100% | {ms[f'{t}_bare']:.3f} | - |",
            f"| {name} | agent, inference process (default) | {med[f'{t}_agent']:.0f} | {100 * ratio[t]:.1f}% | "
            f"{ms[f'{t}_agent']:.3f} | {flagged[t][0]} / {flagged[t][1]} |",
            f"| {name} | agent, models in its thread | {med[f'{t}_thread']:.0f} | {100 * ratio_thread[t]:.1f}% | "
            f"{ms[f'{t}_thread']:.3f} | {flagged[t + '_thread'][0]} / {flagged[t + '_thread'][1]} |",
        ]
    lines += [
        "",
        f"Target >= 95% of bare: detector {verdict['det']} ({100 * ratio['det']:.1f}%), classifier "
        f"{verdict['cls']} ({100 * ratio['cls']:.1f}%).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append is not None:
        append(args.append, title, text)


if __name__ == "__main__":
    main()
