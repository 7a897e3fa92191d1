"""Find and remove orphan blobs: bytes in the blob store that no case, model, novelty bank or snapshot refers to.

Orphans come from crashes between a blob write and its row (the write order keeps rows from ever
pointing at missing bytes, so the leftovers are always this way round) and from uploads refused
by older hubs after their image was written. Only blobs older than ``min_age_s`` are touched, so an
upload in flight (blob written, row not yet committed) is never swept; the store's
``delete_if_unused`` re-checks each one at the moment it goes. Run it with ``flywheel hub sweep-blobs``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from fleet.hub.blobs import BlobStore
from fleet.hub.db import read_session, write_session
from fleet.hub.models import Blob, CaseRow, ModelVersion, NoveltyBankRow, Snapshot

log = logging.getLogger(__name__)

# every column that names a blob by its sha256
REFERENCES = ((CaseRow, "image_sha256"), (ModelVersion, "onnx_sha256"), (NoveltyBankRow, "sha256"),
              (Snapshot, "manifest_sha256"))
_CHUNK = 500


@dataclass
class SweepReport:
    scanned: int = 0  # blobs in the store
    orphans: int = 0  # ... that nothing refers to and are old enough to go
    too_young: int = 0  # unreferenced, but written less than min_age_s ago (maybe an upload in flight)
    removed: int = 0  # orphans deleted
    rows_removed: int = 0  # rows of the blobs table for bytes nothing refers to
    temp_files_removed: int = 0  # half-written files a crash left (a dry run removes nothing)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def referenced(engine: Engine, shas: Iterable[str]) -> set[str]:
    """The blobs among ``shas`` that some row refers to."""
    wanted = list(dict.fromkeys(shas))
    found: set[str] = set()
    with read_session(engine) as s:
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start:start + _CHUNK]
            for table, column in REFERENCES:
                c = getattr(table, column)
                found.update(s.exec(select(c).where(col(c).in_(chunk)).distinct()).all())
    return found


def sweep_orphan_blobs(engine: Engine, blobs: BlobStore, *, now: float, min_age_s: float = 3600.0,
                       dry_run: bool = False) -> SweepReport:
    """Remove (or with ``dry_run`` only count) the blobs nothing refers to that are older than ``min_age_s``.

    For each orphan its ``blobs`` row goes first (in one statement that re-checks every reference),
    then its bytes (``delete_if_unused`` re-checks again): an upload of the same bytes at that
    moment either finds no row and inserts one, or makes the store keep the file.
    """
    report = SweepReport(dry_run=dry_run)
    cutoff = now - min_age_s
    listed = list(blobs.list_blobs())
    report.scanned = len(listed)
    in_use = _in_use(engine)
    for start in range(0, len(listed), _CHUNK):
        chunk = listed[start:start + _CHUNK]
        used = referenced(engine, [sha for sha, _ in chunk])
        orphans = []
        for sha, written in chunk:
            if sha in used:
                continue
            if written >= cutoff:
                report.too_young += 1
            else:
                orphans.append(sha)
        report.orphans += len(orphans)
        if dry_run or not orphans:
            continue
        report.rows_removed += _delete_rows(engine, orphans)
        report.removed += sum(blobs.delete_if_unused(sha, older_than=cutoff, in_use=in_use) for sha in orphans)
    if dry_run:
        return report
    report.rows_removed += _rows_without_bytes(engine, {sha for sha, _ in listed}, cutoff)
    remove_temp: Callable[[float], int] | None = getattr(blobs, "remove_stale_temp_files", None)
    if remove_temp is not None:
        report.temp_files_removed = remove_temp(cutoff)
    log.info("blob sweep: %s", report.to_dict())
    return report


def _in_use(engine: Engine) -> Callable[[str], bool]:
    return lambda sha: bool(referenced(engine, [sha]))


def _delete_rows(engine: Engine, shas: list[str]) -> int:
    """Delete the ``blobs`` rows of ``shas`` that nothing refers to, checked in the same statement."""
    unused = [~sa.exists().where(getattr(table, column) == Blob.sha256) for table, column in REFERENCES]
    with write_session(engine) as s:
        result = s.execute(sa.delete(Blob).where(col(Blob.sha256).in_(shas), *unused))
    return int(result.rowcount)  # type: ignore[attr-defined]


def _rows_without_bytes(engine: Engine, stored: set[str], cutoff: float) -> int:
    """Delete unreferenced ``blobs`` rows older than ``cutoff`` whose bytes are not in the store at all."""
    with read_session(engine) as s:
        rows = [sha for sha in s.exec(select(Blob.sha256).where(col(Blob.created_at) < cutoff)).all()
                if sha not in stored]
    return sum(_delete_rows(engine, rows[i:i + _CHUNK]) for i in range(0, len(rows), _CHUNK))
