"""Wall time of one loop turn and of each part, from a real `flywheel demo` run.

Parts: fleet (the agents streaming, flagging and uploading, OTA included), measure (the demo's own
bookkeeping of which errors were uploaded), label (hub selection + labels), train (the trainer as a
process: snapshot pull, train, evaluate, gate, export, sign, publish; its own phases beside it),
control (the random arm's pick, and the part of its retrain that outlasts the flywheel's: the two retrain side
by side, one core each; its own phases beside it), evaluate (both arms on the test set). The baseline in the same
run is the trainer's in-process work; the ratio says how much the loop around it costs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from fleet.sim.demo import DemoSettings, run_demo

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fw-turn-") as tmp:
        t0 = time.monotonic()
        turns, _ = run_demo(DemoSettings(workspace=Path(tmp) / "ws", turns=args.turns, devices=args.devices,
                                         budget=args.budget, seed=args.seed, labeler="oracle"),
                            progress=lambda m: None)
        total = time.monotonic() - t0
    loop = turns[1:]
    names = sorted({k for t in loop for k in t.parts})
    med = {k: statistics.median(t.parts.get(k, 0.0) for t in loop) for k in names}
    turn_s = statistics.median(t.seconds for t in loop)
    trainer_inproc = med.get("train.total", float("nan"))
    rows = ["| part | median seconds per turn | share of the turn |", "|---|---:|---:|"]
    for k in ["fleet", "measure", "label", "train", "control", "evaluate"] + [n for n in names if "." in n]:
        if k in med:
            rows.append(f"| {k} | {med[k]:.2f} | {med[k] / turn_s:.0%} |")
    body = "\n".join(rows) + (
        f"\n\nTurn: {turn_s:.1f} s median over {len(loop)} turns ({args.devices} agents x 300 frames, budget "
        f"{args.budget}); turn 0 (base model) {turns[0].seconds:.1f} s; whole run {total:.0f} s. Baseline in the "
        f"same run: the trainer's in-process work (`train.total`) {trainer_inproc:.2f} s, so a turn is "
        f"{turn_s / trainer_inproc:.1f}x the bare training work; the rest is process start-up (torch, "
        "onnxruntime), the agents' streaming and the random arm's retrain.\n")
    print(body)
    if args.append:
        append(args.append, "Loop turn (flywheel demo, CPU)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
