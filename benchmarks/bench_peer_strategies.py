"""The flywheel's selection against peer strategies in the same loop and run (issue 18): for each seed, the whole
demo (hub, agents, trainer as real processes, the oracle labeler) once per strategy, each with its random arm;
the figure is the labels each strategy needs to reach that run's random arm's final accuracy, as a share of
random's labels (``bench_label_efficiency.py``'s measure). The peers: ``entropy`` (entropy top-k), ``badge``
(BADGE) and ``uncertainty+kcenter`` (core-set), each checked against scikit-activeml on the same arrays in the
tests. Target: the default strategy needs no more labels than the best peer on every seed.

    .venv/bin/python benchmarks/bench_peer_strategies.py --seeds 0 1 2 --append benchmarks/RESULTS.md

A cold start (a few seed frames a class) with the cold-start strategies (issue 18.6):

    .venv/bin/python benchmarks/bench_peer_strategies.py --seeds 0 1 2 --seed-size 30 \
        --strategies uncertainty+diversity typiclust adaptive --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append  # noqa: E402
from bench_label_efficiency import _seed_set, _selection, add_demo_options, run_seed  # noqa: E402

DEFAULT = "uncertainty+diversity"
PEERS = ("entropy", "badge", "uncertainty+kcenter")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_demo_options(p, turns=4, budget=40)
    p.add_argument("--strategies", nargs="+", default=[DEFAULT, *PEERS])
    p.add_argument("--append", type=Path, default=None, help="Append the figures to this RESULTS.md.")
    args = p.parse_args(argv)
    args.task = "classify"
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for seed in args.seeds:
        for strategy in args.strategies:
            r = run_seed(seed, args, strategy=strategy)
            rows.append(r)
            print(json.dumps(r), flush=True)

    def ratio(r: dict) -> str:  # type: ignore[type-arg]
        return "not reached" if r["ratio"] is None else f"{r['ratio']:.2f}"

    lines = ["| seed | " + " | ".join(args.strategies) + " | random's final |",
             "|---|" + "---|" * (len(args.strategies) + 1)]
    verdicts = []
    for seed in args.seeds:
        mine = {r["strategy"]: r for r in rows if r["seed"] == seed}
        lines.append(f"| {seed} | " + " | ".join(f"{ratio(mine[s])} ({mine[s]['flywheel_final']:.3f})"
                                                  for s in args.strategies)
                     + f" | {mine[args.strategies[0]]['random_final']:.3f} |")
        ours = mine.get(DEFAULT)
        peers = [mine[s]["ratio"] for s in args.strategies if s in PEERS and mine[s]["ratio"] is not None]
        if ours is not None and peers:
            verdicts.append(ours["ratio"] is not None and ours["ratio"] <= min(peers) + 1e-9)
    met = bool(verdicts) and all(verdicts)
    how = _selection(args, "the column's strategy")
    target = (f"Target: `{DEFAULT}` needs no more labels than the best peer ({', '.join(PEERS)}) on every seed: "
              f"{'met' if met else 'NOT met'} ({sum(verdicts)} of {len(verdicts)} seeds)." if verdicts else
              f"No target: it compares `{DEFAULT}` with the peers ({', '.join(PEERS)}), and this run does not hold "
              "both.")
    body = "\n".join(lines) + (
        f"\n\nEach cell: labels to reach that run's random arm's final accuracy / random's {args.turns * args.budget} "
        f"labels (the strategy's final accuracy). {target}\n\nSetup: "
        f"`flywheel demo` with the oracle labeler and `--strategy S`, {args.devices} agents x "
        f"{args.frames_per_device} frames per turn, {args.turns} turns of {args.budget} labels per arm, dataset "
        f"{args.dataset or 'digits'}, {_seed_set(args)}; {how}; the pool re-scored by each new active model. Curves "
        "per run are in the JSON lines the command prints.\n")
    print(body)
    if args.append:
        append(args.append, "Selection against peer strategies in the same loop", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
