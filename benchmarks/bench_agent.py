"""Frames/s of the full edge agent loop against a bare onnxruntime loop over the same frames.

The agent loop is everything a device does per frame: preprocessing from the manifest, the active
model, the shadow challenger (second configuration), the trigger spec (calibrated entropy and margin,
human disagreement, near-duplicate suppression, a budget), PNG-encoding and spooling the kept frames,
with the uplink sending them to a hub in the background. The bare loop is the least a developer
would write: normalise the frame and call ``session.run``. Both use one onnxruntime thread on the
same Fashion-MNIST test images in the same process, alternating, after a warm-up; the figure is the
ratio of median throughputs. The model has the shape of the trainer's default ``smallcnn``
(conv-bn-relu 32-64-128 with pooling, batch-norm folded, random weights) on 1x28x28 input.

Peak memory is the agent's maximum resident set, measured in a child process that imports and
runs only the agent.

    python benchmarks/bench_agent.py [--frames 3000] [--repeats 7] [--cores 2] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = Path(os.environ.get("FLYWHEEL_DATASETS", ROOT.parent / "shared" / "datasets")) / "fashion-mnist" / (
    "fashion_mnist.npz"
)
SPEC = {
    "id": "bench", "version": 1,
    "rule": {"any_of": [
        {"trigger": "entropy", "target_rate": 0.02},
        {"trigger": "margin", "target_rate": 0.02},
        {"trigger": "human_disagreement", "above": 0.5},
    ]},
    "dedup": {"max_hamming": 4, "memory": 512},
    "budgets": {"global": {"rate_per_min": 600, "burst": 50}},
}


# ---------------------------------------------------------------------------------------------
# the model: the trainer's smallcnn shape, exported by hand (no torch on this side)
# ---------------------------------------------------------------------------------------------


def build_smallcnn_onnx(*, channels: int = 1, size: int = 28, width: int = 32, num_classes: int = 10,
                        seed: int = 0, head: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """The smallcnn graph; ``head`` = (weights (d, k), bias (k,)) for the last layer, random if None."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x, cin, n = "input", channels, 0

    def conv(cout: int) -> None:
        nonlocal x, cin, n
        w = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.01, cout).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{n}"), numpy_helper.from_array(b, f"b{n}")])
        nodes.append(helper.make_node("Conv", [x, f"w{n}", f"b{n}"], [f"c{n}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{n}"], [f"r{n}"]))
        x, cin, n = f"r{n}", cout, n + 1

    def pool() -> None:
        nonlocal x, n
        nodes.append(helper.make_node("MaxPool", [x], [f"p{n}"], kernel_shape=[2, 2], strides=[2, 2]))
        x, n = f"p{n}", n + 1

    s = size
    conv(width)
    conv(2 * width)
    if s >= 16:
        pool()
        s //= 2
    conv(4 * width)
    if s >= 8:
        pool()
        s //= 2
    if s >= 8:
        conv(4 * width)
        pool()
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["embedding"], axis=1))
    wl = rng.normal(0, np.sqrt(1 / cin), (cin, num_classes)).astype(np.float32)
    bl = np.zeros(num_classes, np.float32)
    if head is not None:
        wl, bl = head[0].astype(np.float32), head[1].astype(np.float32)
    inits += [numpy_helper.from_array(wl, "wl"), numpy_helper.from_array(bl, "bl")]
    nodes.append(helper.make_node("Gemm", ["embedding", "wl", "bl"], ["logits"]))
    graph = helper.make_graph(
        nodes, "smallcnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", num_classes]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", cin])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def publish_models(directory: Path, key: Any) -> dict[str, tuple[str, bytes]]:
    import hashlib

    from fleet.protocol import InputSpec, ModelManifest
    from fleet.signing import sign_manifest

    out = {}
    for version, seed in (("bench-v1", 0), ("bench-v2", 1)):
        data = build_smallcnn_onnx(seed=seed, head=fit_head(build_smallcnn_onnx(seed=seed)))
        manifest = ModelManifest(
            version=version, onnx_sha256=hashlib.sha256(data).hexdigest(), onnx_size=len(data),
            input=InputSpec(height=28, width=28, channels=1, mean=[0.286], std=[0.353]),
            class_names=[f"c{i}" for i in range(10)], embedding_dim=128, created_at=time.time(),
        )
        signed = sign_manifest(manifest, key).to_json()
        (directory / f"{version}.onnx").write_bytes(data)
        (directory / f"{version}.json").write_text(signed)
        out[version] = (signed, data)
    return out


def fit_head(onnx_bytes: bytes, n_train: int = 6000) -> tuple[np.ndarray, np.ndarray]:
    """A ridge-regression head on the random conv features of Fashion-MNIST training images, so the
    model is right often enough (about 3 in 4) that disagreement triggers fire at a realistic rate."""
    import onnxruntime as ort

    with np.load(DATASET) as d:
        x, y = d["x_train"][:n_train], d["y_train"][:n_train]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    xs = ((x.astype(np.float32) / 255 - 0.286) / 0.353)[:, None]
    emb = np.concatenate([session.run(["embedding"], {"input": xs[i:i + 500]})[0] for i in range(0, len(xs), 500)])
    mu, sd = emb.mean(0), emb.std(0) + 1e-6
    z = (emb - mu) / sd
    target = np.eye(10)[y] * 10.0 - 1.0
    w = np.linalg.solve(z.T @ z + 10.0 * np.eye(z.shape[1]), z.T @ target)
    return (w / sd[:, None]).astype(np.float32), (-(mu / sd) @ w).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# a hub that accepts everything (the uplink really runs: multipart encoding, acks, spool deletes)
# ---------------------------------------------------------------------------------------------


def hub_transport(models: dict[str, tuple[str, bytes]], assignment: dict[str, Any]) -> Any:
    import httpx

    from fleet.protocol import BatchReceipt, CaseReceipt

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/cases":  # the contract's receipt for the case the body carries
            found = re.search(rb'"case_id":\s*"([^"]+)"', request.read())
            case_id = found.group(1).decode() if found else "unknown"
            return httpx.Response(201, content=CaseReceipt(case_id=case_id, status="created").to_json())
        if path == "/v1/cases/batch":  # one result per case part, in order, as the hub answers
            ids = re.findall(rb'"case_id":\s*"([^"]+)"', request.read())
            return httpx.Response(200, content=BatchReceipt(
                [CaseReceipt(case_id=i.decode(), status="created") for i in ids]).to_json())
        if path == "/v1/assignment":
            return httpx.Response(200, json=assignment)
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "models"]:
            signed, data = models[parts[2]]
            return httpx.Response(200, content=signed if parts[3] == "manifest" else data)
        return httpx.Response(204)

    return httpx.MockTransport(handle)


def make_agent(work: Path, public_key: str, models: dict[str, tuple[str, bytes]], frames: list[Any], *,
               challenger: bool, window: int = 0, spec: dict[str, Any] | None = None,
               inference: str = "process") -> Any:
    """An agent on ``frames`` with the agent's default config, but for the hub, the model(s), the campaign
    and ``window`` (frames per trigger decision; 0: the agent's default)."""
    import httpx

    from fleet.edge.agent import Agent
    from fleet.edge.config import config_from_dict
    from fleet.edge.hubclient import HubClient
    from fleet.protocol import Enrollment

    ref = {v: {"version": v, "onnx_sha256": json.loads(s)["manifest"]["onnx_sha256"]} for v, (s, _) in models.items()}
    assignment = {
        "device_id": "bench-dev", "active": ref["bench-v1"], "challenger": ref["bench-v2"] if challenger else None,
        "campaigns": [{"campaign_id": "bench", "version": 1, "spec": SPEC if spec is None else spec}],
    }
    data_dir = Path(tempfile.mkdtemp(dir=work))
    cfg = config_from_dict({
        "device_id": "bench-dev", "data_dir": str(data_dir), "hub": {"url": "http://hub"},
        "source": {"kind": "npz", "path": "unused"},
        "runtime": {"threads": 1, "batch_size": 1, "inference": inference,
                    **({"trigger_window": window} if window else {})},
        "heartbeat": {"interval_s": 1.0}, "ota": {"poll_interval_s": 1.0},
        "spool": {"max_bytes": 16 * 1024 * 1024},
    }, base_dir=work)
    (data_dir / "enrollment.json").write_text(
        Enrollment(device_id="bench-dev", token="t", fleet_public_key=public_key).to_json()
    )
    client = HubClient(httpx.Client(base_url="http://hub", transport=hub_transport(models, assignment)), token="t")
    return Agent(cfg, client=client, source=frames)


class Timed:
    """Wraps a frame list; records when the first frame was taken and when the last one was done."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames
        self.start = self.end = self.cpu = 0.0

    def __iter__(self) -> Iterator[Any]:
        cpu0 = time.thread_time()  # the inference thread's own CPU time
        self.start = time.perf_counter()
        yield from self.frames
        self.end = time.perf_counter()
        self.cpu = time.thread_time() - cpu0


def load_frames(n: int) -> list[Any]:
    from fleet.edge.sources import Frame

    with np.load(DATASET) as d:
        x, y = d["x_test"], d["y_test"]
    idx = np.arange(n) % len(x)
    return [Frame(image=x[i], frame_id=str(i), human_action=int(y[i]), tags={"split": "test"}) for i in idx]


# ---------------------------------------------------------------------------------------------
# the two loops
# ---------------------------------------------------------------------------------------------


def bare_fps(onnx_path: Path, frames: list[Any]) -> tuple[float, float]:
    """(frames/s, CPU seconds per frame of the loop's thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    mean, std = np.float32(0.286), np.float32(0.353)
    cpu0, t0 = time.thread_time(), time.perf_counter()
    for f in frames:
        x = (f.image.astype(np.float32) * np.float32(1 / 255) - mean) / std
        session.run(["logits", "embedding"], {"input": x[None, None]})
    return len(frames) / (time.perf_counter() - t0), (time.thread_time() - cpu0) / len(frames)


def agent_fps(work: Path, public_key: str, models: dict[str, tuple[str, bytes]], frames: list[Any], *,
              challenger: bool, window: int = 0, spec: dict[str, Any] | None = None,
              inference: str = "process") -> tuple[float, float, Any]:
    """(frames/s, CPU seconds per frame of the whole agent: every thread of this process, the stand-in hub's
    included, and its inference process, run summary); ``spec``: the campaign (default :data:`SPEC`);
    ``inference``: runtime.inference."""
    timed = Timed(frames)
    agent = make_agent(work, public_key, models, timed, challenger=challenger, window=window,  # type: ignore[arg-type]
                       spec=spec, inference=inference)
    cpu0 = _cpu()
    summary = agent.run()
    agent.close()
    cpu = _cpu() - cpu0
    assert summary.frames == len(frames), summary
    return len(frames) / (timed.end - timed.start), cpu / len(frames), summary


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (the agent's inference process ends with
    its run)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: run only the agent and print its peak RSS (MiB), from VmHWM (ru_maxrss would
    carry the parent's peak across fork and exec)."""
    models = {}
    for v in ("bench-v1", "bench-v2"):
        models[v] = ((args.probe / f"{v}.json").read_text(), (args.probe / f"{v}.onnx").read_bytes())
    frames = load_frames(args.frames)
    _, _, summary = agent_fps(args.probe, args.public_key, models, frames, challenger=args.challenger,
                              window=args.trigger_window, inference=args.inference)
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    import resource

    hwm_kib += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # its inference process (KiB on Linux)
    print(json.dumps({"peak_rss_mib": hwm_kib / 1024,
                      "flagged": summary.flagged, "uploaded": summary.uploaded}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=7, help="Rounds of (bare, agent, agent+challenger).")
    ap.add_argument("--cores", type=int, default=0, help="Pin the benchmark to this many CPU cores (0: all).")
    ap.add_argument("--trigger-window", type=int, default=0,
                    help="Frames per trigger decision (0: the agent's default, runtime.trigger_window).")
    ap.add_argument("--append", type=Path, default=None, help="Append the result table to this Markdown file.")
    ap.add_argument("--inference", choices=["process", "thread"], default="process",
                    help="Where the agent runs its models (runtime.inference; default: process).")
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--public-key", default="", help=argparse.SUPPRESS)
    ap.add_argument("--challenger", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    if args.probe is not None:
        memory_probe(args)
        return

    import logging

    logging.basicConfig(level=logging.WARNING)
    from fleet.signing import generate_keypair, load_private_key

    pair = generate_keypair()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    models = publish_models(work, load_private_key(pair.private_pem))
    frames = load_frames(args.frames)
    onnx_path = work / "bench-v1.onnx"

    bare_fps(onnx_path, frames[:300])  # warm-up
    agent_fps(work, pair.public_b64, models, frames[:300], challenger=False, window=args.trigger_window,
              inference=args.inference)
    # Rounds of back-to-back runs: each round's ratio compares loops measured seconds apart, so load
    # from other processes on the machine shifts both sides of a ratio alike.
    runs: dict[str, list[float]] = {"bare": [], "agent": [], "agent+challenger": []}
    cpu: dict[str, list[float]] = {"bare": [], "agent": [], "agent+challenger": []}
    flagged = {}
    for _ in range(args.repeats):
        fps, c = bare_fps(onnx_path, frames)
        runs["bare"].append(fps)
        cpu["bare"].append(c)
        for name in ("agent", "agent+challenger"):
            fps, c, s = agent_fps(work, pair.public_b64, models, frames, challenger=name != "agent",
                                  window=args.trigger_window, inference=args.inference)
            runs[name].append(fps)
            cpu[name].append(c)
            flagged[name] = (s.flagged, s.uploaded)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(runs[k], runs["bare"], strict=True))
             for k in ("agent", "agent+challenger")}
    cpu_ms = {k: 1000 * statistics.median(v) for k, v in cpu.items()}

    mem = {}
    for name, extra in (("agent", []), ("agent+challenger", ["--challenger"])):
        out = subprocess.run(
            [sys.executable, __file__, "--probe", str(work), "--public-key", pair.public_b64,
             "--frames", str(args.frames), "--cores", str(args.cores),
             "--trigger-window", str(args.trigger_window), "--inference", args.inference, *extra],
            capture_output=True, text=True, check=True,
        )
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    import onnxruntime

    from fleet.edge.config import RuntimeConfig, UplinkConfig

    window, up = args.trigger_window or RuntimeConfig().trigger_window, UplinkConfig()
    lines = [
        f"## Edge agent loop vs bare onnxruntime ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python benchmarks/bench_agent.py --frames {args.frames} --repeats {args.repeats} --cores {args.cores}"
        f"{f' --trigger-window {args.trigger_window}' if args.trigger_window else ''}"
        f"{' --inference thread' if args.inference == 'thread' else ''}` "
        f"on {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
        "CPU cores, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, 1 intra-op thread, batch size 1. "
        f"Model: smallcnn shape (1x28x28, 32-64-128), {args.frames} Fashion-MNIST test frames with their labels "
        "as the human's action; spec: calibrated entropy and margin (2% each), human disagreement, dedup, "
        f"a 600/min budget, decided in windows of {window} frames; the agent's default config otherwise "
        f"(uplink batches of up to {up.batch_max_cases} cases, lingering {up.linger_s:g} s), with heartbeats "
        "and assignment polls every second; uplink running against an in-process hub that accepts every case. "
        f"Median of {args.repeats} rounds of back-to-back runs after a warm-up; 'vs bare' is the median of "
        "the per-round ratios.",
        "",
        "| loop | frames/s | vs bare | CPU ms/frame | flagged / uploaded | agent peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
        f"| bare onnxruntime | {med['bare']:.0f} | 100% | {cpu_ms['bare']:.3f} | - | - |",
    ]
    for name in ("agent", "agent+challenger"):
        label = "agent (no challenger)" if name == "agent" else "agent + shadow challenger"
        lines.append(
            f"| {label} | {med[name]:.0f} | {100 * ratio[name]:.1f}% | {cpu_ms[name]:.3f} | "
            f"{flagged[name][0]} / {flagged[name][1]} | {mem[name]:.0f} MiB |"
        )
    load = os.getloadavg()
    per_round = sorted(a / b for a, b in zip(runs["agent"], runs["bare"], strict=True))
    lines += [
        "",
        f"Per-round ratios (agent): {', '.join(f'{r:.2f}' for r in per_round)}; load average {load[0]:.1f} "
        "on this machine while measuring. CPU: the bare loop's thread; the agent's threads (the in-process "
        "stand-in hub's included) and its inference process (runtime.inference = \"process\", the default). "
        "Peak RSS: the agent's process plus its inference process.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print("all runs (frames/s):", {k: [round(x) for x in v] for k, v in runs.items()})
    print("per-round ratios:", {k: [round(a / b, 3) for a, b in zip(runs[k], runs["bare"], strict=True)]
                                for k in ("agent", "agent+challenger")})
    if args.append:
        with args.append.open("a") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
