"""Per-frame cost of a realistic trigger spec beside ONNX Runtime inference of a MobileNetV3-small.

What runs, in one process, on the same frames:

* a torchvision ``mobilenet_v3_small(weights=None, num_classes=10)`` (random weights, nothing is
  downloaded) exported to ONNX at 224x224x3 with two outputs, ``logits`` and ``embedding``, and
  run by onnxruntime on ONE intra-op thread, as on a device;
* the full :class:`trigger.Evaluator` on each batch's logits, embeddings, human actions and images,
  for a four-trigger spec: calibrated entropy, calibrated margin, calibrated novelty (k=5) against
  a 10,000-entry :class:`trigger.NoveltyBank`, and human disagreement; plus dHash near-duplicate
  suppression and global, per-trigger and per-class token buckets. numpy/BLAS are pinned to one
  thread too.

Inference and evaluation alternate frame by frame (batch by batch at batch 64), as in the agent's
loop, so the trigger code pays for the caches that inference evicts. Each side is timed around
its own call only (no preprocessing). The figure that matters is the ratio, trigger / inference,
measured in the same run; the target is <= 5% at batch 1 and at batch 64. Two more rows infer one
frame at a time but evaluate the triggers on every 16 or 32 frames, as an agent can (a decision
about uploading may wait half a second; inference may not).

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_trigger.py            # print the table
    .venv/bin/python benchmarks/bench_trigger.py --append   # and append it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one BLAS thread, like a device

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trigger import Evaluator, FrameBatch, NoveltyBank, parse_spec  # noqa: E402

SIZE = 224
CLASSES = 10
BANK_SIZE = 10_000
FPS = 30.0
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)

SPEC = {
    "format": "flywheel.trigger/1",
    "id": "bench-four-triggers",
    "version": 1,
    "expires_at": None,
    "rule": {
        "any_of": [
            {"trigger": "entropy", "target_rate": 0.02},
            {"trigger": "margin", "target_rate": 0.02},
            {"trigger": "novelty", "k": 5, "target_rate": 0.01},
            {"trigger": "human_disagreement"},
        ]
    },
    "dedup": {"max_hamming": 4, "memory": 512},
    "budgets": {
        "global": {"rate_per_min": 60, "burst": 20},
        "per_trigger": {"novelty": {"rate_per_min": 20, "burst": 5}},
        "per_class": {"3": {"rate_per_min": 10, "burst": 5}},
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=512, help="measured frames per pass (a multiple of 64)")
    ap.add_argument("--passes", type=int, default=3, help="measured passes; the median pass is reported")
    ap.add_argument("--embedding", choices=("1024", "576"), default="1024",
                    help="embedding output: 1024-d pre-logits (what Flywheel ships) or 576-d pooled features")
    ap.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    frames = max(64, args.frames // 64 * 64)
    args.load = os.getloadavg()[0]

    onnx_path = _export_model(int(args.embedding))
    session = _session(onnx_path)
    rng = np.random.default_rng(0)

    # bank: embeddings of frames the model has "seen" (1,250 real forward passes, each jittered 8x)
    seen = _video(1250, rng)
    seen_logits, seen_emb = _infer(session, seen, batch=64)
    spread = seen_emb.std(axis=0, keepdims=True)
    jitter = rng.standard_normal((8, *seen_emb.shape)).astype(np.float32) * 0.3 * spread
    bank_emb = (seen_emb[None] + jitter).reshape(-1, seen_emb.shape[1])[:BANK_SIZE]
    t0 = time.perf_counter()
    bank = NoveltyBank.from_embeddings(bank_emb, meta={"model_version": "bench"})
    build_s = time.perf_counter() - t0

    spec = parse_spec(SPEC)
    stream = _video(frames, rng)
    results: dict[tuple[int, int], dict[str, list[float]]] = {}
    for batch, every in ((1, 1), (64, 64), (1, 16), (1, 32)):
        clock = _Clock()
        ev = Evaluator(spec, bank=bank, clock=clock)
        _warm_calibration(ev, seen_logits, seen_emb, seen, clock, rng)
        _run(session, ev, stream[:64], batch, clock, rng, every=every)  # warm-up pass, not measured
        per_pass = [_run(session, ev, stream, batch, clock, rng, every=every) for _ in range(args.passes)]
        results[batch, every] = {k: [p[k] for p in per_pass] for k in per_pass[0]}
    warm = _tight_loop(spec, bank, seen_logits, seen_emb, seen, rng)

    shutil.rmtree(onnx_path.parent, ignore_errors=True)
    novelty = _novelty_costs(bank, seen_emb)
    table = _table(results, warm, novelty, bank, build_s, frames, args)
    print(table)
    if args.append:
        path = ROOT / "benchmarks" / "RESULTS.md"
        with open(path, "a") as fh:  # append only: other benchmarks write to the same file
            if fh.tell() == 0:
                fh.write("# Benchmark results\n")
            fh.write("\n" + table + "\n")
        print(f"appended to {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


def _export_model(embedding_dim: int) -> Path:
    try:
        import torch
        import torchvision
    except ImportError as exc:
        sys.exit(
            f"bench_trigger needs torch and torchvision to build the MobileNetV3-small ONNX model ({exc}); "
            "install them with: pip install 'edge-flywheel[train]'"
        )
    from torch import nn

    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES).eval()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = torch.flatten(self.net.avgpool(self.net.features(x)), 1)  # 576-d
            pre_logits = self.net.classifier[:3](pooled)  # 1024-d
            logits = self.net.classifier[3](pre_logits)
            return logits, pre_logits if embedding_dim == 1024 else pooled

    torch.manual_seed(0)
    model = TwoOutputs()
    _spread_outputs(model.net, torch)
    path = Path(tempfile.mkdtemp(prefix="bench-trigger-")) / "mobilenet_v3_small.onnx"
    torch.onnx.export(
        model, (torch.zeros(1, 3, SIZE, SIZE),), str(path), input_names=["input"],
        output_names=["logits", "embedding"], opset_version=17, dynamo=False,
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "embedding": {0: "n"}},
    )
    return path


def _spread_outputs(net, torch) -> None:  # type: ignore[no-untyped-def]
    """Make a random-weight network behave like a trained one statistically, with no download:
    re-estimate BatchNorm statistics on synthetic frames (with the default statistics every frame
    maps to nearly the same embedding) and scale the last layer so logits spread by about 2."""
    x = torch.from_numpy(_preprocess(_video(256, np.random.default_rng(123))))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            net(x[i : i + 32])
    net.eval()
    head = net.classifier[3]
    with torch.no_grad():
        torch.nn.init.normal_(head.weight, 0.0, 1.0)
        head.bias.zero_()
        logits = net(x)
        head.weight.mul_(2.0 / float(logits.std()))


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _infer(session, images: np.ndarray, *, batch: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    outs = [session.run(None, {"input": _preprocess(images[i : i + batch])}) for i in range(0, len(images), batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _preprocess(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray((x - MEAN) / STD)


# ---------------------------------------------------------------------------------------------
# stream
# ---------------------------------------------------------------------------------------------


def _video(n: int, rng: np.random.Generator) -> np.ndarray:
    """Video-like uint8 frames (n, 224, 224, 3): smooth scenes held for a few frames, with sensor noise."""
    scenes = max(1, n // 6)
    low = rng.uniform(0, 255, (scenes, 7, 7, 3)).astype(np.float32)
    big = low.repeat(32, axis=1).repeat(32, axis=2)  # blocky 224x224 scenes
    idx = np.repeat(np.arange(scenes), 6)[:n]
    idx = np.pad(idx, (0, n - len(idx)), mode="edge")
    noise = rng.normal(0, 6, (n, SIZE, SIZE, 3)).astype(np.float32)
    out: np.ndarray = np.clip(big[idx] + noise, 0, 255).astype(np.uint8)
    return out


class _Clock:
    """Simulated wall clock: the stream runs at FPS frames per second."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _humans(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shadow mode: the human's action, equal to the model's class on 97% of frames."""
    human = logits.argmax(axis=1)
    flip = rng.random(len(human)) < 0.03
    human[flip] = (human[flip] + rng.integers(1, CLASSES, int(flip.sum()))) % CLASSES
    return human


def _warm_calibration(ev: Evaluator, logits, emb, images, clock: _Clock, rng) -> None:  # type: ignore[no-untyped-def]
    """Feed the calibrators a first stretch of stream so the measured passes run warm."""
    for i in range(0, len(logits) - 63, 64):
        clock.now += 64 / FPS
        ev.evaluate(FrameBatch(logits=logits[i : i + 64], embeddings=emb[i : i + 64],
                               human=_humans(logits[i : i + 64], rng), images=images[i : i + 64]))


def _run(session, ev: Evaluator, stream: np.ndarray, batch: int, clock: _Clock,  # type: ignore[no-untyped-def]
         rng: np.random.Generator, *, every: int | None = None) -> dict[str, float]:
    """Infer ``batch`` frames at a time; evaluate the triggers on every ``every`` frames (default: each batch)."""
    every = every or batch
    inputs = [_preprocess(stream[i : i + batch]) for i in range(0, len(stream), batch)]
    wall_inf = wall_trig = cpu_inf = cpu_trig = 0.0
    kept = qualified = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for j, x in enumerate(inputs):
        a, a_cpu = time.perf_counter(), time.thread_time()
        out = session.run(None, {"input": x})
        b, b_cpu = time.perf_counter(), time.thread_time()
        wall_inf += b - a
        cpu_inf += b_cpu - a_cpu
        pending.append((out[0], out[1]))
        done = (j + 1) * batch
        if done % every and done < len(stream):
            continue
        logits = np.concatenate([p[0] for p in pending])
        emb = np.concatenate([p[1] for p in pending])
        pending.clear()
        images = stream[done - len(logits) : done]
        human = _humans(logits, rng)
        clock.now += len(logits) / FPS
        c, c_cpu = time.perf_counter(), time.thread_time()
        decision = ev.evaluate(FrameBatch(logits=logits, embeddings=emb, human=human, images=images))
        d, d_cpu = time.perf_counter(), time.thread_time()
        wall_trig += d - c
        cpu_trig += d_cpu - c_cpu
        kept += int(decision.keep.sum())
        qualified += int(decision.qualified.sum())
    n = len(stream)
    return {"inference_ms": 1e3 * wall_inf / n, "trigger_ms": 1e3 * wall_trig / n,
            "inference_cpu_ms": 1e3 * cpu_inf / n, "trigger_cpu_ms": 1e3 * cpu_trig / n,
            "kept": kept / n, "qualified": qualified / n}


def _tight_loop(spec, bank, logits, emb, images, rng) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """Trigger CPU time per frame with nothing else running in between (warm caches), for reference."""
    out = {}
    for batch in (1, 64):
        clock = _Clock()
        ev = Evaluator(spec, bank=bank, clock=clock)
        _warm_calibration(ev, logits, emb, images, clock, rng)
        human = _humans(logits, rng)
        batches = [FrameBatch(logits=logits[i : i + batch], embeddings=emb[i : i + batch], human=human[i : i + batch],
                              images=images[i : i + batch]) for i in range(0, 1024, batch)]
        t = time.thread_time()
        for b in batches:
            clock.now += batch / FPS
            ev.evaluate(b)
        out[batch] = 1e3 * (time.thread_time() - t) / 1024
    return out


def _novelty_costs(bank: NoveltyBank, emb: np.ndarray) -> dict[str, float]:
    """Novelty alone, in a tight loop (warm caches): indexed vs exhaustive, CPU microseconds per frame
    (best of 3 rounds of 256 frames)."""
    out = {}
    for name, exact in (("indexed", False), ("exhaustive", True)):
        for batch in (1, 64):
            chunks = [emb[i : i + batch] for i in range(0, 256, batch)]
            bank.distance(chunks[0], exact=exact)
            best = math.inf
            for _ in range(3):
                t = time.thread_time()
                for chunk in chunks:
                    bank.distance(chunk, exact=exact)
                best = min(best, time.thread_time() - t)
            out[f"{name}_b{batch}_us"] = 1e6 * best / 256
    return out


def _table(results, warm, novelty, bank: NoveltyBank, build_s: float, frames: int,  # type: ignore[no-untyped-def]
           args) -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"## trigger: per-frame cost vs MobileNetV3-small inference ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_trigger.py --frames {frames} --passes {args.passes} "
        f"--embedding {args.embedding}{' --append' if args.append else ''}`",
        "",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs (load average {args.load:.1f} at the start); Python "
        f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__}; onnxruntime "
        "and BLAS on 1 thread each.",
        f"Spec: entropy (target 2%), margin (target 2%), novelty k=5 (target 1%) against a {len(bank):,}-entry "
        f"bank of {bank.dim}-d embeddings ({bank.n_lists} lists, {bank.default_probe()} probed), human "
        "disagreement (human known on every frame, disagreeing on 3%); dHash dedup; global, per-trigger and "
        f"per-class token buckets. {frames} video-like frames per pass at {FPS:.0f} fps simulated, "
        f"median of {args.passes} passes; inference and evaluation alternate as in the agent loop. "
        "CPU = this thread's CPU time (robust to other jobs on a shared machine); wall = elapsed time.",
        "",
        "| inference batch | triggers evaluated on | inference ms/frame (CPU) | trigger ms/frame (CPU) "
        "| trigger / inference (CPU) | trigger / inference (wall) | fired | kept |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (batch, every), r in results.items():
        med = {key: statistics.median(values) for key, values in r.items()}
        lines.append(
            f"| {batch} | {every} frames | {med['inference_cpu_ms']:.3f} | {med['trigger_cpu_ms']:.4f} | "
            f"**{100 * med['trigger_cpu_ms'] / med['inference_cpu_ms']:.1f}%** | "
            f"{100 * med['trigger_ms'] / med['inference_ms']:.1f}% | "
            f"{100 * med['qualified']:.1f}% | {100 * med['kept']:.1f}% |"
        )
    inf1 = statistics.median(results[1, 1]["inference_cpu_ms"])
    lines += [
        "",
        f"Triggers alone in a tight loop (nothing in between, warm caches): {warm[1]:.4f} ms/frame at batch 1 "
        f"({100 * warm[1] / inf1:.1f}% of batch-1 inference), {warm[64]:.4f} ms/frame at batch 64.",
        "",
        f"Novelty alone (tight loop, warm caches), CPU µs/frame: indexed {novelty['indexed_b1_us']:.0f} at batch 1, "
        f"{novelty['indexed_b64_us']:.0f} at batch 64; exhaustive scan {novelty['exhaustive_b1_us']:.0f} and "
        f"{novelty['exhaustive_b64_us']:.0f}. Building the bank (k-means index): {build_s:.1f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
