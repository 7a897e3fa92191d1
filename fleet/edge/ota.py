"""Over-the-air model updates: follow the hub's assignment, verify, health-check, swap atomically.

For a new model the steps are: fetch the signed manifest and verify it under the fleet key pinned at
enrollment; check it names the version and hash the assignment asked for; download the ONNX file
into ``incoming/`` and verify its sha256 and size; load it under onnxruntime; run it on a few stored
frames (right output shapes, finite values); only then move it into the store and flip the slot
pointers in one atomic write. Any refusal leaves the running model untouched and is reported to the
hub with its reason. A model that later misbehaves in service is rolled back to the previous slot.

Reports: ``installed`` (version = the new model), ``refused`` (version = the refused model,
previous_version = the one still running), ``rolled_back`` (version = the model abandoned,
previous_version = the one now running).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from fleet.edge.hubclient import HubClient
from fleet.edge.modelstore import MANIFEST_NAME, ONNX_NAME, ModelStore, StoredModel
from fleet.errors import FlywheelError, IntegrityError, PermanentError, ProtocolError, RetryableError
from fleet.inference.runtime import ModelError, ModelRuntime, health_check
from fleet.protocol import Assignment, ModelRef, OtaReport

log = logging.getLogger(__name__)

REFUSAL_TTL_S = 3600.0  # a refused (version, sha256) is not fetched again for this long
MAX_PENDING_REPORTS = 64


@dataclass(frozen=True)
class LoadedModels:
    """What the agent loop runs now; replaced as a whole, so one attribute read sees a consistent pair."""

    active: ModelRuntime | None = None
    challenger: ModelRuntime | None = None

    @property
    def versions(self) -> tuple[str | None, str | None]:
        return (
            self.active.version if self.active else None,
            self.challenger.version if self.challenger else None,
        )


class OtaManager:
    def __init__(
        self,
        store: ModelStore,
        client: HubClient,
        *,
        device_id: str,
        threads: int = 1,
        health_frames: Callable[[], Sequence[NDArray[Any]]] = list,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.client = client
        self.device_id = device_id
        self.threads = threads
        self.health_frames = health_frames
        self.clock = clock
        self.models = LoadedModels()
        self._next = self.models
        self.pending_reports: list[OtaReport] = []
        self._refused: dict[tuple[str, str], float] = {}
        self._lock = threading.RLock()

    # -- start-up -----------------------------------------------------------------------------

    def startup(self) -> LoadedModels:
        """Repair the store after any crash, then load the active model (or fall back) and the challenger."""
        with self._lock:
            self.store.repair()
            active = self._load_slot("active")
            while active is None and self.store.state()["active"] is not None:
                self._abandon_active("the active model failed to verify or load at start-up")
                active = self._load_slot("active")
            challenger = self._load_slot("challenger")
            if challenger is None and self.store.state()["challenger"] is not None:
                self._set_slots(challenger=None)
            self.models = self._next = LoadedModels(active, challenger)
            return self.models

    # -- following the assignment -------------------------------------------------------------

    def apply(self, assignment: Assignment) -> LoadedModels:
        """Bring the slots in line with the assignment; returns the models to run from now on."""
        if assignment.device_id != self.device_id:
            log.error(
                "refusing assignment: it is for device %r, this device is %r", assignment.device_id, self.device_id
            )
            return self.models
        self.store.follow_rotations(assignment.key_rotations)  # a new fleet key, announced under a trusted one
        with self._lock:
            # changes collect in _next and go live together: the loop never sees a new active model
            # without the challenger the same assignment brought
            self._next = self.models
            if assignment.active is not None:
                self._follow_active(assignment.active)
            self._follow_challenger(assignment.challenger, assignment.active)
            self.models = self._next
            return self.models

    def rollback(self, reason: str) -> bool:
        """Replace a misbehaving active model by the previous one; False if there is none that works."""
        with self._lock:
            state = self.store.state()
            if state["previous"] is None:
                log.error("cannot roll back (%s): no previous model is kept", reason)
                return False
            self._abandon_active(reason)
            self.models = self._next = LoadedModels(self._load_slot("active"), self.models.challenger)
            return self.models.active is not None

    def flush_reports(self) -> None:
        """Send the OTA reports the hub has not had yet; keep those that hit a retryable fault."""
        with self._lock:
            pending, self.pending_reports = self.pending_reports, []
        keep = []
        for i, report in enumerate(pending):
            try:
                self.client.send_ota_report(report)
            except RetryableError as exc:
                log.debug("OTA report for %s not delivered yet: %s", report.version, exc)
                keep = pending[i:]
                break
            except PermanentError as exc:
                log.error("hub refused OTA report for %s: %s", report.version, exc)
        with self._lock:
            self.pending_reports = (keep + self.pending_reports)[-MAX_PENDING_REPORTS:]

    # -- private: slots -----------------------------------------------------------------------

    def _follow_active(self, ref: ModelRef) -> None:
        current = self._next.active
        if current is not None and (current.version, current.manifest.onnx_sha256) == (ref.version, ref.onnx_sha256):
            return
        if self._is_refused(ref):
            return
        state = self.store.state()
        prev = self._peek_slot("previous")
        if prev is not None and (prev.version, prev.sha256) == (ref.version, ref.onnx_sha256):
            runtime = self._checked_runtime(prev, ref)  # the hub moved this device back
            if runtime is not None:
                self._set_slots(active=state["previous"], previous=state["active"])
                self._swap_in(runtime, "active")
            return
        staged = self._fetch(ref)
        if staged is None:
            return
        runtime, stored = staged
        self._set_slots(active=stored.dir.name, previous=state["active"],
                        challenger=None if state["challenger"] == stored.dir.name else state["challenger"])
        self._swap_in(runtime, "active")

    def _follow_challenger(self, ref: ModelRef | None, active: ModelRef | None) -> None:
        current = self._next.challenger
        same_as_active = ref is not None and active is not None and _key(ref) == _key(active)
        if ref is None or same_as_active:
            if current is not None or self.store.state()["challenger"] is not None:
                log.info("challenger %s withdrawn", current.version if current else "?")
                self._set_slots(challenger=None)
                self._next = LoadedModels(self._next.active, None)
            return
        if current is not None and (current.version, current.manifest.onnx_sha256) == (ref.version, ref.onnx_sha256):
            return
        if self._is_refused(ref):
            return
        staged = self._fetch(ref)
        if staged is None:
            return
        runtime, stored = staged
        self._set_slots(challenger=stored.dir.name)
        self._swap_in(runtime, "challenger")

    def _fetch(self, ref: ModelRef) -> tuple[ModelRuntime, StoredModel] | None:
        """Download, verify, load and health-check ``ref`` into the store; None on any failure."""
        staged = self.store.new_incoming()
        try:
            signed = self.client.get_manifest(ref.version)
            (staged / MANIFEST_NAME).write_text(signed.to_json())
            manifest = self.store.verify(signed)
            if (manifest.version, manifest.onnx_sha256) != (ref.version, ref.onnx_sha256):
                raise IntegrityError(
                    f"manifest is for {manifest.version} sha256 {manifest.onnx_sha256[:16]}..., but the assignment "
                    f"asked for {ref.version} sha256 {ref.onnx_sha256[:16]}..."
                )
            # the download hashes the bytes as they arrive: no second read of the file to check them
            got = self.client.download_model(ref.version, staged / ONNX_NAME, max_bytes=manifest.onnx_size + 1)
            size = (staged / ONNX_NAME).stat().st_size
            if (got, size) != (manifest.onnx_sha256, manifest.onnx_size):
                raise IntegrityError(f"{ONNX_NAME} of {ref.version}: sha256 {got} and {size} bytes, expected "
                                     f"{manifest.onnx_sha256} and {manifest.onnx_size} bytes")
            runtime = ModelRuntime(staged / ONNX_NAME, manifest, threads=self.threads)
            health_check(runtime, self.health_frames())
            final = self.store.commit(staged, manifest)
        except RetryableError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            log.warning("OTA: could not fetch %s yet (%s); will retry", ref.version, exc)
            return None
        except (PermanentError, ProtocolError) as exc:
            shutil.rmtree(staged, ignore_errors=True)
            self._refuse(ref, str(exc))
            return None
        except OSError as exc:  # a full or failing disk: not the model's fault, try again later
            shutil.rmtree(staged, ignore_errors=True)
            log.error("OTA: could not store %s (%s); will retry", ref.version, exc)
            return None
        runtime.path = final / ONNX_NAME
        return runtime, StoredModel(dir=final, manifest=manifest)

    def _checked_runtime(self, stored: StoredModel, ref: ModelRef) -> ModelRuntime | None:
        try:
            runtime = ModelRuntime(stored.onnx_path, stored.manifest, threads=self.threads)
            health_check(runtime, self.health_frames())
        except ModelError as exc:
            self._refuse(ref, str(exc))
            return None
        return runtime

    def _swap_in(self, runtime: ModelRuntime, slot: str) -> None:
        old = self._next.active if slot == "active" else self._next.challenger
        if slot == "active":
            self._next = LoadedModels(runtime, self._next.challenger)
        else:
            self._next = LoadedModels(self._next.active, runtime)
        log.info("OTA: %s model is now %s (was %s)", slot, runtime.version, old.version if old else None)
        self._report(runtime.version, "installed", f"{slot} model", old.version if old else None)

    def _abandon_active(self, reason: str) -> None:
        """Point ``active`` at ``previous`` and forget the bad model (it is refused from now on)."""
        state = self.store.state()
        bad = self._peek_slot("active")
        self._set_slots(active=state["previous"], previous=None)
        if bad is not None:
            self._refused[(bad.version, bad.sha256)] = self.clock()
        now = self._peek_slot("active")
        bad_version = bad.version if bad else (state["active"] or "unknown").rsplit("-", 1)[0]
        log.error("OTA: rolled back from %s to %s: %s", bad_version, now.version if now else None, reason)
        self._report(bad_version, "rolled_back", reason, now.version if now else None)

    def _load_slot(self, slot: str) -> ModelRuntime | None:
        """Verify and load the model in ``slot``; None (logged) if it is empty or broken."""
        try:
            stored = self.store.get(slot)
            if stored is None:
                return None
            runtime = ModelRuntime(stored.onnx_path, stored.manifest, threads=self.threads)
            health_check(runtime, self.health_frames())
            return runtime
        except FlywheelError as exc:
            log.error("OTA: the %s model does not verify or load: %s", slot, exc)
            return None

    def _peek_slot(self, slot: str) -> StoredModel | None:
        try:
            return self.store.get(slot)
        except FlywheelError:
            return None

    def _set_slots(self, **changes: str | None) -> None:
        state = self.store.state()
        state.update(changes)
        self.store.write_state(state)
        self.store.collect_garbage(state)

    def _is_refused(self, ref: ModelRef) -> bool:
        at = self._refused.get((ref.version, ref.onnx_sha256))
        return at is not None and self.clock() - at < REFUSAL_TTL_S

    def _refuse(self, ref: ModelRef, reason: str) -> None:
        self._refused[(ref.version, ref.onnx_sha256)] = self.clock()
        running = self._next.active.version if self._next.active else None
        log.error("OTA: refused model %s (still running %s): %s", ref.version, running, reason)
        self._report(ref.version, "refused", reason, running)

    def _report(self, version: str, outcome: str, reason: str, previous: str | None) -> None:
        report = OtaReport(
            device_id=self.device_id, version=version, outcome=outcome, reason=reason[:2000],
            previous_version=previous, reported_at=self.clock(),
        )
        self.pending_reports = (self.pending_reports + [report])[-MAX_PENDING_REPORTS:]


def _key(ref: ModelRef) -> tuple[str, str]:
    return ref.version, ref.onnx_sha256
