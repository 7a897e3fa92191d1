"""Send spooled cases to the hub from a background thread, so inference never waits on the network.

Idempotent: each case carries its client-generated ``case_id``; a case is removed from the spool only
once the hub has acknowledged it (201 new, or 200 already there), so a crash between the upload and
the ack costs one duplicate that the hub absorbs. Retryable faults (network, 5xx, 429) back off
exponentially with full jitter and retry the same case; a case the hub refuses for good (another
4xx) is dropped and counted; refused credentials pause the uplink without dropping anything.
Every attempt is charged to a bytes-per-minute budget before it is sent.

Up to ``batch_max_cases`` cases (and ``batch_max_bytes``) go in one request to ``/v1/cases/batch``;
the hub answers each case on its own, and each answer acks, drops or keeps its case exactly as a
single upload's answer would. A hub refusing a whole batch (too many cases, too many bytes) gets
smaller ones. A hub that answers 429 or 503 with ``Retry-After`` is waited for at least that long.

With ``linger_s`` > 0, a batch that is not yet full waits up to that long after the uplink first saw
it for more cases to join it (as a message producer lingers), so a trickle of flagged frames goes
out in a few requests rather than one request per case: every request costs the device CPU and the
hub a transaction. ``drain`` and ``stop`` cut a linger short.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleet.edge.hubclient import HubClient
from fleet.edge.pacing import Backoff, ByteBudget
from fleet.edge.spool import Spool, SpoolItem
from fleet.errors import FlywheelError, PermanentError, ProtocolError, RetryableError, Unauthorized
from fleet.protocol import CaseReceipt

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 400  # bytes of multipart framing and headers per upload, for the budget


@dataclass
class UplinkStats:
    uploaded: int = 0  # acknowledged by the hub (new or already there)
    duplicates: int = 0  # ... of which the hub already had
    retries: int = 0  # retryable failures
    dropped: int = 0  # refused for good
    bytes_sent: int = 0
    batches: int = 0  # requests to the batch endpoint that the hub answered case by case
    state: str = "idle"  # idle | lingering | sending | backoff | unauthorized | stopped
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
        batch_max_cases: int = 16,
        batch_max_bytes: int = 4 * 1024 * 1024,
        linger_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.client = client
        self.budget = ByteBudget(bytes_per_minute)
        self.backoff = backoff or Backoff()
        self.idle_s = idle_s
        self.unauthorized_pause_s = unauthorized_pause_s
        self.batch_max_cases = batch_max_cases
        self.batch_max_bytes = batch_max_bytes
        self.linger_s = linger_s
        self._linger_since: float | None = None  # when the uplink first saw the batch it lingers on
        self._batch_cap = batch_max_cases  # shrinks when the hub refuses a whole batch
        self._clock = clock
        self.stats = UplinkStats()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flush = threading.Event()  # set: send what there is now, no lingering (drain, stop)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="flywheel-uplink", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._flush.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.stats.state = "stopped"

    def wake(self) -> None:
        """Tell an idle uplink that a case was spooled."""
        self._wake.set()

    def drain(self, timeout_s: float) -> bool:
        """Wait until the spool is empty (True) or ``timeout_s`` passes (False). The thread must run."""
        deadline = time.monotonic() + timeout_s
        self._flush.set()
        try:
            while self.spool.stats().items:
                if time.monotonic() >= deadline or self._stop.is_set():
                    return False
                self._wake.set()
                time.sleep(0.05)
            return True
        finally:
            if not self._stop.is_set():
                self._flush.clear()

    def step(self) -> float:
        """Send the next case, or the next batch of cases; return how long to wait before the next step (0: go on)."""
        cap = self._batch_cap
        items = self.spool.peek(cap)
        if not items:
            self.stats.state = "idle"
            self._linger_since = None
            return self.idle_s
        linger = self._linger_left(len(items), cap)
        if linger > 0:
            self.stats.state = "lingering"
            return linger
        costs = [items[0].nbytes + MULTIPART_OVERHEAD]
        wait = self.budget.wait_time(costs[0])
        if wait > 0:
            return min(wait, self.idle_s)  # re-peek afterwards: a higher-priority case may have come
        for item in items[1:]:  # more cases join only while the batch stays within both caps and the budget
            cost = item.nbytes + MULTIPART_OVERHEAD
            total = sum(costs) + cost
            if total > self.batch_max_bytes or not self.budget.fits(total):
                break
            costs.append(cost)
        batch = items[: len(costs)]
        self.budget.consume(sum(costs))
        self.stats.state = "sending"
        if len(batch) == 1:
            return self._send(batch[0], costs[0])
        return self._send_batch(batch, costs)

    # -- private ------------------------------------------------------------------------------

    def _linger_left(self, have: int, cap: int) -> float:
        """Seconds a batch of ``have`` (of at most ``cap``) cases still waits for company; 0: send now."""
        if self.linger_s <= 0 or cap <= 1 or have >= cap or self._flush.is_set():
            self._linger_since = None
            return 0.0
        now = self._clock()
        if self._linger_since is None:
            self._linger_since = now
        left = self._linger_since + self.linger_s - now
        if left <= 0:
            self._linger_since = None
            return 0.0
        return left

    def _send(self, item: SpoolItem, cost: int) -> float:
        try:
            answer: CaseReceipt | FlywheelError = self.client.upload_case(item.case_json, item.image)
        except (RetryableError, PermanentError) as exc:
            answer = exc
        return self._after([self._settle(item, cost, answer)])

    def _send_batch(self, batch: list[SpoolItem], costs: list[int]) -> float:
        try:
            outcomes = self.client.upload_cases([(item.case_json, item.image) for item in batch])
        except Unauthorized as exc:
            return self._after([exc])
        except RetryableError as exc:
            return self._after([exc])
        except ProtocolError as exc:  # an unreadable answer tells nothing: keep all, retry
            return self._after([RetryableError(str(exc))])
        except PermanentError as exc:  # the hub refused the envelope itself: try smaller batches
            self._batch_cap = max(1, len(batch) // 2)
            log.warning("uplink: the hub refused a batch of %d cases (%s); sending at most %d at a time",
                        len(batch), exc, self._batch_cap)
            return 0.0
        self.stats.batches += 1
        return self._after([self._settle(item, cost, outcome)
                            for item, cost, outcome in zip(batch, costs, outcomes, strict=True)])

    def _settle(self, item: SpoolItem, cost: int, outcome: CaseReceipt | FlywheelError) -> str | FlywheelError:
        """Ack or drop one case by the hub's answer ("acked", "dropped"), or keep it (the error that says why)."""
        if isinstance(outcome, (Unauthorized, RetryableError)):
            return outcome  # kept in the spool, sent again later
        if isinstance(outcome, FlywheelError):  # refused for good
            self.stats.dropped += 1
            self.stats.last_error = str(outcome)
            self.spool.drop(item.case_id)
            log.error("uplink: the hub refused case %s for good; dropped it: %s", item.case_id, outcome)
            return "dropped"
        self.spool.ack(item.case_id)
        self.stats.uploaded += 1
        self.stats.bytes_sent += cost
        if outcome.status == "already":
            self.stats.duplicates += 1
        return "acked"

    def _after(self, settled: list[str | FlywheelError]) -> float:
        """How long to wait after a request whose cases were settled so: refused credentials pause, a
        retryable fault backs off (once per request), anything else goes straight on."""
        if "acked" in settled:
            if self.backoff.failures:
                log.info("uplink: hub reachable again after %d failed tries", self.backoff.failures)
            self.backoff.reset()
        unauthorized = next((x for x in settled if isinstance(x, Unauthorized)), None)
        if unauthorized is not None:
            self.stats.state, self.stats.last_error = "unauthorized", str(unauthorized)
            log.error("uplink: the hub refused this device's token; pausing %.0fs: %s", self.unauthorized_pause_s,
                      unauthorized)
            return self.unauthorized_pause_s
        retryable = next((x for x in settled if isinstance(x, RetryableError)), None)
        if retryable is not None:
            self.stats.retries += 1
            self.stats.state, self.stats.last_error = "backoff", str(retryable)
            delay = self.backoff.next_delay(retry_after=getattr(retryable, "retry_after", None))
            log.log(
                logging.WARNING if self.backoff.failures == 1 else logging.DEBUG,
                "uplink: hub unavailable (%s); retry %d in %.2fs", retryable, self.backoff.failures, delay,
            )
            return delay
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
                elif self.stats.state == "lingering":  # new cases join silently; drain or stop cut it short
                    self._flush.wait(delay)
                else:
                    self._stop.wait(delay)
