"""The model registry: signed uploads, listing, downloads, promotion, retirement and rollback."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from fleet.errors import Conflict, InvalidInput, NotFound, ProtocolError
from fleet.hub import rescore as rescoring
from fleet.hub import rollouts
from fleet.hub.api import (
    AdminCaller,
    AnyCaller,
    HubDep,
    ReaderCaller,
    TrainerCaller,
    message_body,
    message_response,
    multipart_body,
    request_body,
)
from fleet.hub.blobs import hash_file
from fleet.hub.bodies import parse_json
from fleet.hub.context import Hub
from fleet.hub.db import insert_ignore, read_session, write_session
from fleet.hub.keys import keyring
from fleet.hub.models import Blob, ModelVersion
from fleet.protocol import (
    ModelList,
    ModelPublic,
    ModelReceipt,
    PromoteRequest,
    Promotion,
    RescoreProgress,
    RescoreRequest,
    RollbackReceipt,
    RollbackRequest,
    SignedManifest,
    check_name,
)

router = APIRouter(tags=["models"])

_UPLOAD = multipart_body({"onnx": "the ONNX file", "manifest": "the SignedManifest JSON (a field or a file part)"},
                         files=("onnx",))


@router.post("/v1/models", status_code=201, response_model=ModelReceipt, openapi_extra=_UPLOAD,
             responses={200: {"model": ModelReceipt, "description": "the same version was there already"}})
async def upload_model(request: Request, _: TrainerCaller, hub: HubDep) -> Response:
    """multipart: ``onnx`` (file) and ``manifest`` (SignedManifest JSON, a field or a file).

    The ONNX part is spooled to a temporary file by the multipart parser (1 MiB in memory at most),
    then hashed and copied into the blob store in chunks: memory stays bounded whatever its size.
    """
    async with request.form(max_files=2, max_fields=2, max_part_size=hub.settings.max_json_bytes) as form:
        onnx_part, manifest_part = form.get("onnx"), form.get("manifest")
        if not isinstance(onnx_part, UploadFile) or manifest_part is None:
            raise ProtocolError(f"expected multipart parts 'onnx' (file) and 'manifest' (JSON); received parts "
                                f"{sorted(form.keys())}")
        text = await manifest_part.read() if isinstance(manifest_part, UploadFile) else manifest_part
        status, receipt = await run_in_threadpool(register_model, hub, text, onnx_part.file)
    return message_response(receipt, status_code=status)


def register_model(hub: Hub, manifest_text: str | bytes, onnx: BinaryIO | bytes) -> tuple[int, ModelReceipt]:
    """Verify the signed manifest, then the ONNX bytes against it (streamed), then register the version."""
    cfg = hub.settings
    signed = SignedManifest.from_dict(parse_json(manifest_text, "part 'manifest'", max_bytes=cfg.max_json_bytes,
                                                 max_depth=cfg.max_json_depth, invalid=ProtocolError))
    manifest = keyring(hub).verify(signed, now=hub.now())  # IntegrityError -> 422
    fh: BinaryIO = io.BytesIO(onnx) if isinstance(onnx, bytes) else onnx
    start = fh.tell()
    digest, size = hash_file(fh, limit=max(manifest.onnx_size, 0))
    if size != manifest.onnx_size or digest != manifest.onnx_sha256:
        shown = f"more than {manifest.onnx_size}" if size > manifest.onnx_size else f"{size}"
        raise InvalidInput(f"ONNX file is {shown} bytes with sha256 {digest}; the manifest says "
                           f"{manifest.onnx_size} bytes with sha256 {manifest.onnx_sha256}")
    with read_session(hub.engine) as s:
        existing = s.get(ModelVersion, manifest.version)
    if existing is not None:
        if existing.onnx_sha256 == digest and existing.signed_manifest == signed.to_dict():
            return 200, ModelReceipt(version=existing.version, status=existing.status, already=True)
        raise Conflict(f"model version {manifest.version!r} already exists with different bytes or manifest; "
                       f"publish under a new version")
    fh.seek(start)
    sha, created = hub.blobs.put_file(fh, sha256=digest)
    now = hub.now()
    try:
        with write_session(hub.engine) as s:
            s.execute(insert_ignore(hub.engine, Blob.__table__,  # type: ignore[arg-type]
                                    {"sha256": sha, "size": size, "kind": "model", "created_at": now}))
            s.add(ModelVersion(
                version=manifest.version, parent_version=manifest.parent_version, status="candidate",
                onnx_sha256=digest, onnx_size=size, signed_manifest=signed.to_dict(),
                class_names=list(manifest.class_names), embedding_dim=manifest.embedding_dim,
                metrics=dict(manifest.metrics), created_at=manifest.created_at, uploaded_at=now,
                status_changed_at=now,
            ))
    except DBIntegrityError:
        raise Conflict(f"model version {manifest.version!r} was registered concurrently") from None
    except BaseException:
        if created:
            hub.blobs.delete(sha)
        raise
    hub.models.clear()
    return 201, ModelReceipt(version=manifest.version, status="candidate")


@router.get("/v1/models", response_model=ModelList)
def list_models(_: ReaderCaller, hub: HubDep) -> Response:
    """Every registered version, oldest upload first."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(ModelVersion).order_by(col(ModelVersion.uploaded_at))).all()
    return message_response(ModelList(models=[model_public(r) for r in rows]))


@router.get("/v1/models/{version}", response_model=ModelPublic)
def get_model(version: str, _: ReaderCaller, hub: HubDep) -> Response:
    return message_response(model_public(_get(hub, version)))


@router.get("/v1/models/{version}/manifest", response_model=SignedManifest)
def get_manifest(version: str, _: AnyCaller, hub: HubDep) -> Response:
    """The signed manifest exactly as the trainer uploaded it (what the signature covers is not re-encoded)."""
    doc = _get(hub, version).signed_manifest
    return Response(json.dumps(doc, separators=(",", ":"), allow_nan=False), media_type="application/json")


@router.get("/v1/models/{version}/onnx", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the ONNX file"}})
def get_onnx(version: str, _: AnyCaller, hub: HubDep) -> Response:
    mv = _get(hub, version)
    try:
        chunks = hub.blobs.iter_chunks(mv.onnx_sha256)
        first = next(chunks, b"")
    except KeyError:
        raise NotFound(f"ONNX bytes of {version!r} are missing from the blob store") from None

    def stream() -> Iterator[bytes]:
        yield first
        yield from chunks

    return StreamingResponse(stream(), media_type="application/octet-stream",
                             headers={"Content-Length": str(mv.onnx_size), "X-Onnx-Sha256": mv.onnx_sha256})


@router.post("/v1/models/{version}/promote", response_model=Promotion,
             openapi_extra=request_body(PromoteRequest, required=False))
def promote(version: str, principal: AdminCaller, hub: HubDep,
            body: PromoteRequest = message_body(PromoteRequest, optional=True)) -> Response:
    """Promote a version: the first active model at once; over an active one, a rollout to the whole fleet
    that completes after ``promote_hold_s`` unless devices refuse it, or with ``override`` active at once,
    recorded, and still undone if every device refuses it (see fleet.hub.rollouts)."""
    check_name(version, "version")
    with write_session(hub.engine) as s:
        rollout = rollouts.promote_version(hub, s, version, override=body.override, reason=body.reason,
                                           actor=principal.name)
        s.flush()
        mv = s.get(ModelVersion, version)
        assert mv is not None
        out = Promotion(**_model_fields(mv),
                        rollout=rollouts.rollout_status(s, rollout) if rollout is not None else None)
    hub.models.clear()
    return message_response(out)


@router.post("/v1/models/{version}/rescore", response_model=RescoreProgress,
             openapi_extra=request_body(RescoreRequest, required=False))
def rescore(version: str, _: ReaderCaller, hub: HubDep,
            body: RescoreRequest = message_body(RescoreRequest, optional=True)) -> Response:
    """Re-score up to ``limit`` more cases of the pool with ``version`` (fleet.hub.rescore): call again until
    ``remaining`` is 0. The labeler calls it for the active model before it selects."""
    _get(hub, version)
    return message_response(rescoring.rescore(hub, version, limit=body.limit, batch=body.batch))


@router.post("/v1/models/{version}/retire", response_model=ModelPublic)
def retire(version: str, _: AdminCaller, hub: HubDep) -> Response:
    """Retire a version that is not active (a rollout of it is rolled back)."""
    check_name(version, "version")
    with write_session(hub.engine) as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise NotFound(f"unknown model version {version!r}")
        if mv.status == "active":
            raise Conflict(f"{version!r} is the active model; promote or roll back to another first")
        pins = rollouts.pinned_groups(s, version)
        if pins:
            raise Conflict(f"group(s) {', '.join(p.group for p in pins)} run {version!r}; roll another model out "
                           f"to them or unpin them first")
        for running in rollouts.running_rollouts(s):
            if running.group is not None and running.version == version:
                rollouts.rollback(hub, s, running, reason="retired by an operator")
        running = rollouts.running_rollout(s)
        if running is not None and running.version == version:
            rollouts.rollback(hub, s, running, reason="retired by an operator")
        mv.status, mv.status_changed_at = "retired", hub.now()
        s.add(mv)
        return message_response(model_public(mv))


@router.post("/v1/models/rollback", response_model=RollbackReceipt,
             openapi_extra=request_body(RollbackRequest, required=False))
def rollback(_: AdminCaller, hub: HubDep,
             body: RollbackRequest = message_body(RollbackRequest, optional=True)) -> Response:
    """Roll back the running rollout; with none, re-activate ``to`` or the previously active version."""
    with write_session(hub.engine) as s:
        running = rollouts.running_rollout(s)
        if running is not None and body.to is None:
            rollouts.rollback(hub, s, running, reason=body.reason)
            return message_response(RollbackReceipt(rolled_back=running.version, active=running.incumbent,
                                                    rollout_id=running.rollout_id))
        if running is not None:
            rollouts.rollback(hub, s, running, reason=body.reason)
        current = rollouts.active_model(s)
        target = body.to
        if target is None:
            prev = s.exec(select(ModelVersion).where(ModelVersion.status == "retired",
                                                     col(ModelVersion.activated_at).is_not(None))
                          .order_by(col(ModelVersion.activated_at).desc())).first()
            if prev is None:
                raise Conflict("no running rollout and no previously active version to roll back to")
            target = prev.version
        rollouts.promote(hub, s, target)
        return message_response(RollbackReceipt(rolled_back=current.version if current else None, active=target))


def _get(hub: Hub, version: str) -> ModelVersion:
    check_name(version, "version")
    with read_session(hub.engine) as s:
        mv = s.get(ModelVersion, version)
    if mv is None:
        raise NotFound(f"unknown model version {version!r}")
    return mv


def model_public(mv: ModelVersion) -> ModelPublic:
    return ModelPublic(**_model_fields(mv))


def _model_fields(mv: ModelVersion) -> dict[str, Any]:
    return {
        "version": mv.version, "parent_version": mv.parent_version, "status": mv.status, "metrics": dict(mv.metrics),
        "created_at": mv.created_at, "uploaded_at": mv.uploaded_at, "status_changed_at": mv.status_changed_at,
        "activated_at": mv.activated_at, "onnx_sha256": mv.onnx_sha256, "onnx_size": mv.onnx_size,
        "class_names": list(mv.class_names), "embedding_dim": mv.embedding_dim,
    }
