"""Pull a labeled snapshot from the hub, with blobs cached locally by sha256, and decode it.

The manifest and blobs come through the hub's API, or straight from its S3-compatible object store
(``store``, :class:`training.objstore.ObjectStoreReader`). The snapshot is refused whole
(:class:`training.errors.SnapshotError`) if its manifest does not match the hash the hub announced, or any blob
is missing or does not hash to its name; the error names the case ids and hashes. Nothing unverified is
written to the cache.

:func:`snapshot_to_imageset` decodes every image into memory; :func:`snapshot_to_mapped` decodes a bounded
chunk at a time into a memory-mapped ``.npy`` file, so a snapshot larger than the machine's memory trains
(``flywheel train --stream``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet.errors import InvalidInput, ProtocolError
from fleet.protocol import SnapshotEntry, decode_manifest
from training.data import ImageSet, decode_image
from training.errors import SnapshotError
from training.hub_client import HubClient
from training.objstore import ObjectStoreReader

log = logging.getLogger(__name__)

CACHE_ENV = "FLYWHEEL_CACHE"
BULK_CHUNK = 256
DECODE_CHUNK = 512  # images decoded at a time when streaming into a mapped file


@dataclass
class Snapshot:
    snapshot_id: str
    task: str
    class_names: list[str]  # what each entry's label means (from the manifest's header)
    entries: list[SnapshotEntry]
    blob_paths: dict[str, Path]  # sha256 -> cached file
    stats: dict[str, Any]


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "flywheel" / "blobs"


def pull_snapshot(
    client: HubClient, snapshot_id: str | None = None, *, cache_dir: Path | None = None, name: str | None = None,
    store: ObjectStoreReader | None = None,
) -> Snapshot:
    """Create (when ``snapshot_id`` is None) or reuse a snapshot, then make every blob present and verified.

    With ``store``, the hub only names the snapshot's manifest (its sha256); the manifest and the blobs are read
    from the object store."""
    expected_sha = None
    if snapshot_id is None:
        created = client.create_snapshot(name)
        snapshot_id, expected_sha = created.snapshot_id, created.manifest_sha256
        log.info("created snapshot %s with %s labels", snapshot_id, created.n_labels)
    if store is None:
        raw, stated_sha = client.snapshot_manifest(snapshot_id)
        expected_sha = expected_sha or stated_sha
    else:
        expected_sha = expected_sha or _manifest_sha(client, snapshot_id)
        got = store.get(expected_sha)
        if got is None:
            raise SnapshotError(f"snapshot {snapshot_id}: its manifest {expected_sha} is not in {store.url}; is "
                                f"--object-store the hub's bucket and prefix?")
        raw = got
    if expected_sha and hashlib.sha256(raw).hexdigest() != expected_sha:
        raise SnapshotError(
            f"snapshot {snapshot_id}: manifest sha256 {hashlib.sha256(raw).hexdigest()} does not match the "
            f"{expected_sha} the hub announced; refusing the snapshot"
        )
    header, entries = parse_manifest(raw, snapshot_id=snapshot_id)
    cache = BlobCache(cache_dir or default_cache_dir())
    wanted = sorted({e.image_sha256 for e in entries})
    cached = {s for s in wanted if cache.get(s) is not None}
    todo = [s for s in wanted if s not in cached]
    missing, corrupt = _fetch_into(client.blobs_bulk if store is None else _from_store(store), cache, todo)
    _refuse_if_bad(snapshot_id, entries, missing, corrupt)
    paths = {s: cache.path(s) for s in wanted}
    stats = {"entries": len(entries), "blobs": len(wanted), "cache_hits": len(cached), "fetched": len(todo),
             "read_from": "hub" if store is None else store.url}
    log.info("snapshot %s: %d entries, %d blobs (%d from cache)", snapshot_id, len(entries), len(wanted), len(cached))
    return Snapshot(snapshot_id, header.task, list(header.class_names), entries, paths, stats)


def snapshot_to_imageset(snap: Snapshot, *, channels: int, size: tuple[int, int]) -> ImageSet:
    """Decode every case's image to (c, h, w) uint8, tagged with the case's tags and ``source=snapshot``."""
    if not snap.entries:
        empty = np.zeros((0, channels, *size), np.uint8)
        return ImageSet(empty, np.zeros(0, np.int64), [], f"snapshot:{snap.snapshot_id}", [])
    images = np.stack([
        decode_image(snap.blob_paths[e.image_sha256].read_bytes(), channels=channels, size=size,
                     what=f"case {e.case_id} (blob {e.image_sha256})")
        for e in snap.entries
    ])
    return _image_set(snap, snap.entries, images)


def snapshot_to_mapped(snap: Snapshot, entries: list[SnapshotEntry], *, channels: int, size: tuple[int, int],
                       path: Path) -> ImageSet:
    """:func:`snapshot_to_imageset` for ``entries`` (of ``snap``), its images decoded :data:`DECODE_CHUNK` at a
    time into the ``.npy`` file ``path`` and mapped read-only: memory holds one chunk, not the snapshot. The file
    is written beside its final name and renamed when whole, then the sha256 of its pixels is written beside it
    (``path`` + ``.sha256``). A file already there (``path`` names the snapshot, the entries and the shape) is
    reused only if it has that shape and its pixels still hash to the recorded sha256; otherwise (damaged on
    disk, or a run that died before recording it) it is decoded again."""
    shape = (len(entries), channels, *size)
    digest_path = path.with_name(path.name + ".sha256")
    if path.is_file():
        mapped, reason = _verified(path, digest_path, shape)
        if mapped is not None:
            return _image_set(snap, entries, mapped)
        log.warning("decoded snapshot file %s %s; decoding again", path, reason)
        digest_path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        h = hashlib.sha256()
        for i in range(0, len(entries), DECODE_CHUNK):
            chunk = entries[i: i + DECODE_CHUNK]
            block = np.stack([
                decode_image(snap.blob_paths[e.image_sha256].read_bytes(), channels=channels, size=size,
                             what=f"case {e.case_id} (blob {e.image_sha256})") for e in chunk
            ]).astype(np.uint8, copy=False)
            out[i: i + len(chunk)] = block
            h.update(block.tobytes())
        out.flush()
        del out
        os.replace(tmp, path)
        _write_atomic(digest_path, h.hexdigest().encode() + b"\n")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return _image_set(snap, entries, np.load(path, mmap_mode="r"))


def _verified(path: Path, digest_path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """(the decoded file ``path`` mapped, "") when it can be reused for ``shape``; else (None, why not). Read and
    hashed a chunk at a time, so checking it costs no more memory than decoding it."""
    try:
        mapped = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        return None, f"cannot be read ({exc})"
    if mapped.shape != shape or mapped.dtype != np.uint8:
        return None, f"holds {mapped.shape} {mapped.dtype} images, not {shape} uint8"
    try:
        expected = digest_path.read_text().strip()
    except OSError:
        return None, f"has no recorded sha256 ({digest_path.name})"
    h = hashlib.sha256()
    for i in range(0, len(mapped), DECODE_CHUNK):
        h.update(np.ascontiguousarray(mapped[i: i + DECODE_CHUNK]).tobytes())
    if h.hexdigest() != expected:
        return None, f"has pixels hashing to {h.hexdigest()}, not the recorded {expected}"
    return mapped, ""


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or not at all (written beside it, then renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _image_set(snap: Snapshot, entries: list[SnapshotEntry], images: np.ndarray) -> ImageSet:
    """``entries``' decoded ``images`` with their labels, tags (plus ``source=snapshot``) and case ids."""
    labels = np.array([getattr(e.label, "label", -1) for e in entries], dtype=np.int64)  # -1: boxes, no class
    tags = [{**e.case.tags, "source": "snapshot"} for e in entries]
    return ImageSet(images, labels, tags, f"snapshot:{snap.snapshot_id}", [e.case_id for e in entries])


def _manifest_sha(client: HubClient, snapshot_id: str) -> str:
    for snap in client.list_snapshots():
        if snap.snapshot_id == snapshot_id:
            return snap.manifest_sha256
    raise InvalidInput(f"the hub has no snapshot {snapshot_id!r}")


def _from_store(store: ObjectStoreReader) -> Callable[[list[str]], tuple[dict[str, bytes], list[str]]]:
    def fetch(chunk: list[str]) -> tuple[dict[str, bytes], list[str]]:
        found = store.get_many(chunk)
        return found, [s for s in chunk if s not in found]
    return fetch


def parse_manifest(raw: bytes, *, snapshot_id: str) -> tuple[Any, list[SnapshotEntry]]:
    """The manifest's header and entries (fleet.protocol.dataset); a malformed line is refused with its line
    number and content."""
    try:
        return decode_manifest(raw, what=f"snapshot {snapshot_id} manifest")
    except ProtocolError as exc:
        raise SnapshotError(str(exc)) from None


class BlobCache:
    """Content-addressed files ``ROOT/ab/abcd....png``; every read and write is verified against the name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.png"

    def get(self, sha256: str) -> bytes | None:
        p = self.path(sha256)
        if not p.is_file():
            return None
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("cached blob %s is corrupt; dropping it and fetching again", sha256)
            p.unlink(missing_ok=True)
            return None
        return data

    def put(self, sha256: str, data: bytes) -> bool:
        """Store ``data`` if it hashes to ``sha256``; return False (and store nothing) if it does not."""
        if hashlib.sha256(data).hexdigest() != sha256:
            return False
        p = self.path(sha256)
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(p, data)
        return True


def _fetch_into(fetch: Callable[[list[str]], tuple[dict[str, bytes], list[str]]], cache: BlobCache,
                todo: list[str]) -> tuple[set[str], dict[str, str]]:
    missing: set[str] = set()
    corrupt: dict[str, str] = {}  # expected -> received hash
    for i in range(0, len(todo), BULK_CHUNK):
        chunk = todo[i: i + BULK_CHUNK]
        found, _ = fetch(chunk)
        for sha in chunk:
            data = found.get(sha)
            if data is None:
                missing.add(sha)
            elif not cache.put(sha, data):
                corrupt[sha] = hashlib.sha256(data).hexdigest()
    return missing, corrupt


def _refuse_if_bad(snapshot_id: str, entries: list[SnapshotEntry], missing: set[str], corrupt: dict[str, str]) -> None:
    if not missing and not corrupt:
        return
    problems = []
    for e in entries:
        if e.image_sha256 in missing:
            problems.append(f"case {e.case_id}: blob {e.image_sha256} is missing on the hub")
        elif e.image_sha256 in corrupt:
            problems.append(
                f"case {e.case_id}: blob {e.image_sha256} is corrupt (its bytes hash to {corrupt[e.image_sha256]})"
            )
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    raise SnapshotError(
        f"snapshot {snapshot_id} refused: {len(missing)} missing and {len(corrupt)} corrupt blob(s) - {shown}"
    )
