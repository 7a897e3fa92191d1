"""The back-office thread: trigger decisions over windows of inferred frames, then spooling the kept ones.

The inference thread only runs the models and hands each full window over; deciding (the trigger
spec), PNG encoding and the spool's fsync happen here, in stream order. onnxruntime releases the
GIL while it computes, so on a two-core device this work overlaps inference instead of adding to it.
The hand-over queue is short and bounded: if the disk falls behind, inference waits rather than
frames being dropped silently or memory growing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from fleet.edge.campaigns import Campaigns
from fleet.edge.heartbeat import Telemetry
from fleet.edge.recorder import Recorder
from fleet.edge.shadow import Inferred, WindowResult, decide

log = logging.getLogger(__name__)

STATE_SAVE_S = 30.0  # how often the trigger state is written while running


class Decider:
    def __init__(
        self,
        *,
        device_id: str,
        campaigns: Campaigns,
        recorder: Recorder,
        telemetry: Telemetry,
        on_result: Callable[[WindowResult], None] = lambda result: None,
        on_spooled: Callable[[Sequence[Inferred]], None] = lambda window: None,
        queue_size: int = 4,
    ) -> None:
        self.device_id = device_id
        self.campaigns = campaigns
        self.recorder = recorder
        self.telemetry = telemetry
        self.on_result = on_result
        self.on_spooled = on_spooled  # after a window's kept frames are in the spool (the source cursor moves)
        self.errors = 0
        self._queue: queue.Queue[Sequence[Inferred] | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._last_save = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flywheel-decider", daemon=True)
        self._thread.start()

    def submit(self, window: Sequence[Inferred]) -> None:
        """Queue a window (blocks while the queue is full); decided inline if the thread is not running."""
        if self._thread is None:
            self.process(window)
        else:
            self._queue.put(window)

    def stop(self, timeout: float = 60.0) -> None:
        """Decide and spool everything already submitted, save the trigger state, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
        self.campaigns.save_state()

    def process(self, window: Sequence[Inferred]) -> WindowResult:
        active = window[0].models.active if window else None
        if active is not None:
            self.campaigns.use_model(active.version)
        with self.campaigns.lock:
            result = decide(window, self.campaigns.current, device_id=self.device_id)
        for capture in result.captures:
            try:
                self.recorder.record(capture)
            except Exception:  # a disk error must not stop the stream; the next capture may succeed
                self.recorder.stats.errors += 1
                log.exception("could not spool a case")
        self.telemetry.record_batch(
            predicted=result.predicted, latency_ms=result.latency_ms, flagged=len(result.captures),
            human=result.human, challenger_predicted=result.challenger_predicted,
            challenger_agrees=result.challenger_agrees, human_agrees=result.human_agrees,
            version=active.version if active is not None else None,
        )
        self.on_result(result)
        self.on_spooled(window)
        if time.monotonic() - self._last_save > STATE_SAVE_S:
            self.campaigns.save_state()
            self._last_save = time.monotonic()
        return result

    def _loop(self) -> None:
        while True:
            window = self._queue.get()
            if window is None:
                return
            try:
                self.process(window)
            except Exception:  # keep deciding: one bad window must not end mining for the whole run
                self.errors += 1
                log.exception("decider: a window of %d frame(s) failed", sum(len(w) for w in window))
