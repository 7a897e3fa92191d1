"""Labeling bridge benchmark: push throughput into a real Label Studio, and the delay from an annotation's
submission to its label in the hub.

Push: 5,000 tasks through the bridge's bulk path (import in batches with the prediction inline, its score
the queue's round-robin order over the diversity clusters: labeling.push.queue_scores), then, timed apart,
each prediction's ``cluster`` field, which Label Studio's bulk import drops; against a baseline in the same
run: one task and one prediction per request, the way a naive client pushes, on a subset. Reported as tasks/s
and as a ratio, with the order Label Studio holds checked: its scores, and how many clusters its first tasks
cover.

Delay: simulated annotators submit through the Label Studio API while the bridge syncs in a loop;
for every annotation, the time from its creation in Label Studio to the hub accepting its label.
Measured twice: with webhooks (Label Studio -> hub inbox -> bridge) and with reconciliation only.

The hub is the real one (fleet.hub, in-process and served on loopback: tests/labeling/realhub.py). Push
takes the cases the hub serves (its pool, with signed image links) and times only the bridge and Label
Studio: the hub is not on that path. The delay is end to end through the hub: selection, signed images,
the webhook inbox, POST /v1/labels.

    .venv/bin/python benchmarks/bench_labeling.py [--ls-url URL --ls-token TOKEN] [--tasks 5000]

Without --ls-url (or FLYWHEEL_TEST_LS_URL) it starts a Label Studio of its own from .venv-studio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append  # noqa: E402

from labeling.bots import BotSpec, BotTeam  # noqa: E402
from labeling.bridge import Bridge  # noqa: E402
from labeling.config import BridgeConfig  # noqa: E402
from labeling.configs import classification_result  # noqa: E402
from labeling.hub_client import HubClient, SelectedCase  # noqa: E402
from labeling.ledger import Ledger  # noqa: E402
from labeling.push import push_cases, queue_scores, set_clusters  # noqa: E402
from labeling.studio import Studio  # noqa: E402
from labeling.throttle import Throttle  # noqa: E402
from tests.labeling.lsserver import StudioServer, studio_bin  # noqa: E402
from tests.labeling.realhub import DEVICE, LabelingHub, labeling_hub  # noqa: E402
from tests.support.cases import make_case  # noqa: E402
from tests.support.inproc import noise_png  # noqa: E402

CLASSES = ["cat", "dog", "bird", "car"]


def ingest(hub: LabelingHub, n: int, *, prefix: str, select: tuple[int, ...] = ()) -> list[SelectedCase]:
    """``n`` cases into the hub in batches of 64 (small noise images: push never loads them), then read back as
    the hub serves them to the bridge: from its pool, or with ``select`` as selections of those sizes (the default
    strategy, so each case carries its diversity cluster within its selection)."""
    rng = np.random.default_rng(0)
    ids: list[str] = []
    k = len(hub.class_names)
    for start in range(0, n, 64):
        data: dict[str, str] = {}
        files: dict[str, tuple[str, bytes, str]] = {}
        for i in range(min(64, n - start)):
            image = noise_png(start + i)
            probs = rng.dirichlet(np.ones(k)).tolist()
            case = make_case(case_id=f"{prefix}-{start + i:06d}", device_id=DEVICE, model_version=hub.model_version,
                             probs=probs, image=image, embedding=rng.normal(size=16).astype(np.float32))
            data[f"case_{i}"] = case.to_json()
            files[f"image_{i}"] = ("frame.png", image, "image/png")
            ids.append(case.case_id)
        r = hub.client.post("/v1/cases/batch", headers=hub.bearer(DEVICE), data=data, files=files)
        assert r.status_code == 200, r.text
    if select:  # one selection per ``select`` cases, in order (the hub selects at most 5,000 at a time)
        picked: list[SelectedCase] = []
        client = hub.bridge_client()
        for size in select:
            picked += client.select(size).cases
        assert len(picked) == n, f"the hub selected {len(picked)} of {n} cases"
        return picked
    return [hub.selected(c) for c in ids]


def bench_push(studio: Studio, hub: LabelingHub, n_tasks: int, n_baseline: int, batch: int,
               clusters: bool) -> dict[str, float]:
    # the pushed tasks are one selection, as the bridge pushes them; the warm-up and the baseline another
    cases = ingest(hub, n_tasks + n_baseline + 50, prefix=f"push{uuid.uuid4().hex[:4]}",
                   select=(n_tasks, n_baseline + 50))
    bulk, warm, base = cases[:n_tasks], cases[n_tasks:n_tasks + 50], cases[n_tasks + 50:]
    title = f"bench-push-{uuid.uuid4().hex[:6]}"
    bridge = Bridge(studio, hub.bridge_client(), Ledger(":memory:"),
                    BridgeConfig(project_title=title, overlap=1, overlap_share=0.0, batch_size=batch,
                                 cluster_budget_s=0.0))
    try:
        push_cases(bridge, warm)  # warm-up: project, caches, first imports
        set_clusters(bridge)
        t0 = time.perf_counter()
        assert push_cases(bridge, bulk) == n_tasks
        queued_s = time.perf_counter() - t0
        pid = bridge.project_id
        # the order Label Studio holds: its prediction scores against queue_scores, and the clusters its
        # first tasks (by score, as its uncertainty sampling serves them) cover
        given = {t.case_id: t.predictions[0].score for t in studio.iter_tasks(pid, full=True)
                 if t.case_id is not None and t.predictions}
        ours = {c.case_id: c for c in bulk}
        cluster_of = {row.case_id: row.cluster for row in bridge.ledger.tasks() if row.case_id in ours}
        want = queue_scores(bulk, {k: int(v or 0) for k, v in cluster_of.items()})
        in_order = sum(1 for k, v in want.items() if given.get(k) is not None and abs(given[k] - v) < 1e-6)
        k = len(set(cluster_of.values()))
        first = sorted(ours, key=lambda c: given.get(c, float("inf")))[:k]
        covered = len({cluster_of[c] for c in first})
        clusters_s = float("nan")
        if clusters:
            t1 = time.perf_counter()
            set_clusters(bridge)
            clusters_s = time.perf_counter() - t1
        n_clustered = sum(1 for t in studio.iter_tasks(pid, full=True) if t.predictions and
                          t.predictions[0].cluster is not None)
        t0 = time.perf_counter()
        for c in base:
            tid = studio.create_task(pid, {"image": c.image_url, "case_id": c.case_id})
            studio.create_prediction(tid, classification_result(c.predicted_name), model_version=c.model_version,
                                     score=c.score, cluster=c.cluster)
        base_s = time.perf_counter() - t0
    finally:
        studio.delete_project(bridge.project_id)
    base_rate = n_baseline / base_s
    return {
        "tasks": n_tasks, "batch": batch,
        "queued_s": queued_s, "queued_tasks_per_s": n_tasks / queued_s,
        "tasks_in_round_robin_order": in_order, "clusters": k, "clusters_in_first_k": covered,
        "cluster_fields_s": clusters_s, "cluster_fields_per_s": n_tasks / clusters_s,
        "baseline_tasks": n_baseline, "baseline_s": base_s, "baseline_tasks_per_s": base_rate,
        "ratio_queued": n_tasks / queued_s / base_rate,
        "tasks_with_cluster_field": n_clustered,
    }


def bench_delay(studio: Studio, url: str, *, webhooks: bool, n_annotations: int,
                interval_s: float) -> dict[str, object]:
    """From an annotation's creation in Label Studio to the hub's write of its label, end to end through the real
    hub on loopback (the bridge over HTTP too); the hub's own write time of each label is the arrival time."""
    n = 3 * (n_annotations // 3)
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp, \
            labeling_hub(Path(tmp), serve=True, class_names=CLASSES) as real:
        real.add_cases(n)
        title = f"bench-delay-hub-{uuid.uuid4().hex[:6]}"
        config = BridgeConfig(project_title=title, overlap=1, overlap_share=0.0,
                              throttle=Throttle(min_depth=n, max_depth=n),
                              reconcile_every_s=0.0 if not webhooks else 3600,
                              webhook_url=f"{real.public_url}/v1/labeling/webhook" if webhooks else None,
                              webhook_secret=real.webhook_secret if webhooks else None)
        bridge = Bridge(studio, HubClient(real.public_url, real.labeler_token), Ledger(":memory:"), config)
        bridge.sync_once()
        bridge.config = replace(config, throttle=Throttle(min_depth=0, max_depth=0))
        team = BotTeam(url, studio, bridge.project_id, [BotSpec(f"h{i}", 1.0, 0.5) for i in range(3)],
                       real.truth.get, real.class_names)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                started = time.monotonic()
                bridge.sync_once(push=False)
                stop.wait(max(interval_s - (time.monotonic() - started), 0))

        syncer = threading.Thread(target=loop, daemon=True)
        expected = len(bridge.ledger.tasks("open"))  # the hub may drop near-duplicate images
        syncer.start()
        team.start()
        deadline = time.monotonic() + 600
        while len(real.live_labels()) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        team.stop.set()
        stop.set()
        syncer.join(30)
        created = {a.id: a.created_at for t in studio.iter_tasks(bridge.project_id) for a in t.annotations}
        arrived = {lb["annotation_id"]: lb["updated_at"] for lb in real.live_labels()}
        delays = np.array([arrived[a] - created[a] for a in created if a in arrived])
        team.close()
        studio.delete_project(bridge.project_id)
    return {
        "hub": "real (fleet.hub, SQLite)", "path": "webhook" if webhooks else "reconciliation",
        "sync_interval_s": interval_s, "annotations": len(created), "delivered": int(delays.size),
        "p50_s": float(np.percentile(delays, 50)), "p95_s": float(np.percentile(delays, 95)),
        "max_s": float(delays.max()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ls-url", default=os.environ.get("FLYWHEEL_TEST_LS_URL"))
    ap.add_argument("--ls-token", default=os.environ.get("FLYWHEEL_TEST_LS_TOKEN"))
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--baseline", type=int, default=100, help="tasks pushed one by one for the baseline")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--workers", type=int, default=4, help="concurrent requests setting clusters")
    ap.add_argument("--annotations", type=int, default=60)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between bridge turns")
    ap.add_argument("--skip-push", action="store_true")
    ap.add_argument("--skip-cluster-fields", action="store_true",
                    help="do not time setting every prediction's cluster field after the push")
    ap.add_argument("--skip-delay", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--append", type=Path, default=None, help="append the push figures to this RESULTS.md")
    args = ap.parse_args(argv)
    if not 1 <= args.tasks <= 5000 or not 1 <= args.baseline <= 4950:
        ap.error(f"--tasks must be 1-5000 and --baseline 1-4950 (one selection each, the hub selects at most "
                 f"5,000 cases at a time); received {args.tasks} and {args.baseline}")

    server = None
    if not args.ls_url:
        binary = studio_bin()
        if binary is None:
            ap.error("no --ls-url and no .venv-studio/bin/label-studio to start one")
        server = StudioServer(binary, Path(tempfile.mkdtemp(prefix="bench-ls-")))
        print("starting Label Studio ...", flush=True)
        server.start()
        args.ls_url, args.ls_token = server.url, server.token
    results: dict[str, object] = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)"}
    try:
        studio = Studio(args.ls_url, args.ls_token, workers=args.workers)
        results["workers"] = args.workers
        if not args.skip_push:
            with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp, \
                    labeling_hub(Path(tmp), class_names=CLASSES) as hub:
                results["push"] = bench_push(studio, hub, args.tasks, args.baseline, args.batch,
                                             clusters=not args.skip_cluster_fields)
            print(json.dumps(results["push"], indent=1), flush=True)
        if not args.skip_delay:
            results["delay"] = [
                bench_delay(studio, args.ls_url, webhooks=w, n_annotations=args.annotations, interval_s=args.interval)
                for w in (True, False)
            ]
            print(json.dumps(results["delay"], indent=1), flush=True)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.append and "push" in results:
        append(args.append, "Label Studio push with the queue's cluster order (issue 19.8)",
               push_table(results["push"]))
    return 0


def push_table(p: Any) -> str:
    met = "met" if p["queued_s"] <= 30.0 else "**not met**"
    fields = (f"{p['cluster_fields_s']:.1f} s ({p['cluster_fields_per_s']:.1f}/s)"
              if p["cluster_fields_s"] == p["cluster_fields_s"] else "not timed")
    return (
        f"| | seconds | tasks/s | vs one by one |\n|---|---:|---:|---:|\n"
        f"| {p['tasks']} tasks queued (bulk import, batches of {p['batch']}, score = round-robin order over "
        f"clusters) | {p['queued_s']:.1f} | {p['queued_tasks_per_s']:.1f} | {p['ratio_queued']:.1f}x |\n"
        f"| one by one (baseline, {p['baseline_tasks']} tasks: a task request, then a prediction request with "
        f"score and cluster) | {p['baseline_s']:.1f} | {p['baseline_tasks_per_s']:.1f} | 1x |\n\n"
        f"Order Label Studio holds after the import: {p['tasks_in_round_robin_order']} of {p['tasks']} predictions "
        f"carry the queue score; its first {p['clusters']} tasks by score cover {p['clusters_in_first_k']} of the "
        f"{p['clusters']} clusters. Every prediction's `cluster` field, set afterwards one request each (off the "
        f"push's path, {p['tasks_with_cluster_field']} set at the end): {fields}.\n\n"
        f"Target: {p['tasks']} tasks queued with score and cluster order in <= 30 s: {met} "
        f"({p['queued_s']:.1f} s).\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
