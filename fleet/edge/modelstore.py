"""The on-device model store: ``active``, ``previous`` and ``challenger`` slots, swapped atomically.

Layout under ``root``::

    state.json                   {"active": DIR, "previous": DIR|null, "challenger": DIR|null}
    versions/<version>-<sha16>/  model.onnx + manifest.json (the signed manifest, as received)
    incoming/<random>/           downloads in progress

A model enters ``versions/`` only whole and verified (one ``os.replace`` of its folder), and the
slots change only by replacing ``state.json`` (written with fsync). So a crash at any step leaves
``state.json`` pointing at complete folders; :meth:`ModelStore.repair` then clears what the crash
left behind (incoming downloads, folders no slot points at, temp files).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.edge.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, remove_stale_tmp
from fleet.errors import FlywheelError, IntegrityError
from fleet.protocol import KeyRotation, KeyRotationList, ModelManifest, SignedManifest
from fleet.signing import KeyRing, key_id, verify_file_sha256

log = logging.getLogger(__name__)

SLOTS = ("active", "previous", "challenger")
ONNX_NAME = "model.onnx"
ROTATIONS_NAME = "key_rotations.json"  # the fleet key rotations this device follows (fleet.signing.KeyRing)
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class StoredModel:
    """A verified model on disk."""

    dir: Path
    manifest: ModelManifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def onnx_path(self) -> Path:
        return self.dir / ONNX_NAME

    @property
    def sha256(self) -> str:
        return self.manifest.onnx_sha256


def model_dir_name(version: str, sha256: str) -> str:
    return f"{version}-{sha256[:16]}"


class ModelStore:
    def __init__(self, root: str | Path, public_key: str, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.public_key = public_key  # the fleet key pinned at enrollment
        self.clock = clock
        self.versions = self.root / "versions"
        self.incoming = self.root / "incoming"
        for d in (self.root, self.versions, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.rotations_path = self.root / ROTATIONS_NAME
        self.keyring = KeyRing.following(public_key, self._rotations())

    # -- the fleet keys -----------------------------------------------------------------------

    def verify(self, signed: SignedManifest) -> ModelManifest:
        """The manifest, if a fleet key this device trusts signed it and still counts now (fleet.signing.KeyRing)."""
        return self.keyring.verify(signed, now=self.clock())

    def follow_rotations(self, rotations: list[KeyRotation]) -> list[str]:
        """Trust the keys that ``rotations`` announce under keys this device trusts (kept on disk, so a restart
        trusts the same); returns the new keys' ids. A rotation no trusted key signed is refused and logged."""
        accepted: list[KeyRotation] = []
        for r in rotations:
            try:
                if self.keyring.accept(r):
                    accepted.append(r)
            except FlywheelError as exc:
                log.error("refusing a fleet key rotation: %s", exc)
        if accepted:
            atomic_write_bytes(self.rotations_path,
                               KeyRotationList(self._rotations() + accepted).to_json().encode("utf-8"), mode=0o600)
            log.warning("fleet key rotated: trusting %s; %s", [key_id(r.new_public_key) for r in accepted],
                        ", ".join(f"key {k.key_id} until {k.until:.0f}" for k in self.keyring.keys if k.until))
        return [key_id(r.new_public_key) for r in accepted]

    def _rotations(self) -> list[KeyRotation]:
        try:
            return KeyRotationList.from_json(self.rotations_path.read_bytes()).rotations
        except FileNotFoundError:
            return []
        except FlywheelError as exc:
            log.error("model store: %s is unreadable (%s); trusting only the pinned key", self.rotations_path, exc)
            return []

    # -- slots --------------------------------------------------------------------------------

    def state(self) -> dict[str, str | None]:
        """The slot pointers; a missing or unreadable file means empty slots."""
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return dict.fromkeys(SLOTS)
        except (OSError, ValueError) as exc:
            log.error("model store: %s is unreadable (%s); treating every slot as empty", self.state_path, exc)
            return dict.fromkeys(SLOTS)
        if not isinstance(raw, dict):
            return dict.fromkeys(SLOTS)
        return {s: raw.get(s) if isinstance(raw.get(s), str) else None for s in SLOTS}

    def write_state(self, state: dict[str, str | None]) -> None:
        """Point the slots at new folders in one atomic step."""
        atomic_write_json(self.state_path, {s: state.get(s) for s in SLOTS})

    def get(self, slot: str) -> StoredModel | None:
        """The verified model in ``slot``; IntegrityError if its files no longer verify."""
        name = self.state()[slot]
        return None if name is None else self.open_dir(self.versions / name)

    def open_dir(self, directory: Path) -> StoredModel:
        """Verify a model folder: the manifest's signature under the pinned key, then the ONNX hash."""
        try:
            signed = SignedManifest.from_json((directory / MANIFEST_NAME).read_bytes())
        except FileNotFoundError as exc:
            raise IntegrityError(f"model folder {directory.name}: {MANIFEST_NAME} is missing") from exc
        except FlywheelError as exc:
            raise IntegrityError(f"model folder {directory.name}: manifest unreadable: {exc}") from exc
        manifest = self.verify(signed)
        onnx = directory / ONNX_NAME
        if not onnx.is_file():
            raise IntegrityError(f"model folder {directory.name}: {ONNX_NAME} is missing")
        verify_file_sha256(onnx, manifest.onnx_sha256, manifest.onnx_size)
        return StoredModel(dir=directory, manifest=manifest)

    # -- installing ---------------------------------------------------------------------------

    def new_incoming(self) -> Path:
        d = self.incoming / uuid.uuid4().hex
        d.mkdir()
        return d

    def commit(self, staged: Path, manifest: ModelManifest) -> Path:
        """Move a verified staged folder into ``versions/`` (atomic rename); return its final path."""
        for p in staged.iterdir():
            _fsync_file(p)
        fsync_dir(staged)
        final = self.versions / model_dir_name(manifest.version, manifest.onnx_sha256)
        if final.exists():  # the same bytes, already here (say a crash before the pointer moved)
            shutil.rmtree(staged)
        else:
            staged.replace(final)
            fsync_dir(self.versions)
        return final

    def repair(self) -> list[str]:
        """Undo what a crash left half-done; return a line per fix. Safe to call at every start."""
        fixes: list[str] = []
        if remove_stale_tmp(self.root):
            fixes.append("removed a half-written state file")
        for d in list(self.incoming.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
            fixes.append(f"removed incomplete download {d.name}")
        state = self.state()
        changed = False
        for slot in SLOTS:
            name = state[slot]
            if name is not None and not (self.versions / name).is_dir():
                fixes.append(f"slot {slot} pointed at missing folder {name}; cleared")
                state[slot] = None
                changed = True
        if state["active"] is None and state["previous"] is not None:
            state["active"], state["previous"] = state["previous"], None
            fixes.append("no active model; promoted the previous one")
            changed = True
        if changed:
            self.write_state(state)
        fixes += self.collect_garbage(state)
        for line in fixes:
            log.warning("model store repair: %s", line)
        return fixes

    def collect_garbage(self, state: dict[str, str | None] | None = None) -> list[str]:
        """Delete model folders that no slot points at."""
        keep = {v for v in (state or self.state()).values() if v}
        removed = []
        for d in list(self.versions.iterdir()):
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"removed unreferenced model folder {d.name}")
        if removed:
            fsync_dir(self.versions)
        return removed


def _fsync_file(path: Path) -> None:
    import os

    with path.open("rb") as fh:
        os.fsync(fh.fileno())


class HealthFrames:
    """A few real frames kept on disk, for the health check of every new model."""

    def __init__(self, path: str | Path, capacity: int = 8) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self._frames: list[NDArray[Any]] = []
        self._dirty = False
        try:
            with np.load(self.path, allow_pickle=False) as data:
                self._frames = [data[k] for k in sorted(data.files, key=lambda k: int(k[1:]))][:capacity]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("health frames %s unreadable (%s); collecting them again", self.path, exc)

    @property
    def full(self) -> bool:
        return len(self._frames) >= self.capacity

    def frames(self) -> list[NDArray[Any]]:
        return list(self._frames)

    def offer(self, image: NDArray[Any]) -> None:
        """Keep ``image`` if there is room; the set is written once it is full (or on ``flush``)."""
        if self.full:
            return
        self._frames.append(np.array(image, dtype=np.uint8, copy=True))
        self._dirty = True
        if self.full:
            self.flush()

    def flush(self) -> None:
        """Write the kept frames (one atomic write) if they changed since they were read."""
        if not self._dirty:
            return
        buf = io.BytesIO()
        arrays: dict[str, Any] = {f"f{i}": f for i, f in enumerate(self._frames)}
        np.savez(buf, **arrays)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, buf.getvalue())
        self._dirty = False
