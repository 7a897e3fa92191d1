"""The agent: wires source, runtime, shadow mode, triggers, spool, uplink, heartbeat and OTA together.

Threads: the caller's thread reads the source and runs the models, or hands them to the inference process
(``runtime.inference``, by default on two cores or more: fleet/edge/inference.py); ``decider`` evaluates the trigger
spec over windows of frames and spools what it keeps; ``uplink`` sends spooled cases; ``control`` sends heartbeats and
follows the assignment. Nothing on the inference path waits on the network or the disk.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.edge.campaigns import Campaigns
from fleet.edge.config import VIDEO_KINDS, AgentConfig
from fleet.edge.control import ControlLoop
from fleet.edge.decider import Decider
from fleet.edge.enrollment import load_enrollment
from fleet.edge.heartbeat import HeartbeatSender, Telemetry
from fleet.edge.hubclient import HubClient
from fleet.edge.inference import Chunk, InferenceProcess, resolve_mode
from fleet.edge.modelstore import HealthFrames, ModelStore
from fleet.edge.ota import OtaManager
from fleet.edge.pacing import Backoff
from fleet.edge.recorder import Recorder
from fleet.edge.shadow import Inferred, WindowResult, infer
from fleet.edge.sources import Frame, NpzSource, SourceCursor, open_source, paced
from fleet.edge.spool import Spool
from fleet.edge.uplink import Uplink
from fleet.errors import InvalidInput

log = logging.getLogger(__name__)

ROLLBACK_AFTER_BAD_BATCHES = 3  # consecutive decision windows with NaN/inf outputs before a rollback
WINDOW_MAX_BYTES = 16 * 1024 * 1024  # frame pixels held while a trigger window fills
CURSOR_FILE = "source_cursor.json"  # where an npz source left off (see fleet.edge.sources.SourceCursor)
CURSOR_SAVE_S = 1.0  # how often the cursor is written while running (and once when the agent stops)


@dataclass
class RunSummary:
    frames: int
    flagged: int
    spooled: int
    uploaded: int
    spool_items: int
    evicted: int
    model_version: str | None
    challenger_version: str | None
    stopped_by: str  # "max-frames" | "source-ended" | "signal" | "no-model"


class Agent:
    def __init__(self, config: AgentConfig, *, client: HubClient | None = None,
                 source: Iterable[Frame] | None = None) -> None:
        self.config = config
        enrollment = load_enrollment(config.data_dir)
        if enrollment.device_id != config.device_id:
            raise InvalidInput(
                f"{config.data_dir} is enrolled as {enrollment.device_id!r} but the config says "
                f"{config.device_id!r}; enroll again with --force or fix device_id"
            )
        self.client = client or HubClient.connect(
            config.hub.url, token=enrollment.token, timeout_s=config.hub.timeout_s
        )
        self.source = source
        data = config.data_dir
        self.spool = Spool(data / "spool.db", max_bytes=config.spool.max_bytes)
        self.health = HealthFrames(data / "health_frames.npz", capacity=config.ota.health_frames)
        self.ota = OtaManager(
            ModelStore(data / "models", enrollment.fleet_public_key), self.client,
            device_id=config.device_id, threads=config.runtime.threads, health_frames=self.health.frames,
        )
        self.campaigns = Campaigns(
            self.client, data / "campaigns", default_spec=_read_spec(config.triggers.default_spec)
        )
        self.telemetry = Telemetry()
        up = config.uplink
        self.uplink = Uplink(self.spool, self.client, bytes_per_minute=up.bytes_per_minute,
                             backoff=Backoff(base_s=up.backoff_base_s, cap_s=up.backoff_max_s),
                             batch_max_cases=up.batch_max_cases, batch_max_bytes=up.batch_max_bytes,
                             linger_s=up.linger_s)
        self.recorder = Recorder(self.spool, on_stored=self.uplink.wake)
        self.decider = Decider(device_id=config.device_id, campaigns=self.campaigns, recorder=self.recorder,
                               telemetry=self.telemetry, on_result=self._watch_health,
                               on_spooled=self._advance_cursor)
        self.cursor: SourceCursor | None = None  # set when the agent reads an npz file itself
        self._cursor_next: int | None = None
        self._cursor_saved_at = 0.0
        self.heartbeat = HeartbeatSender(
            device_id=config.device_id, telemetry=self.telemetry, spool=self.spool,
            uplink_stats=self.uplink.stats, client=self.client, versions=lambda: self.ota.models.versions,
        )
        self.control = ControlLoop(
            client=self.client, ota=self.ota, campaigns=self.campaigns, heartbeat=self.heartbeat,
            heartbeat_s=config.heartbeat.interval_s, poll_s=config.ota.poll_interval_s,
        )
        self._stop = threading.Event()
        self._stop_source: Callable[[], None] | None = None
        self._bad_batches = 0
        self._window: list[Inferred] = []
        self._window_frames = 0
        self._window_bytes = 0
        self.inference: InferenceProcess | None = None  # the models' own process (runtime.inference = "process")

    def stop(self) -> None:
        """Ask the loop to finish its batch and shut down cleanly (safe from a signal handler)."""
        self._stop.set()
        if self._stop_source is not None:
            self._stop_source()

    def run(self, *, max_frames: int | None = None) -> RunSummary:
        if max_frames is not None and max_frames < 1:
            raise InvalidInput(f"max_frames must be >= 1; received {max_frames}")
        self.ota.startup()
        if self.config.ota.sync_at_start:  # the hub's assignment before the first frame, not a poll period later
            self.control.poll()
        self._start_inference()
        self.decider.start()
        self.uplink.start()
        self.control.start()
        stopped_by = "source-ended"
        try:
            if not self._wait_for_model():
                stopped_by = "signal" if self._stop.is_set() else "no-model"
            else:
                stopped_by = self._loop(max_frames)
        finally:
            self._shutdown()
        return self._summary(stopped_by)

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self, max_frames: int | None) -> str:
        if self.inference is not None:
            return self._loop_process(max_frames)
        bs = self.config.runtime.batch_size
        batch: list[Frame] = []
        for seen, frame in enumerate(self._frames(), 1):
            batch.append(frame)
            done = max_frames is not None and seen >= max_frames
            if len(batch) >= bs or done:
                self._process(batch)
                batch = []
            if done:
                return "max-frames"
            if self._stop.is_set():
                break
        if batch:
            self._process(batch)
        return "signal" if self._stop.is_set() else "source-ended"

    def _loop_process(self, max_frames: int | None) -> str:
        """The loop with the models in the inference process: frames go out in chunks, sized by how fast the
        process takes them (fleet/edge/inference.py), and come back inferred, in order."""
        stopped_by = "source-ended"
        pending: list[Frame] = []
        for seen, frame in enumerate(self._frames(), 1):
            pending.append(frame)
            self._collect(wait=False)
            done = max_frames is not None and seen >= max_frames
            assert self.inference is not None
            if done or self.inference.wants(len(pending)):
                self._send(pending)
                pending = []
            if done:
                stopped_by = "max-frames"
                break
            if self._stop.is_set():
                stopped_by = "signal"
                break
        else:
            stopped_by = "signal" if self._stop.is_set() else "source-ended"
        assert self.inference is not None
        if pending:
            self._send(pending)
        while self.inference.in_flight:
            self._collect(wait=True)
        self._collect(wait=False)  # chunks the agent ran itself after the last one in flight
        return stopped_by

    def _send(self, frames: list[Frame]) -> None:
        """Hand frames to the inference process, waiting while it holds as many chunks as it may."""
        assert self.inference is not None
        models = self.ota.models
        if models.active is None:  # rolled back to nothing: wait for the hub
            if not self._wait_for_model():
                return
            models = self.ota.models
        while self.inference.full():
            self._collect(wait=True)
        self.inference.submit(Chunk(frames, models, self.config.runtime.batch_size))

    def _collect(self, *, wait: bool) -> None:
        """Take the chunks whose outputs are back (at least one when ``wait``) into the trigger window."""
        assert self.inference is not None
        for chunk, raws in self.inference.done(wait=wait):
            now, bs = time.time(), chunk.batch_size
            for i, raw in enumerate(raws):
                self._accept(Inferred.from_raw(chunk.frames[i * bs:(i + 1) * bs], chunk.models, raw, now=now))

    def _process(self, frames: list[Frame]) -> None:
        models = self.ota.models
        if models.active is None:  # rolled back to nothing: wait for the hub
            if not self._wait_for_model():
                return
            models = self.ota.models
        self._accept(infer(frames, models))

    def _accept(self, inferred: Inferred) -> None:
        """An inferred batch joins the trigger window; a full (or old, or large) window goes to the decider."""
        if self._window and self._window[0].models is not inferred.models:
            self._decide()  # a model swap closes the window: one decision, one model generation
        frames = inferred.frames
        if not self.health.full:
            for f in frames[: self.health.capacity]:
                self.health.offer(f.image)
        self._window.append(inferred)
        self._window_frames += len(frames)
        self._window_bytes += inferred.nbytes
        rt = self.config.runtime
        if (
            self._window_frames >= rt.trigger_window
            or self._window_bytes >= WINDOW_MAX_BYTES
            or time.time() - self._window[0].seen_at >= rt.trigger_max_delay_s
        ):
            self._decide()

    def _decide(self) -> None:
        """Hand the frames inferred since the last decision to the decider thread."""
        window, self._window = self._window, []
        self._window_frames = self._window_bytes = 0
        self.decider.submit(window)

    def _watch_health(self, result: WindowResult) -> None:
        """On the decider thread: roll back a model that keeps giving NaN or infinite outputs."""
        if result.models is None or result.models.active is not self.ota.models.active:
            return  # a window from a model already replaced
        if not result.nonfinite:
            self._bad_batches = 0
            return
        self.telemetry.record_health_failure()
        self._bad_batches += 1
        log.warning("active model gave NaN/inf outputs on %d of %d frames", result.nonfinite, len(result.predicted))
        if self._bad_batches >= ROLLBACK_AFTER_BAD_BATCHES:
            self.ota.rollback(f"NaN or infinite outputs in {self._bad_batches} consecutive windows of frames")
            self._bad_batches = 0

    def _frames(self) -> Iterator[Frame]:
        src = self.source
        if src is None:
            s = self.config.source
            if s.kind == "npz":  # resumable: go on where the last run left off
                self.cursor = SourceCursor(self.config.data_dir / CURSOR_FILE, s.path)
                npz = NpzSource(s.path, loop=s.loop)
                npz.start = min(self.cursor.load(), len(npz))
                if npz.start:
                    log.info("source %s: going on from frame %d of %d (%s)", s.path, npz.start, len(npz),
                             self.cursor.path)
                src = npz
            elif s.kind in VIDEO_KINDS:
                from fleet.edge.video import open_video

                src = open_video(s)
            else:
                src = open_source(s.kind, s.target, loop=s.loop)
        self._stop_source = getattr(src, "stop", None)  # a live source waits to reconnect: stop() ends that
        if self._stop_source is not None and self._stop.is_set():
            self._stop_source()
        return paced(iter(src), self.config.source.fps)

    def _advance_cursor(self, window: Sequence[Inferred]) -> None:
        """On the decider thread, once a window is spooled: the source may go on after its last frame."""
        last = window[-1].frames[-1].position if window and window[-1].frames else None
        if self.cursor is None or last is None:
            return
        self._cursor_next = last + 1
        if time.monotonic() - self._cursor_saved_at >= CURSOR_SAVE_S:
            self._save_cursor()

    def _save_cursor(self) -> None:
        if self.cursor is None or self._cursor_next is None:
            return
        try:
            self.cursor.save(self._cursor_next)
        except OSError as exc:  # a full disk must not stop mining; at worst a restart repeats frames
            log.warning("could not save the source cursor %s: %s", self.cursor.path, exc)
        self._cursor_saved_at = time.monotonic()

    def _wait_for_model(self) -> bool:
        warned = 0.0
        while self.ota.models.active is None:
            if self._stop.is_set():
                return False
            if time.monotonic() - warned > 30:
                log.info("no model to run yet: waiting for the hub to assign one")
                warned = time.monotonic()
            self._stop.wait(0.1)
        return True

    def _start_inference(self) -> None:
        if resolve_mode(self.config.runtime.inference) != "process":
            return
        proc = InferenceProcess()
        try:
            proc.start()
        except RuntimeError as exc:  # mining goes on, slower: the models run in the agent's own thread
            log.error("%s; the models run in the agent's own thread", exc)
            return
        self.inference = proc

    def _shutdown(self) -> None:
        if self.inference is not None:
            self.inference.close()
            self.inference = None
        if self._window:
            self._decide()
        self.control.stop()
        self.decider.stop()
        self._save_cursor()
        drain = self.config.uplink.drain_timeout_s
        if drain > 0 and self.spool.stats().items and not self.uplink.drain(drain):
            log.info("exiting with %d case(s) still spooled; they go out on the next run", self.spool.stats().items)
        self.uplink.stop()
        self.health.flush()
        self.heartbeat.send()
        self.ota.flush_reports()
        self.campaigns.flush_refusals(self.ota.device_id)

    def close(self) -> None:
        self.spool.close()
        self.client.close()

    def _summary(self, stopped_by: str) -> RunSummary:
        t = self.telemetry.snapshot()
        st = self.spool.stats()
        active, challenger = self.ota.models.versions
        return RunSummary(
            frames=t["frames_seen"], flagged=t["flagged"], spooled=self.recorder.stats.stored,
            uploaded=self.uplink.stats.uploaded, spool_items=st.items, evicted=st.evicted,
            model_version=active, challenger_version=challenger, stopped_by=stopped_by,
        )


def _read_spec(path: Path | None) -> dict[str, object] | None:
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"triggers.default_spec {path}: cannot read a JSON spec: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidInput(f"triggers.default_spec {path}: must be a JSON object; received {type(doc).__name__}")
    return doc
