"""Versioned dataset snapshots for the trainer, and blob download (one, or many as a tar)."""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Iterator, Sequence

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import col, func, select

from fleet.errors import Conflict, NotFound
from fleet.hub.api import HubDep, TrainerCaller, message_body, message_response, request_body
from fleet.hub.blobs import check_key
from fleet.hub.context import Hub
from fleet.hub.db import insert_ignore, read_session, write_session
from fleet.hub.ingest import model_info
from fleet.hub.models import Blob, CaseRow, ModelVersion, Snapshot
from fleet.protocol import (
    BlobRequest,
    Case,
    SnapshotCreate,
    SnapshotEntry,
    SnapshotHeader,
    SnapshotList,
    SnapshotPublic,
    check_name,
    encode_manifest,
    parse_prediction,
)

router = APIRouter(tags=["snapshots"])

_MEDIA = {"image": "image/png", "manifest": "application/x-ndjson", "model": "application/octet-stream",
          "bank": "application/octet-stream"}


@router.post("/v1/snapshots", status_code=201, response_model=SnapshotPublic,
             openapi_extra=request_body(SnapshotCreate, required=False))
def create_snapshot(_: TrainerCaller, hub: HubDep,
                    body: SnapshotCreate = message_body(SnapshotCreate, optional=True)) -> Response:
    """Freeze every accepted or gold label into a manifest (fleet.protocol.dataset) with a new version number
    (none yet: 409, and nothing is written).
    Entries go in image order (then case id): the same labeled frames make the same training order in any hub,
    whatever ids the devices gave their cases, so a retrain on them repeats."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(CaseRow).where(col(CaseRow.label_status).in_(["accepted", "gold"]))
                      .order_by(CaseRow.image_sha256, CaseRow.case_id)).all()
        if not rows:  # an empty snapshot would take a version number and teach nothing: refuse, write nothing
            cases, held = s.exec(select(func.count(), func.count(col(CaseRow.label_status)))).one()
            raise Conflict(f"nothing to snapshot: the hub holds no accepted or gold labels yet ({cases} case(s), "
                           f"{held} of them held without a consensus); label cases first")
    task, class_names = _classes(hub, rows)
    entries = [SnapshotEntry(case=Case.from_dict(r.payload), label=parse_prediction(r.label_payload, "label"),
                             status=str(r.label_status)) for r in rows]
    for _attempt in range(5):
        now = hub.now()
        with read_session(hub.engine) as s:
            version = (s.exec(select(func.max(Snapshot.version))).one() or 0) + 1
        snapshot_id = f"snap-{version:05d}"
        header = SnapshotHeader(snapshot_id=snapshot_id, version=version, task=task, class_names=class_names,
                                n_entries=len(entries), created_at=now)
        data = encode_manifest(header, entries)
        sha, created = hub.blobs.put(data)
        try:
            with write_session(hub.engine) as s:
                s.execute(insert_ignore(hub.engine, Blob.__table__,  # type: ignore[arg-type]
                                        {"sha256": sha, "size": len(data), "kind": "manifest", "created_at": now}))
                snap = Snapshot(snapshot_id=snapshot_id, version=version, name=body.name, created_at=now,
                                n_labels=len(entries), manifest_sha256=sha)
                s.add(snap)
        except DBIntegrityError:  # another snapshot took this version meanwhile: number this one again
            if created:
                hub.blobs.delete(sha)
            continue
        return message_response(SnapshotPublic(snapshot_id=snapshot_id, version=version, name=body.name,
                                               n_labels=len(entries), manifest_sha256=sha, created_at=now),
                                status_code=201)
    raise Conflict("snapshot versions kept colliding; retry")


@router.get("/v1/snapshots", response_model=SnapshotList)
def list_snapshots(_: TrainerCaller, hub: HubDep) -> Response:
    with read_session(hub.engine) as s:
        rows = s.exec(select(Snapshot).order_by(Snapshot.version)).all()
    return message_response(SnapshotList(snapshots=[
        SnapshotPublic(snapshot_id=r.snapshot_id, version=r.version, name=r.name, n_labels=r.n_labels,
                       manifest_sha256=r.manifest_sha256, created_at=r.created_at) for r in rows]))


@router.get("/v1/snapshots/{snapshot_id}/manifest", response_class=Response,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "a SnapshotHeader line, then one SnapshotEntry a line"}})
def snapshot_manifest(snapshot_id: str, _: TrainerCaller, hub: HubDep) -> Response:
    check_name(snapshot_id, "snapshot id")  # (PostgreSQL refuses a NUL in text: that was a 500)
    with read_session(hub.engine) as s:
        snap = s.get(Snapshot, snapshot_id) if len(snapshot_id) <= 64 else None  # (a snapshot id has at most 64)
    if snap is None:
        raise NotFound(f"unknown snapshot {snapshot_id!r}")
    return Response(hub.blobs.get(snap.manifest_sha256), media_type="application/x-ndjson",
                    headers={"X-Manifest-Sha256": snap.manifest_sha256, "X-Snapshot-Version": str(snap.version)})


def _classes(hub: Hub, rows: Sequence[CaseRow]) -> tuple[str, list[str]]:
    """The task and class names every label of the snapshot is read against: those of the models that made
    the cases (a model's classes may only extend its parent's, so the longest list names them all), or of
    the active model when nothing is labeled yet."""
    versions = sorted({r.model_version for r in rows})
    if not versions:
        with read_session(hub.engine) as s:
            active = s.exec(select(ModelVersion.version).where(ModelVersion.status == "active")).first()
        versions = [active] if active else []
    infos = [i for i in (model_info(hub, v) for v in versions) if i is not None]
    if not infos:
        return "classify", ["class_0"]
    widest = max(infos, key=lambda i: len(i.class_names))
    tasks = sorted({i.task for i in infos})
    if len(tasks) > 1:
        raise Conflict(f"labeled cases come from models of different tasks {tasks}; a snapshot holds one task's labels")
    for i in infos:
        if list(widest.class_names[:len(i.class_names)]) != list(i.class_names) or i.task != widest.task:
            raise Conflict(f"labeled cases come from models whose classes do not extend one another: "
                           f"{i.version!r} {list(i.class_names)} and {widest.version!r} {list(widest.class_names)}")
    return widest.task, list(widest.class_names)


@router.get("/v1/blobs/{sha256}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the blob's bytes"}})
def get_blob(sha256: str, _: TrainerCaller, hub: HubDep) -> Response:
    check_key(sha256)
    with read_session(hub.engine) as s:
        blob = s.get(Blob, sha256)
    if blob is None:
        raise NotFound(f"no blob {sha256}")
    return Response(hub.blobs.get(sha256), media_type=_MEDIA.get(blob.kind, "application/octet-stream"))


@router.post("/v1/blobs/bulk", response_class=StreamingResponse, openapi_extra=request_body(BlobRequest),
             responses={200: {"content": {"application/x-tar": {}}, "description": "a tar of <sha256>.png"}})
def bulk_blobs(_: TrainerCaller, hub: HubDep, body: BlobRequest = message_body(BlobRequest)) -> Response:
    """A tar of ``<sha256>.png`` members; the shas the hub does not hold are listed in X-Missing."""
    wanted = list(dict.fromkeys(body.sha256s))
    with read_session(hub.engine) as s:
        known: set[str] = set()
        for i in range(0, len(wanted), 500):
            known.update(s.exec(select(Blob.sha256).where(col(Blob.sha256).in_(wanted[i:i + 500]),
                                                          Blob.kind == "image")).all())
    spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 - closed by the stream
    missing = []
    with tarfile.open(fileobj=spool, mode="w") as tar:
        for sha in wanted:
            try:
                data = hub.blobs.get(sha) if sha in known else None
            except KeyError:
                data = None
            if data is None:
                missing.append(sha)
                continue
            info = tarfile.TarInfo(f"{sha}.png")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    size = spool.tell()
    spool.seek(0)

    def stream() -> Iterator[bytes]:
        with spool:
            yield from iter(lambda: spool.read(1 << 20), b"")

    headers = {"X-Missing": ",".join(missing[:200]), "X-Missing-Count": str(len(missing)),
               "Content-Length": str(size)}
    return StreamingResponse(stream(), media_type="application/x-tar", headers=headers)
