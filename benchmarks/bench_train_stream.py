"""Benchmark the streaming trainer: how a training run's memory grows with its data, in memory and ``--stream``.

For each pool size in ``--images``, a synthetic set of RGB images (``--size`` pixels square, uncompressed npz,
10 classes, plus a fixed test split of ``--test`` images) is trained for ``--epochs`` by ``python -m training``
in a child process, once as before (the data read into memory; the baseline) and once with ``--stream`` (mapped
files, a batch read at a time). The parent samples the child's ``/proc/PID/status`` every 20 ms for
``RssAnon``: the memory the run needs and the system cannot take back. File pages a mapping reads count in
``VmRSS`` too, but the kernel may drop them under pressure, so they are reported beside it, not as the figure.
The peak includes evaluation (batches of 1,024 test images), which does not depend on the pool; the figure that
matters is how much the peak grows from the smallest pool to the largest. Also: images/s, as a ratio.

    .venv/bin/python benchmarks/bench_train_stream.py --images 10000,40000 --size 64 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import append  # noqa: E402


def make_data(path: Path, n: int, size: int, n_test: int, seed: int = 0) -> int:
    """Images with a class-coloured square on noise, so the model has something to learn; the pool's bytes."""
    rng = np.random.default_rng(seed)
    total = n + n_test
    y = rng.integers(0, 10, total)
    x = np.empty((total, 3, size, size), np.uint8)
    for i in range(0, total, 2048):
        chunk = rng.integers(0, 96, (min(2048, total - i), 3, size, size), dtype=np.uint8)
        for j, label in enumerate(y[i: i + len(chunk)]):
            c, at = int(label) % 3, 4 + int(label) * (size - 12) // 10
            chunk[j, c, at: at + 8, at: at + 8] = 255
        x[i: i + len(chunk)] = chunk
    np.savez(path, x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    return int(x[:n].nbytes)


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def run(data: Path, out: Path, cache: Path, *, stream: bool, epochs: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "training", "--data", f"npz:{data}", "--out", str(out), "--cache-dir", str(cache),
           "--epochs", str(epochs), "--width", "8", "--no-progress", "--augment", "none", "--version", "bench",
           "--stream" if stream else "--no-stream"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[str, int] = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in status_kb(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 3):  # 3: the gate refused (no baseline here: it should not)
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    history = report["training"]["history"]
    return {"seconds": seconds, "anon_mb": peak["RssAnon"] / 1024, "file_mb": peak["RssFile"] / 1024,
            "rss_mb": peak["VmRSS"] / 1024, "images_per_s": float(np.median([h["images_per_s"] for h in history])),
            "accuracy": report["metrics"]["test"]["accuracy"], "streamed": report["data"]["streamed"],
            "data_s": report["timings"]["data"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="10000,40000", help="pool sizes, comma-separated")
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--append", type=Path, help="append the figures to this RESULTS.md")
    a = ap.parse_args()
    sizes = sorted(int(v) for v in a.images.split(","))
    results: dict[tuple[int, bool], dict[str, Any]] = {}
    pool_mb: dict[int, float] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            pool_mb[n] = make_data(root / "data.npz", n, a.size, a.test) / 2**20
            for stream in (False, True):
                results[n, stream] = r = run(root / "data.npz", root / f"run-{stream}", root / "cache", stream=stream,
                                             epochs=a.epochs)
                assert r["streamed"] is stream
                print(n, "stream" if stream else "memory", r, flush=True)
    lines = [f"Pools of {', '.join(f'{n:,}' for n in sizes)} RGB images of {a.size}x{a.size} plus {a.test:,} test "
             f"images, uncompressed npz; smallcnn width 8, {a.epochs} epoch(s), CPU.", "",
             "| pool | run | pool MiB | peak RssAnon MiB | peak RssFile MiB | peak VmRSS MiB | data s | images/s | "
             "wall s | test acc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for stream in (False, True):
            r = results[n, stream]
            lines.append(f"| {n:,} | {'--stream' if stream else 'in memory (baseline)'} | {pool_mb[n]:.0f} | "
                         f"{r['anon_mb']:.0f} | {r['file_mb']:.0f} | {r['rss_mb']:.0f} | {r['data_s']:.1f} | "
                         f"{r['images_per_s']:.0f} | {r['seconds']:.1f} | {r['accuracy']:.3f} |")
    lo, hi = sizes[0], sizes[-1]
    grow = {s: results[hi, s]["anon_mb"] - results[lo, s]["anon_mb"] for s in (False, True)}
    speed = np.median([results[n, True]["images_per_s"] / results[n, False]["images_per_s"] for n in sizes])
    share = results[hi, True]["anon_mb"] / results[hi, False]["anon_mb"]
    lines += ["", f"From {lo:,} to {hi:,} images the pool grows by {pool_mb[hi] - pool_mb[lo]:.0f} MiB; the peak "
              f"anonymous memory grows by {grow[False]:.0f} MiB in memory and by {grow[True]:.0f} MiB with --stream. "
              f"At {hi:,} images, --stream / in memory: {share:.2f}. "
              f"Images/s, --stream / in memory (median over the sizes): {speed:.2f}."]
    body = "\n".join(lines)
    print(body)
    if a.append:
        append(a.append, "Streaming trainer: memory as the data grows, in memory vs --stream (bench_train_stream.py)",
               body)


if __name__ == "__main__":
    main()
