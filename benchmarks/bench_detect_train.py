"""Benchmark the detector trainer's throughput (images/s), against the classifier trainer's in the same run.

Data: synthetic scenes of scikit-learn's digits (``fleet.sim.scenes``), ``--size`` pixels square, one to three
digits each. Detector: ``fcos_tiny`` (torchvision FCOS, ~0.4M parameters), batch 16, AdamW. Baseline in the
same run and on the same canvases: the classifier trainer (mobilenet_v3_small, its model for images of 64 px and
more, batch 64) learning the class of each scene's first digit, as a ratio of images/s. Each figure is the median
epoch after a warm-up run (imports, allocator, cuDNN autotune). The device is recorded: CUDA when torch sees one
(``--device auto``), else the CPU.
The detector's test mAP after ``--epochs`` is reported beside it, so that a faster trainer that learns less shows.

    .venv/bin/python benchmarks/bench_detect_train.py --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import append  # noqa: E402
from fleet.sim.scenes import digit_scenes  # noqa: E402
from training.config import TrainArgs  # noqa: E402
from training.train import main as train_main  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=256, help="training scenes")
    p.add_argument("--size", type=int, default=128, help="canvas side in pixels (a multiple of 32)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the trainer's choice)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--append", type=Path, default=None, help="append the results as markdown to this file")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        body = run(Path(tmp), scenes=a.scenes, size=a.size, epochs=a.epochs, threads=a.threads, device=a.device)
    print(body)
    if a.append:
        append(a.append, "Detector training throughput (bench_detect_train.py)", body)


def run(tmp: Path, *, scenes: int, size: int, epochs: int, threads: int | None, device: str) -> str:
    import torch

    data = write_data(tmp, scenes=scenes, size=size)
    common: dict[str, Any] = dict(epochs=epochs, threads=threads, device=device, augment="none")
    det = dict(data=f"npz:{data['detect']}", task="detect", batch_size=16, **common)
    cls = dict(data=f"npz:{data['classify']}", task="classify", model="mobilenet_v3_small", batch_size=64, **common)
    train_main(TrainArgs(out=tmp / "warm-det", version="warm-det", **{**det, "epochs": 1}))
    train_main(TrainArgs(out=tmp / "warm-cls", version="warm-cls", **{**cls, "epochs": 1}))
    t = time.perf_counter()
    d = train_main(TrainArgs(out=tmp / "det", version="det", **det))
    det_s = time.perf_counter() - t
    c = train_main(TrainArgs(out=tmp / "cls", version="cls", **cls))
    det_ips = statistics.median(h["images_per_s"] for h in d["training"]["history"])
    cls_ips = statistics.median(h["images_per_s"] for h in c["training"]["history"])
    tr = d["training"]
    where = tr["device_name"] if tr["device"].startswith("cuda") else "CPU"
    m = d["metrics"]["test"]
    lines = [
        f"Device: **{where}** ({tr['device']}, torch {torch.__version__}, {tr['threads']} torch threads, amp "
        f"{tr['amp']}).",
        f"Data: {scenes} training scenes of {size}x{size} (1-3 digits each, clutter), {epochs} epochs, median epoch "
        "after a warm-up run.",
        "",
        "| trainer | model | params | batch | images/s | vs classifier |",
        "|---|---|---:|---:|---:|---:|",
        f"| detect | fcos_tiny (FCOS, width 16) | {tr['parameters']:,} | 16 | {det_ips:.1f} | "
        f"{det_ips / cls_ips:.3f}x |",
        f"| classify (baseline) | mobilenet_v3_small | {c['training']['parameters']:,} | 64 | {cls_ips:.1f} | "
        "1.000x |",
        "",
        f"- detector turn: {det_s:.1f} s in all (train {d['timings']['train']:.1f} s, evaluate "
        f"{d['timings']['evaluate']:.1f} s, export {d['timings'].get('export', 0.0):.1f} s); test mAP@[.5:.95] "
        f"{m['map']:.3f}, mAP@.5 {m['map_50']:.3f} on {m['n']} scenes after {epochs} epochs",
        f"- classifier test accuracy {c['metrics']['test']['accuracy']:.3f} (the class of each scene's first digit)",
    ]
    return "\n".join(lines) + "\n"


def write_data(tmp: Path, *, scenes: int, size: int) -> dict[str, Path]:
    """The same canvases as a detection npz (boxes) and a classification npz (the first digit's class)."""
    train = digit_scenes(scenes, seed=1, size=size)
    test = digit_scenes(max(32, scenes // 4), seed=2, size=size, split="test")
    names = np.array(train.class_names)
    det, cls = tmp / "scenes.npz", tmp / "scenes_cls.npz"
    np.savez(det, **train.to_npz_arrays("_train"), **test.to_npz_arrays("_test"), class_names=names)
    first = [np.array([lab[0] if len(lab) else 0 for lab in s.labels]) for s in (train, test)]
    np.savez(cls, x_train=train.images, y_train=first[0], x_test=test.images, y_test=first[1], class_names=names)
    return {"detect": det, "classify": cls}


if __name__ == "__main__":
    main()
