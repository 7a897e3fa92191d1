"""Send spooled cases to the hub from a background thread, so inference never waits on the network.

Idempotent: each case carries its client-generated ``case_id``; a case is removed from the spool only
once the hub has acknowledged it (201 new, or 200 already there), so a crash between the upload and
the ack costs one duplicate that the hub absorbs. Retryable faults (network, 5xx, 429) back off
exponentially with full jitter and retry the same case; a case the hub refuses for good (another
4xx) is dropped and counted; refused credentials pause the uplink without dropping anything.
Every attempt is charged to a bytes-per-minute budget before it is sent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from fleet.edge.hubclient import HubClient
from fleet.edge.pacing import Backoff, ByteBudget
from fleet.edge.spool import Spool, SpoolItem
from fleet.errors import PermanentError, RetryableError, Unauthorized

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 400  # bytes of multipart framing and headers per upload, for the budget


@dataclass
class UplinkStats:
    uploaded: int = 0  # acknowledged by the hub (new or already there)
    duplicates: int = 0  # ... of which the hub already had
    retries: int = 0  # retryable failures
    dropped: int = 0  # refused for good
    bytes_sent: int = 0
    state: str = "idle"  # idle | sending | backoff | unauthorized | stopped
    last_error: str = ""


class Uplink:
    """The background sender. ``start()``/``stop()``, or drive it with ``step()`` in tests."""

    def __init__(
        self,
        spool: Spool,
        client: HubClient,
        *,
        bytes_per_minute: int = 0,
        backoff: Backoff | None = None,
        idle_s: float = 1.0,
        unauthorized_pause_s: float = 60.0,
    ) -> None:
        self.spool = spool
        self.client = client
        self.budget = ByteBudget(bytes_per_minute)
        self.backoff = backoff or Backoff()
        self.idle_s = idle_s
        self.unauthorized_pause_s = unauthorized_pause_s
        self.stats = UplinkStats()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="flywheel-uplink", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.stats.state = "stopped"

    def wake(self) -> None:
        """Tell an idle uplink that a case was spooled."""
        self._wake.set()

    def drain(self, timeout_s: float) -> bool:
        """Wait until the spool is empty (True) or ``timeout_s`` passes (False). The thread must run."""
        deadline = time.monotonic() + timeout_s
        while self.spool.stats().items:
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    def step(self) -> float:
        """Try to send the next case; return how long to wait before the next step (0: go on)."""
        items = self.spool.peek(1)
        if not items:
            self.stats.state = "idle"
            return self.idle_s
        item = items[0]
        cost = item.nbytes + MULTIPART_OVERHEAD
        wait = self.budget.wait_time(cost)
        if wait > 0:
            return min(wait, self.idle_s)  # re-peek afterwards: a higher-priority case may have come
        self.budget.consume(cost)
        self.stats.state = "sending"
        return self._send(item, cost)

    # -- private ------------------------------------------------------------------------------

    def _send(self, item: SpoolItem, cost: int) -> float:
        try:
            answer = self.client.upload_case(item.case_json, item.image)
        except Unauthorized as exc:
            self.stats.state, self.stats.last_error = "unauthorized", str(exc)
            log.error("uplink: the hub refused this device's token; pausing %.0fs: %s", self.unauthorized_pause_s, exc)
            return self.unauthorized_pause_s
        except RetryableError as exc:
            self.stats.retries += 1
            self.stats.state, self.stats.last_error = "backoff", str(exc)
            delay = self.backoff.next_delay()
            log.log(
                logging.WARNING if self.backoff.failures == 1 else logging.DEBUG,
                "uplink: hub unavailable (%s); retry %d in %.2fs", exc, self.backoff.failures, delay,
            )
            return delay
        except PermanentError as exc:
            self.stats.dropped += 1
            self.stats.last_error = str(exc)
            self.spool.drop(item.case_id)
            log.error("uplink: the hub refused case %s for good; dropped it: %s", item.case_id, exc)
            return 0.0
        if self.backoff.failures:
            log.info("uplink: hub reachable again after %d failed tries", self.backoff.failures)
        self.backoff.reset()
        self.spool.ack(item.case_id)
        self.stats.uploaded += 1
        self.stats.bytes_sent += cost
        if answer.get("already"):
            self.stats.duplicates += 1
        return 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.step()
            except Exception:  # never let one bad row kill the sender thread
                log.exception("uplink: unexpected error; retrying in %.1fs", self.idle_s)
                delay = self.idle_s
            if delay > 0:
                if self.stats.state == "idle":
                    self._wake.wait(delay)
                    self._wake.clear()
                else:
                    self._stop.wait(delay)
