"""Lineage: the data a model version was trained on, and the versions a case's label went into.

A model's signed manifest names its training data (``data_snapshot``); a snapshot's manifest (content-addressed,
never changed once written) lists the labeled cases it froze. Decoded manifests are cached per worker by their
sha256, so asking about many models of the same snapshot reads it once.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable

from sqlmodel import Session, col, select

from fleet.errors import NotFound
from fleet.hub.context import Hub
from fleet.hub.db import read_session
from fleet.hub.models import CaseRow, LabelRow, ModelVersion, Snapshot
from fleet.protocol import (
    CaseInfluence,
    DeviceContribution,
    LineageEntry,
    ModelLineage,
    SnapshotEntry,
    SnapshotPublic,
    check_name,
    decode_manifest,
)

HUB_SNAPSHOT_PREFIX = "hub-snapshot:"  # how the trainer names a hub snapshot in a manifest (training/report.py)
_CACHED_SNAPSHOTS = 8
_cache_lock = threading.Lock()


def model_lineage(hub: Hub, version: str) -> ModelLineage:
    """The version's parent and training data: its snapshot, each labeled case in it, devices and annotators."""
    check_name(version, "version")
    with read_session(hub.engine) as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise NotFound(f"unknown model version {version!r}")
        named = data_snapshot_of(mv)
        snap = _snapshot(s, named)
    if snap is None:
        return ModelLineage(version=version, parent_version=mv.parent_version, data_snapshot=named)
    entries = snapshot_entries(hub, snap)
    annotators = _annotators(hub, [e.case_id for e in entries])
    devices = Counter(e.case.device_id for e in entries)
    return ModelLineage(
        version=version, parent_version=mv.parent_version, data_snapshot=named, snapshot=snapshot_public(snap),
        entries=[LineageEntry(case_id=e.case_id, device_id=e.case.device_id, label=e.label, status=e.status,
                              annotators=annotators.get(e.case_id, [])) for e in entries],
        devices=[DeviceContribution(device_id=d, cases=n) for d, n in sorted(devices.items())],
        annotators=sorted({a for names in annotators.values() for a in names}),
    )


def case_influence(hub: Hub, case_id: str) -> CaseInfluence:
    """The versions trained on a snapshot that froze ``case_id``'s label (oldest upload first)."""
    check_name(case_id, "case_id")
    with read_session(hub.engine) as s:
        known = s.get(CaseRow, case_id) is not None
        models = s.exec(select(ModelVersion).order_by(col(ModelVersion.uploaded_at))).all()
        by_snapshot: dict[str, list[str]] = {}
        for mv in models:
            named = data_snapshot_of(mv)
            if named is not None:
                by_snapshot.setdefault(hub_snapshot_id(named), []).append(mv.version)
        snaps = s.exec(select(Snapshot).where(col(Snapshot.snapshot_id).in_(list(by_snapshot)))
                       .order_by(col(Snapshot.version))).all() if by_snapshot else []
    holding = [snap for snap in snaps if any(e.case_id == case_id for e in snapshot_entries(hub, snap))]
    if not known and not holding:
        raise NotFound(f"unknown case {case_id!r}: the hub holds no such case and no snapshot froze it")
    versions = {v for snap in holding for v in by_snapshot[snap.snapshot_id]}
    return CaseInfluence(case_id=case_id, versions=[mv.version for mv in models if mv.version in versions],
                         snapshots=[snap.snapshot_id for snap in holding])


def data_snapshot_of(mv: ModelVersion) -> str | None:
    """What the version's manifest names as its training data, as written there."""
    named = (mv.signed_manifest.get("manifest") or {}).get("data_snapshot")
    return named if isinstance(named, str) and named else None


def hub_snapshot_id(named: str) -> str:
    """The hub snapshot id in a manifest's ``data_snapshot`` (``hub-snapshot:snap-00001`` or ``snap-00001``)."""
    return named.removeprefix(HUB_SNAPSHOT_PREFIX)


def snapshot_entries(hub: Hub, snap: Snapshot) -> list[SnapshotEntry]:
    """The snapshot's entries, decoded from its manifest (cached by the manifest's sha256)."""
    cache: OrderedDict[str, list[SnapshotEntry]] = hub.stats.setdefault("snapshot_entries", OrderedDict())
    with _cache_lock:
        hit = cache.get(snap.manifest_sha256)
        if hit is not None:
            cache.move_to_end(snap.manifest_sha256)
            return hit
    try:
        raw = hub.blobs.get(snap.manifest_sha256)
    except KeyError:
        raise NotFound(f"the manifest {snap.manifest_sha256} of snapshot {snap.snapshot_id} is missing from the "
                       f"blob store") from None
    _, entries = decode_manifest(raw, what=f"snapshot {snap.snapshot_id}")
    with _cache_lock:
        cache[snap.manifest_sha256] = entries
        while len(cache) > _CACHED_SNAPSHOTS:
            cache.popitem(last=False)
    return entries


def snapshot_public(snap: Snapshot) -> SnapshotPublic:
    return SnapshotPublic(snapshot_id=snap.snapshot_id, version=snap.version, name=snap.name, n_labels=snap.n_labels,
                          manifest_sha256=snap.manifest_sha256, created_at=snap.created_at)


def _snapshot(s: Session, named: str | None) -> Snapshot | None:
    return None if named is None else s.get(Snapshot, hub_snapshot_id(named)[:64])


def _annotators(hub: Hub, case_ids: Iterable[str]) -> dict[str, list[str]]:
    """Per case, the annotators whose answers the hub holds (sorted)."""
    ids = list(case_ids)
    out: dict[str, set[str]] = {}
    with read_session(hub.engine) as s:
        for i in range(0, len(ids), 500):
            rows = s.exec(select(LabelRow.case_id, LabelRow.annotator)
                          .where(col(LabelRow.case_id).in_(ids[i:i + 500]))).all()
            for case_id, annotator in rows:
                out.setdefault(case_id, set()).add(annotator)
    return {k: sorted(v) for k, v in out.items()}
