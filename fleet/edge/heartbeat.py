"""Device telemetry: counters the agent loop updates, and the periodic heartbeat built from them.

Counters are cumulative since the agent started (its ``boot_id``); the hub takes differences.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.edge.hubclient import HubClient
from fleet.edge.spool import Spool
from fleet.edge.uplink import UplinkStats
from fleet.errors import FlywheelError
from fleet.protocol import Heartbeat
from fleet.protocol.device import MAX_CLASSES

log = logging.getLogger(__name__)

LATENCY_WINDOW = 2048  # frames kept for p50/p95: recent behaviour, bounded memory


class Telemetry:
    """Thread-safe counters and a sliding window of per-frame latencies (milliseconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frames_seen = 0
        self.flagged = 0
        self.health_failures = 0
        self.human_compared = 0
        self.human_disagreed = 0
        self.challenger_compared = 0
        self.challenger_agreed = 0
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.predicted_version: str | None = None  # the model the histogram below is of
        self._predicted = np.zeros(0, dtype=np.int64)
        self.predicted_none = 0

    def record_batch(
        self,
        *,
        predicted: NDArray[Any],
        latency_ms: float | NDArray[Any],
        flagged: int,
        human: NDArray[Any] | None = None,
        challenger_predicted: NDArray[Any] | None = None,
        challenger_agrees: NDArray[Any] | None = None,
        human_agrees: NDArray[Any] | None = None,
        version: str | None = None,
    ) -> None:
        """One processed batch. ``predicted``: (n,) top-1 classes; ``human``: (n,) with -1 = unknown;
        ``latency_ms``: per-frame latency, one number for all or (n,); ``challenger_predicted``: (n,) or None.
        Entries of -1 in ``predicted``/``challenger_predicted`` (no valid output) are left out of comparisons.
        ``challenger_agrees``: (n,) the agreement already decided per frame (a detector's box sets: 1 agree,
        0 disagree, -1 not comparable), counted instead of comparing ``challenger_predicted``; ``human_agrees``
        the same against the human's boxes, counted with the human comparisons. ``version``: the model that
        predicted (the histogram of predictions starts again when it changes)."""
        n = len(predicted)
        with self._lock:
            if version is not None and version != self.predicted_version:
                self.predicted_version, self._predicted, self.predicted_none = version, self._predicted[:0], 0
            if self.predicted_version is not None:
                labels = np.asarray(predicted, dtype=np.int64)
                known = labels[(labels >= 0) & (labels < MAX_CLASSES)]
                self.predicted_none += int((labels < 0).sum())
                counts = np.bincount(known, minlength=len(self._predicted))
                counts[: len(self._predicted)] += self._predicted
                self._predicted = counts
            self.frames_seen += n
            self.flagged += flagged
            if isinstance(latency_ms, np.ndarray):
                self._latency.extend(latency_ms.tolist())
            else:
                self._latency.extend([latency_ms] * n)
            valid = predicted >= 0
            if human is not None:
                known = valid & (human >= 0)
                self.human_compared += int(known.sum())
                self.human_disagreed += int((predicted[known] != human[known]).sum())
            if challenger_predicted is not None:
                both = valid & (challenger_predicted >= 0)
                self.challenger_compared += int(both.sum())
                self.challenger_agreed += int((predicted[both] == challenger_predicted[both]).sum())
            if challenger_agrees is not None:
                self.challenger_compared += int((challenger_agrees >= 0).sum())
                self.challenger_agreed += int((challenger_agrees == 1).sum())
            if human_agrees is not None:
                self.human_compared += int((human_agrees >= 0).sum())
                self.human_disagreed += int((human_agrees == 0).sum())

    def record_flagged(self, n: int) -> None:
        with self._lock:
            self.flagged += n

    def record_health_failure(self) -> None:
        with self._lock:
            self.health_failures += 1

    def latency_percentiles(self) -> tuple[float, float]:
        with self._lock:
            window = np.fromiter(self._latency, np.float64, len(self._latency))
        if not len(window):
            return 0.0, 0.0
        p50, p95 = np.percentile(window, [50, 95])
        return float(p50), float(p95)

    def predictions(self) -> tuple[str | None, list[int], int]:
        """(model, frames per predicted class, frames with no prediction) since that model became active."""
        with self._lock:
            return self.predicted_version, self._predicted.tolist(), self.predicted_none

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "frames_seen": self.frames_seen, "flagged": self.flagged, "health_failures": self.health_failures,
                "human_compared": self.human_compared, "human_disagreed": self.human_disagreed,
                "challenger_compared": self.challenger_compared, "challenger_agreed": self.challenger_agreed,
            }


def new_boot_id() -> str:
    return uuid.uuid4().hex


class HeartbeatSender:
    """Builds heartbeats from the live parts and posts them; a failed post is logged, never queued."""

    def __init__(
        self,
        *,
        device_id: str,
        telemetry: Telemetry,
        spool: Spool,
        uplink_stats: UplinkStats,
        client: HubClient,
        versions: Callable[[], tuple[str | None, str | None]],
        boot_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.telemetry = telemetry
        self.spool = spool
        self.uplink_stats = uplink_stats
        self.client = client
        self.versions = versions
        self.boot_id = boot_id or new_boot_id()
        self.clock = clock
        self._evicted_at_boot = spool.stats().evicted
        self.sent = 0
        self.failed = 0

    def build(self) -> Heartbeat:
        t = self.telemetry.snapshot()
        spool = self.spool.stats()
        up = self.uplink_stats
        p50, p95 = self.telemetry.latency_percentiles()
        active, challenger = self.versions()
        predicted_version, predicted_counts, predicted_none = self.telemetry.predictions()
        return Heartbeat(
            device_id=self.device_id,
            sent_at=self.clock(),
            boot_id=self.boot_id,
            model_version=active,
            challenger_version=challenger,
            counters={
                "frames_seen": t["frames_seen"],
                "flagged": t["flagged"],
                "uploaded": up.uploaded,
                "evicted": max(0, spool.evicted - self._evicted_at_boot),
                "upload_failures": up.retries + up.dropped,
                "health_failures": t["health_failures"],
            },
            spool_bytes=spool.bytes,
            spool_items=spool.items,
            human_compared=t["human_compared"],
            human_disagreed=t["human_disagreed"],
            challenger_compared=t["challenger_compared"],
            challenger_agreed=t["challenger_agreed"],
            latency_p50_ms=round(p50, 3),
            latency_p95_ms=round(p95, 3),
            predicted_version=predicted_version,
            predicted_counts=predicted_counts,
            predicted_none=predicted_none,
        )

    def send(self) -> bool:
        hb = self.build()
        try:
            self.client.send_heartbeat(hb)
        except FlywheelError as exc:
            self.failed += 1
            log.warning("heartbeat not delivered: %s", exc)
            return False
        self.sent += 1
        return True
