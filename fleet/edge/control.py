"""The agent's control thread: heartbeats and assignment polls on their own schedules.

One thread for both keeps a 1-2 core device quiet. An assignment that does not follow the wire
contract is refused with a log line naming what was wrong; the device keeps what it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fleet.edge.campaigns import Campaigns
from fleet.edge.heartbeat import HeartbeatSender
from fleet.edge.hubclient import HubClient
from fleet.edge.ota import OtaManager
from fleet.errors import FlywheelError, ProtocolError, RetryableError, Unauthorized

log = logging.getLogger(__name__)

NO_MODEL_POLL_S = 2.0  # poll this often while the device has no model to run


class ControlLoop:
    def __init__(
        self,
        *,
        client: HubClient,
        ota: OtaManager,
        campaigns: Campaigns,
        heartbeat: HeartbeatSender,
        heartbeat_s: float,
        poll_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ota = ota
        self.campaigns = campaigns
        self.heartbeat = heartbeat
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.clock = clock
        self.polls = 0
        self.refused_assignments = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="flywheel-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def poll(self) -> bool:
        """Fetch the assignment and follow it; False if it could not be fetched or was refused."""
        self.polls += 1
        try:
            assignment = self.client.get_assignment()
        except ProtocolError as exc:
            self.refused_assignments += 1
            log.error("refusing malformed assignment from the hub (keeping the current models): %s", exc)
            return False
        except Unauthorized as exc:
            log.error("the hub refused this device's credentials: %s", exc)
            return False
        except RetryableError as exc:
            log.warning("assignment poll failed; will retry: %s", exc)
            return False
        except FlywheelError as exc:
            log.error("assignment poll refused: %s", exc)
            return False
        if assignment.device_id != self.ota.device_id:
            self.refused_assignments += 1
            log.error("refusing assignment: it is for device %r, this device is %r",
                      assignment.device_id, self.ota.device_id)
            return False
        try:
            # campaigns first: once the first model is in, the frames it sees already have a spec
            self.campaigns.apply(assignment.campaigns,
                                 assignment.active.version if assignment.active is not None else None)
            self.ota.apply(assignment)
        finally:
            self.ota.flush_reports()
            self.campaigns.flush_refusals(self.ota.device_id)
        return True

    def _loop(self) -> None:
        next_poll = next_beat = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            try:
                if now >= next_poll:
                    self.poll()
                    no_model = self.ota.models.active is None
                    next_poll = self.clock() + (min(self.poll_s, NO_MODEL_POLL_S) if no_model else self.poll_s)
                if now >= next_beat:
                    self.heartbeat.send()
                    next_beat = self.clock() + self.heartbeat_s
            except Exception:  # the control thread must outlive any one bad answer
                log.exception("control loop: unexpected error")
                next_poll = max(next_poll, self.clock() + NO_MODEL_POLL_S)
                next_beat = max(next_beat, self.clock() + NO_MODEL_POLL_S)
            self._stop.wait(max(0.01, min(next_poll, next_beat) - self.clock()))
