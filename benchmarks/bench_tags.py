"""Memory of the trainer's per-image tags: :class:`training.data.Tags` (one int32 code an image into a table of the
distinct tag dicts) against a list of one dict per image (how the trainer held them before), in one run.

Issue 19.6 asks the trainer to stream its data instead of loading it whole. Under ``--stream`` the images are
mapped from disk, while the tags of every image stay in memory. For each pool size, the tags are an npz's
``tags_train`` strings over a few conditions and devices. Each side parses them and then adds ``source=base``,
as replay mixing does, with :mod:`tracemalloc` running. The figures are the memory held afterwards and the peak
while parsing. The ratio Tags / list is what counts.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_tags.py [--images 10000,100000,1000000] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import append  # noqa: E402
from training.data import Tags, parse_tags  # noqa: E402

CONDITIONS = ("clear", "clear", "clear", "night", "fog", "rain", "blur", "occlusion")


def tag_strings(n: int, seed: int = 0) -> np.ndarray:
    """``n`` tag strings as an npz holds them: a condition and one of 16 devices each."""
    rng = np.random.default_rng(seed)
    cond = rng.integers(0, len(CONDITIONS), n)
    dev = rng.integers(0, 16, n)
    return np.asarray([f"condition={CONDITIONS[c]};device=d{d}" for c, d in zip(cond, dev, strict=True)])


def as_list(raw: np.ndarray) -> list[dict[str, str]]:
    tags = [parse_tags(t) for t in raw.tolist()]
    return [{**t, "source": "base"} for t in tags]


def as_tags(raw: np.ndarray) -> Tags:
    return Tags.parsed(raw).with_tag("source", "base")


def measure(build: Callable[[np.ndarray], Any], raw: np.ndarray) -> tuple[float, float, Any]:
    """(MiB held after, MiB peak while building, what was built)."""
    gc.collect()
    tracemalloc.start()
    out = build(raw)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return held / 2**20, peak / 2**20, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="10000,100000,1000000", help="pool sizes, comma-separated")
    ap.add_argument("--append", type=Path, help="append the table to this RESULTS.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.images.split(",")]
    rows = []
    for n in sizes:
        raw = tag_strings(n)
        list_held, list_peak, listed = measure(as_list, raw)
        tags_held, tags_peak, tags = measure(as_tags, raw)
        if list(tags[:1000]) != listed[:1000] or len(tags) != len(listed):
            raise SystemExit(f"{n} images: Tags and the list of dicts hold different tags")
        del listed
        rows.append((n, raw.nbytes / 2**20, list_held, tags_held, list_peak, tags_peak, len(tags.table)))
        print(f"{n} images: list {list_held:.1f} MiB held ({list_peak:.1f} peak), Tags {tags_held:.2f} MiB held "
              f"({tags_peak:.1f} peak), {len(tags.table)} distinct", flush=True)
    lines = ["| images | tag strings (npz) MiB | list of dicts: held MiB | Tags: held MiB | held, Tags / list | "
             "peak while parsing: list MiB | Tags MiB | distinct tag sets |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, raw_mib, lh, th, lp, tp, distinct in rows:
        lines.append(f"| {n:,} | {raw_mib:.1f} | {lh:.1f} | {th:.2f} | {th / lh:.3f} | {lp:.1f} | {tp:.1f} | "
                     f"{distinct} |")
    body = "\n".join(lines) + (
        "\n\nEach side parses the pool's `tags_train` strings (a condition of 8 and a device of 16) and adds "
        "`source=base`, as replay mixing does; memory from `tracemalloc` (Python allocations and numpy's). "
        "The tag strings themselves are the npz's, read before either side runs and not counted.\n")
    print(body)
    if args.append:
        append(args.append, "Trainer tags: Tags vs a list of dicts per image (bench_tags.py)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
