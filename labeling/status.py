"""What ``flywheel label status`` reports: queue depth, throughput, agreement, delivery delay, annotators."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fleet.consensus import score_annotators
from labeling.ledger import Ledger
from labeling.throttle import Throttle, target_depth, throughput


def collect(ledger: Ledger, *, window_s: float = 600.0, throttle: Throttle | None = None,
            now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the CLI prints it; tests read it)."""
    th = throttle or Throttle()
    now = time.time() if now is None else now
    times = np.asarray(ledger.completion_times(since=now - window_s))
    rate = throughput(times, now=now, window_s=window_s)
    delays = np.asarray(ledger.delivery_delays())
    scores = score_annotators(ledger.gold_answers())
    return {
        "project_id": ledger.get("project_id"),
        "class_names": ledger.get("class_names"),
        "model_versions": ledger.version_counts(),
        "queue": {
            "open_slots": ledger.open_slots(),
            "tasks": ledger.state_counts(),
            "target_depth": target_depth(rate, horizon_s=th.horizon_s, min_depth=th.min_depth,
                                         max_depth=th.max_depth),
        },
        "throughput": {"window_s": window_s, "per_second": rate, "per_minute": rate * 60.0},
        "agreement": ledger.agreement_summary(),
        "delivery": {
            "n": int(delays.size),
            "p50_s": float(np.percentile(delays, 50)) if delays.size else None,
            "p95_s": float(np.percentile(delays, 95)) if delays.size else None,
        },
        "annotators": {a: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy} for a, s in scores.items()},
        "hub_refused": int(ledger.get("hub_refused", 0)),
        "webhook_cursor": ledger.get("webhook_cursor"),
    }
