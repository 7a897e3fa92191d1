"""Frames/s of video decoding alone against decoding plus the edge agent, on a generated 640x480 clip, pinned cores.

Issue 15 asks whether the agent keeps up with a 640x480 30 fps stream in real time on one core, or at what
frame rate it does. Five loops read the same H.264 clip (libx264 at an IP camera's 1.5 Mbit/s, moving shapes
over a drifting gradient with mild noise), in the same process, interleaved in rounds after a warm-up:

* **decode**: PyAV decoding alone, no pixel conversion (FFmpeg's floor);
* **source**: ``fleet.edge.video.VideoFileSource``: decode + conversion to RGB, what the agent receives
  (the baseline the others are compared with);
* **source + model**: the source, the manifest's preprocessing (``fleet.inference.runtime.Preprocessor``) and a bare
  onnxruntime call per frame;
* **agent**: ``flywheel agent``'s loop on the source (preprocessing, the model, the trigger spec in windows,
  PNG-encoding and spooling what it keeps, the uplink sending to an in-process hub that accepts every case);
* **agent, scaled by FFmpeg**: the same with ``[source] width/height`` set to the model's input size, so FFmpeg's
  scaler shrinks each frame while converting it (the frames spooled are that small too).

A loop keeps up in real time when its frames/s is at least the clip's frame rate. The model is a classifier of
the trainer's ``smallcnn`` shape on RGB input (``--size``); ``--model M.onnx --manifest M.json`` runs another
model instead (a detector once the runtime takes them; ``--spec`` gives its campaign).

    python benchmarks/bench_video.py [--seconds 10] [--repeats 3] [--cores 1] [--size 64] \\
        [--model M.onnx --manifest M.json [--spec S.json]] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import append  # noqa: E402
from bench_agent import Timed, build_smallcnn_onnx, hub_transport  # noqa: E402

CLASSIFIER_SPEC = {
    "id": "bench-video", "version": 1,
    "rule": {"any_of": [{"trigger": "entropy", "target_rate": 0.02}, {"trigger": "margin", "target_rate": 0.02}]},
    "dedup": {"max_hamming": 4, "memory": 512},
    "budgets": {"global": {"rate_per_min": 600, "burst": 50}},
}


def scene(i: int, width: int, height: int, *, fps: int = 30) -> np.ndarray:
    """Frame ``i`` of the clip: a gradient drifting sideways, three shapes moving at different speeds, mild noise."""
    t = i / fps
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 96 + 64 * np.sin(x / 90 + t)
    img[..., 1] = 96 + 64 * np.cos(y / 70 - 0.7 * t)
    img[..., 2] = 80 + 0.15 * (x + y)
    for k, (speed, colour, side) in enumerate(((120, (230, 40, 40), 90), (-80, (40, 220, 60), 60),
                                                (200, (250, 250, 250), 40))):
        cx = int((width / 2 + speed * t) % width)
        cy = int(height * (k + 1) / 4)
        img[max(0, cy - side // 2):cy + side // 2, max(0, cx - side // 2):cx + side // 2] = colour
    img += np.random.default_rng(i).normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def publish(work: Path, args: argparse.Namespace, key: Any) -> tuple[dict[str, tuple[str, bytes]], Any]:
    """The model as the hub would serve it: {"bench-v1": (signed manifest JSON, ONNX bytes)}, and its manifest."""
    from fleet.protocol import InputSpec, ModelManifest
    from fleet.signing import sign_manifest

    if args.model is not None:
        data = args.model.read_bytes()
        raw = json.loads(args.manifest.read_text())
        manifest = ModelManifest.from_dict({**raw.get("manifest", raw), "version": "bench-v1",
                                            "onnx_sha256": hashlib.sha256(data).hexdigest(), "onnx_size": len(data)})
    else:
        data = build_smallcnn_onnx(channels=3, size=args.size)
        manifest = ModelManifest(
            version="bench-v1", onnx_sha256=hashlib.sha256(data).hexdigest(), onnx_size=len(data),
            input=InputSpec(height=args.size, width=args.size, channels=3, mean=[0.5] * 3, std=[0.25] * 3),
            class_names=[f"c{i}" for i in range(10)], embedding_dim=128, created_at=time.time(),
        )
    (work / "bench-v1.onnx").write_bytes(data)
    return {"bench-v1": (sign_manifest(manifest, key).to_json(), data)}, manifest


def agent_on(work: Path, public_key: str, models: dict[str, tuple[str, bytes]], frames: Iterable[Any],
             spec: dict[str, Any]) -> Any:
    """An agent with the default config on ``frames``, running ``spec`` against an in-process hub."""
    import httpx

    from fleet.edge.agent import Agent
    from fleet.edge.config import config_from_dict
    from fleet.edge.hubclient import HubClient
    from fleet.protocol import Enrollment

    sha = json.loads(models["bench-v1"][0])["manifest"]["onnx_sha256"]
    assignment = {"device_id": "bench-dev", "active": {"version": "bench-v1", "onnx_sha256": sha},
                  "challenger": None, "campaigns": [{"campaign_id": spec["id"], "version": spec["version"],
                                                     "spec": spec}]}
    data_dir = Path(tempfile.mkdtemp(dir=work))
    cfg = config_from_dict({"device_id": "bench-dev", "data_dir": str(data_dir), "hub": {"url": "http://hub"},
                            "source": {"kind": "video", "path": "unused.mp4"}, "spool": {"max_bytes": 64 << 20},
                            "heartbeat": {"interval_s": 1.0}, "ota": {"poll_interval_s": 1.0}}, base_dir=work)
    (data_dir / "enrollment.json").write_text(
        Enrollment(device_id="bench-dev", token="t", fleet_public_key=public_key).to_json())
    client = HubClient(httpx.Client(base_url="http://hub", transport=hub_transport(models, assignment)), token="t")
    return Agent(cfg, client=client, source=frames)


def loops(clip: Path, work: Path, public_key: str, models: dict[str, tuple[str, bytes]], manifest: Any,
          spec: dict[str, Any]) -> dict[str, Callable[[], tuple[int, float]]]:
    """name -> a function running that loop over the whole clip once and returning (frames, seconds)."""
    import av
    import onnxruntime as ort

    from fleet.edge.video import VideoFileSource
    from fleet.inference.runtime import Preprocessor

    def decode() -> tuple[int, float]:
        t0 = time.perf_counter()
        with av.open(str(clip)) as container:
            n = sum(1 for _ in container.decode(video=0))
        return n, time.perf_counter() - t0

    def source() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = sum(1 for _ in VideoFileSource(clip))
        return n, time.perf_counter() - t0

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(work / "bench-v1.onnx"), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    preprocess = Preprocessor(manifest.input)

    def source_model() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for frame in VideoFileSource(clip):
            session.run(None, {name: preprocess([frame.image])})
            n += 1
        return n, time.perf_counter() - t0

    def agent(**scale: int) -> tuple[int, float]:
        timed = Timed(VideoFileSource(clip, **scale))  # type: ignore[arg-type]
        run = agent_on(work, public_key, models, timed, spec)
        summary = run.run()
        run.close()
        return summary.frames, timed.end - timed.start

    scaled = {"width": manifest.input.width, "height": manifest.input.height}
    return {"decode": decode, "source": source, "source + model": source_model, "agent": agent,
            "agent, scaled by FFmpeg": lambda: agent(**scaled)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="Length of the generated clip.")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=3, help="Rounds of the five loops.")
    ap.add_argument("--bit-rate", type=float, default=1.5, help="The clip's average bit rate, Mbit/s.")
    ap.add_argument("--cores", type=int, default=1, help="Pin the benchmark to this many CPU cores (0: all).")
    ap.add_argument("--size", type=int, default=64, help="The default classifier's input side (RGB).")
    ap.add_argument("--model", type=Path, default=None, help="An ONNX model to run instead (needs --manifest).")
    ap.add_argument("--manifest", type=Path, default=None, help="Its manifest JSON (signed or not; re-signed here).")
    ap.add_argument("--spec", type=Path, default=None, help="The campaign spec JSON for the agent loop.")
    ap.add_argument("--append", type=Path, default=None, help="Append the result table to this Markdown file.")
    args = ap.parse_args()
    if (args.model is None) != (args.manifest is None):
        ap.error("--model and --manifest go together")
    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))

    import logging

    logging.basicConfig(level=logging.WARNING)
    import av
    import onnxruntime

    from fleet.signing import generate_keypair, load_private_key
    from tests.support.video import write_clip

    work = Path(tempfile.mkdtemp(prefix="bench-video-"))
    pair = generate_keypair()
    models, manifest = publish(work, args, load_private_key(pair.private_pem))
    spec = json.loads(args.spec.read_text()) if args.spec else CLASSIFIER_SPEC
    frames = round(args.seconds * args.fps)
    t0 = time.perf_counter()
    clip = write_clip(work / "clip.mp4", codec="libx264", frames=frames, fps=args.fps, width=args.width,
                      height=args.height, bit_rate=int(args.bit_rate * 1e6),
                      image=lambda i, w, h: scene(i, w, h, fps=args.fps))
    made = time.perf_counter() - t0
    run = loops(clip.path, work, pair.public_b64, models, manifest, spec)
    for fn in run.values():  # warm-up
        fn()
    fps: dict[str, list[float]] = {k: [] for k in run}
    for _ in range(args.repeats):
        for name, fn in run.items():
            n, seconds = fn()
            assert n == frames, (name, n, frames)
            fps[name].append(n / seconds)
    med = {k: statistics.median(v) for k, v in fps.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(fps[k], fps["source"], strict=True)) for k in fps}

    size = clip.path.stat().st_size
    model = (f"`{args.model.name}` ({manifest.task}, {manifest.input.channels}x{manifest.input.height}x"
             f"{manifest.input.width})" if args.model else
             f"a classifier of the smallcnn shape (3x{args.size}x{args.size}, 32-64-128, random weights)")
    lines = [
        f"{frames} frames of {args.width}x{args.height} at {args.fps} fps ({args.seconds:g} s), H.264 (libx264's "
        f"defaults but the bit rate: {8 * size / args.seconds / 1e6:.1f} Mbit/s), made in {made:.1f} s; "
        f"PyAV {av.__version__} "
        f"(FFmpeg {av.ffmpeg_version_info}), onnxruntime {onnxruntime.__version__} with 1 thread; "
        f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPU cores. Model: {model}. Agent: the default config, "
        f"campaign `{spec['id']}`, uplink to an in-process hub. Median of {args.repeats} rounds after a warm-up; "
        "'vs source' is the median of the per-round ratios; real time = frames/s over the clip's frame rate.",
        "",
        "| loop | frames/s | vs source | real time | keeps up with the clip |",
        "|---|---:|---:|---:|---|",
    ]
    for name in run:
        lines.append(f"| {name} | {med[name]:.0f} | {100 * ratio[name]:.0f}% | {med[name] / args.fps:.2f}x | "
                     f"{'yes' if med[name] >= args.fps else f'no: {med[name]:.0f} fps'} |")
    runs = "; ".join(f"{k} {', '.join(f'{x:.0f}' for x in v)}" for k, v in fps.items())
    lines += ["", f"All runs (frames/s): {runs}; load average {os.getloadavg()[0]:.1f} at the end."]
    text = "\n".join(lines)
    print(text)
    if args.append:
        append(args.append, f"Video decode + agent vs decode alone (`bench_video.py`, {args.width}x{args.height} "
               f"{args.fps} fps)", text)


if __name__ == "__main__":
    main()
