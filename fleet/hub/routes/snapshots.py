"""Versioned dataset snapshots for the trainer, and blob download (one, or many as a tar)."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import col, func, select

from fleet.hub.auth import Principal, require
from fleet.hub.blobs import check_key
from fleet.hub.context import Hub, get_hub
from fleet.hub.db import insert_ignore, read_session, write_session
from fleet.hub.models import Blob, CaseRow, Snapshot
from fleet.hub.schemas import BulkBlobs, SnapshotCreate

router = APIRouter(tags=["snapshots"])

_MEDIA = {"image": "image/png", "manifest": "application/x-ndjson", "model": "application/octet-stream",
          "bank": "application/octet-stream"}


@router.post("/v1/snapshots", status_code=201)
def create_snapshot(body: SnapshotCreate | None = None, _: Principal = Depends(require("trainer")),
                    hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Freeze every accepted or gold label into a JSONL manifest with a new version number."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(CaseRow).where(col(CaseRow.label_status).in_(["accepted", "gold"]))
                      .order_by(CaseRow.case_id)).all()
    lines = [json.dumps({
        "case_id": r.case_id, "label": r.label, "status": r.label_status, "tags": r.tags,
        "image_sha256": r.image_sha256, "model_version": r.model_version, "device_id": r.device_id,
        "captured_at": r.captured_at, "predicted_class": r.predicted_class,
    }, sort_keys=True, separators=(",", ":")) for r in rows]
    data = ("\n".join(lines) + ("\n" if lines else "")).encode()
    sha, _created = hub.blobs.put(data)
    now = hub.now()
    for _attempt in range(5):
        try:
            with write_session(hub.engine) as s:
                s.execute(insert_ignore(hub.engine, Blob.__table__,  # type: ignore[arg-type]
                                        {"sha256": sha, "size": len(data), "kind": "manifest", "created_at": now}))
                version = (s.exec(select(func.max(Snapshot.version))).one() or 0) + 1
                snap = Snapshot(snapshot_id=f"snap-{version:05d}", version=version, name=body.name if body else None,
                                created_at=now, n_labels=len(lines), manifest_sha256=sha)
                s.add(snap)
            break
        except DBIntegrityError:
            continue
    else:
        raise HTTPException(409, detail="snapshot versions kept colliding; retry")
    return {"snapshot_id": snap.snapshot_id, "version": snap.version, "name": snap.name,
            "n_labels": snap.n_labels, "manifest_sha256": sha, "created_at": now}


@router.get("/v1/snapshots")
def list_snapshots(_: Principal = Depends(require("trainer")), hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    with read_session(hub.engine) as s:
        return [r.model_dump() for r in s.exec(select(Snapshot).order_by(Snapshot.version)).all()]


@router.get("/v1/snapshots/{snapshot_id}/manifest")
def snapshot_manifest(snapshot_id: str, _: Principal = Depends(require("trainer")),
                      hub: Hub = Depends(get_hub)) -> Response:
    with read_session(hub.engine) as s:
        snap = s.get(Snapshot, snapshot_id[:64])
    if snap is None:
        raise HTTPException(404, detail=f"unknown snapshot {snapshot_id!r}")
    return Response(hub.blobs.get(snap.manifest_sha256), media_type="application/x-ndjson",
                    headers={"X-Manifest-Sha256": snap.manifest_sha256, "X-Snapshot-Version": str(snap.version)})


@router.get("/v1/blobs/{sha256}")
def get_blob(sha256: str, _: Principal = Depends(require("trainer")), hub: Hub = Depends(get_hub)) -> Response:
    check_key(sha256)
    with read_session(hub.engine) as s:
        blob = s.get(Blob, sha256)
    if blob is None:
        raise HTTPException(404, detail=f"no blob {sha256}")
    return Response(hub.blobs.get(sha256), media_type=_MEDIA.get(blob.kind, "application/octet-stream"))


@router.post("/v1/blobs/bulk")
def bulk_blobs(body: BulkBlobs, _: Principal = Depends(require("trainer")), hub: Hub = Depends(get_hub)) -> Response:
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
