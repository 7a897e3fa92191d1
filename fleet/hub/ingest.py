"""Case ingest: validate a device's case and image, store the image by hash, record the case once."""

from __future__ import annotations

import base64
import json
import logging
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from fastapi import HTTPException
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, select

from fleet.hub.auth import Principal, require_device
from fleet.hub.blobs import sha256_hex
from fleet.hub.context import Hub
from fleet.hub.db import read_session, write_connection
from fleet.hub.models import CaseRow, ModelVersion
from fleet.hub.selection import informativeness
from fleet.protocol import Case

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ModelInfo:
    version: str
    n_classes: int
    embedding_dim: int
    class_names: tuple[str, ...]


def model_info(hub: Hub, version: str) -> ModelInfo | None:
    """A registered model's class count and embedding width (cached per worker)."""
    hit = hub.models.get(version)
    if hit is not None:
        return hit if isinstance(hit, ModelInfo) else None
    with read_session(hub.engine) as s:
        mv = s.get(ModelVersion, version)
    info = None if mv is None else ModelInfo(mv.version, len(mv.class_names), mv.embedding_dim,
                                             tuple(mv.class_names))
    if info is not None:
        hub.models.put(version, info)
    return info


def check_png(data: bytes, *, max_side: int) -> tuple[int, int]:
    """Raise 415 unless ``data`` is one whole PNG of sane size; return (width, height).

    Walks the chunk structure and checks every chunk's CRC (no pixel decoding: cheap, and enough to
    refuse anything that is not a PNG or was cut short or corrupted on the way).
    """
    if not data.startswith(PNG_MAGIC):
        raise HTTPException(415, detail=f"image must be PNG bytes (starting {PNG_MAGIC!r}); received "
                                        f"{len(data)} bytes starting {data[:8]!r}")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise HTTPException(415, detail="image is a truncated PNG: no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    if not (0 < width <= max_side and 0 < height <= max_side):
        raise HTTPException(415, detail=f"image is {width}x{height} pixels; expected 1..{max_side} on each side")
    pos, seen_idat, n = 8, False, len(data)
    while True:
        if pos + 12 > n:
            raise HTTPException(415, detail=f"image is a truncated PNG: chunk header at byte {pos} of {n}")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > n:
            raise HTTPException(415, detail=f"image is a truncated PNG: chunk {kind!r} runs past the end")
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(data[pos + 4 : end]) != crc:
            raise HTTPException(415, detail=f"image is a corrupt PNG: bad CRC in chunk {kind!r}")
        seen_idat = seen_idat or kind == b"IDAT"
        pos = end + 4
        if kind == b"IEND":
            break
    if not seen_idat:
        raise HTTPException(415, detail="image is a PNG without pixel data (no IDAT chunk)")
    if pos != n:
        raise HTTPException(415, detail=f"image has {n - pos} bytes after the PNG's IEND chunk")
    return int(width), int(height)


def ingest_case(hub: Hub, principal: Principal, case_text: str | bytes, image: bytes) -> tuple[int, dict[str, Any]]:
    """Validate and store one case; returns (HTTP status, body). Idempotent on the case id.

    The hot path of the hub: SQLAlchemy Core, one short write transaction (blob row, duplicate
    lookup, case row); a repeated case id fails the insert and is answered from the stored row.
    """
    prepared = prepare_case(hub, principal, case_text, image)
    case, row = prepared.case, prepared.row
    sha, created = hub.blobs.put(image, sha256=case.image_sha256)
    sql = _statements(hub)
    try:
        _store_row(hub, sql, row)
    except (DBIntegrityError, *sql.integrity_errors):
        existing = _existing(hub, case)
        if existing is not None:
            return existing
        _undo_blob(hub, sha, created)
        raise
    except BaseException:
        _undo_blob(hub, sha, created)
        raise
    if row["duplicate_of"]:
        log.info("case %s from %s duplicates %s (image %s)", case.case_id, case.device_id, row["duplicate_of"],
                 sha[:12])
    return 201, {"case_id": case.case_id, "duplicate_of": row["duplicate_of"]}


@dataclass(frozen=True)
class PreparedCase:
    """A case that passed every check, and the ``cases`` row it becomes (blob not stored yet)."""

    case: Case
    image: bytes
    row: dict[str, Any]


def prepare_case(hub: Hub, principal: Principal, case_text: str | bytes, image: bytes) -> PreparedCase:
    """Parse and validate one case and its image for ``principal``; raise a 4xx (or ProtocolError) if bad.

    The single and the batch upload both go through here, so a case is accepted or refused the same
    way whichever endpoint carries it.
    """
    limit = hub.settings.max_json_bytes
    if len(case_text) > limit:
        raise HTTPException(413, detail=f"part 'case' is {len(case_text)} bytes; the limit is {limit}")
    case = Case.from_json(case_text)
    require_device(principal, case.device_id, "case")
    _check_image(hub, case, image)
    probs = np.asarray(case.probs, dtype=np.float64)[None, :]
    embedding, dim = _check_model(hub, case)
    row = {
        "case_id": case.case_id, "device_id": case.device_id, "captured_at": case.captured_at,
        "received_at": hub.now(),
        "model_version": case.model_version, "predicted_class": case.predicted_class, "probs": case.probs,
        "uncertainty": float(informativeness(
            probs, human=np.asarray([-1 if case.human_action is None else case.human_action]),
            challenger=np.asarray([-1 if case.challenger_class is None else case.challenger_class]))[0]),
        "priority": case.priority,
        "scores": case.scores,
        "triggers": [{"name": t.name, "value": t.value, "threshold": t.threshold} for t in case.triggers],
        "campaign_id": case.campaign_id, "campaign_version": case.campaign_version,
        "human_action": case.human_action, "challenger_version": case.challenger_version,
        "challenger_class": case.challenger_class, "challenger_probs": case.challenger_probs, "tags": case.tags,
        "embedding": embedding, "embedding_dim": dim, "image_sha256": case.image_sha256, "image_size": len(image),
        "duplicate_of": None, "state": "unlabeled", "selection_id": None, "label": None, "label_status": None,
    }
    return PreparedCase(case=case, image=image, row=row)


_CASE_COLUMNS = tuple(c.name for c in CaseRow.__table__.columns)  # type: ignore[attr-defined]
_JSON_COLUMNS = frozenset(c.name for c in CaseRow.__table__.columns  # type: ignore[attr-defined]
                          if isinstance(c.type, sa.JSON))


def _pg_case_sql() -> str:
    """Blob row, duplicate lookup and case row in one PostgreSQL statement (atomic by itself)."""
    computed = {
        "duplicate_of": "(SELECT case_id FROM first)",
        "state": "CASE WHEN EXISTS (SELECT 1 FROM first) THEN 'duplicate' ELSE 'unlabeled' END",
    }
    values = ", ".join(computed.get(c) or (f"%({c})s::json" if c in _JSON_COLUMNS else f"%({c})s")
                       for c in _CASE_COLUMNS)
    return (
        "WITH new_blob AS (INSERT INTO blobs (sha256, size, kind, created_at) "
        "VALUES (%(image_sha256)s, %(image_size)s, 'image', %(received_at)s) ON CONFLICT DO NOTHING), "
        "first AS (SELECT case_id FROM cases WHERE image_sha256 = %(image_sha256)s AND duplicate_of IS NULL "
        "ORDER BY received_at LIMIT 1) "
        f"INSERT INTO cases ({', '.join(_CASE_COLUMNS)}) SELECT {values} RETURNING duplicate_of"
    )


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), allow_nan=False)


def _store_row(hub: Hub, sql: _Statements, row: dict[str, Any]) -> None:
    """Insert the blob row and the case row (marking it a duplicate if the image is already held)."""
    if sql.pg_case is not None:  # PostgreSQL: one statement, one round trip, atomic by itself
        params = {c: (_dump(row[c]) if c in _JSON_COLUMNS else row[c]) for c in _CASE_COLUMNS}
        with hub.autocommit_engine().connect() as conn:
            cur = conn.connection.cursor()
            try:
                cur.execute(sql.pg_case, params)
                row["duplicate_of"] = cur.fetchone()[0]
            finally:
                cur.close()
        return
    sha, size, now = row["image_sha256"], row["image_size"], row["received_at"]
    # the driver's cursor directly: this runs once per case, and SQLAlchemy's per-statement overhead
    # would be most of its cost; the transaction (BEGIN IMMEDIATE, commit, rollback) is SQLAlchemy's
    with write_connection(hub.engine) as conn:
        cur = conn.connection.cursor()
        try:
            cur.execute(sql.blob, (sha, size, now))
            cur.execute(sql.first_with_image, (sha,))
            first = cur.fetchone()
            if first is not None:
                row["duplicate_of"], row["state"] = first[0], "duplicate"
            cur.execute(sql.case, [_dump(row[c]) if c in _JSON_COLUMNS else row[c] for c in _CASE_COLUMNS])
        finally:
            cur.close()


@dataclass(frozen=True)
class _Statements:
    blob: str
    first_with_image: str
    case: str
    integrity_errors: tuple[type[BaseException], ...]
    pg_case: str | None = None


def _statements(hub: Hub) -> _Statements:
    """The hot path's SQL in the driver's own parameter style (qmark for sqlite3, format for psycopg)."""
    cached = hub.stats.get("ingest_statements")
    if cached is None:
        sqlite = hub.engine.dialect.name == "sqlite"
        p = "?" if sqlite else "%s"
        values = ", ".join(p if sqlite or c not in _JSON_COLUMNS else f"{p}::json" for c in _CASE_COLUMNS)
        dbapi = hub.engine.dialect.dbapi
        cached = hub.stats["ingest_statements"] = _Statements(
            blob=f"INSERT INTO blobs (sha256, size, kind, created_at) VALUES ({p}, {p}, 'image', {p}) "
                 f"ON CONFLICT DO NOTHING",
            first_with_image=f"SELECT case_id FROM cases WHERE image_sha256 = {p} AND duplicate_of IS NULL "
                             f"ORDER BY received_at LIMIT 1",
            case=f"INSERT INTO cases ({', '.join(_CASE_COLUMNS)}) VALUES ({values})",
            integrity_errors=(dbapi.IntegrityError,) if dbapi is not None else (),
            pg_case=None if sqlite else _pg_case_sql(),
        )
    return cached  # type: ignore[no-any-return]


def _check_image(hub: Hub, case: Case, image: bytes) -> None:
    limit = hub.settings.max_image_bytes
    if len(image) > limit:
        raise HTTPException(413, detail=f"image is {len(image)} bytes; the limit is {limit}")
    if len(image) != case.image_size:
        raise HTTPException(422, detail=f"image is {len(image)} bytes but case.image_size says {case.image_size}")
    digest = sha256_hex(image)
    if digest != case.image_sha256:
        raise HTTPException(422, detail=f"image sha256 is {digest} but case.image_sha256 says {case.image_sha256}")
    check_png(image, max_side=hub.settings.max_image_side)


def _check_model(hub: Hub, case: Case) -> tuple[bytes | None, int | None]:
    info = model_info(hub, case.model_version)
    if info is None:
        raise HTTPException(422, detail=f"unknown model version {case.model_version!r}; register it at "
                                        f"POST /v1/models before devices report cases from it")
    if len(case.probs) != info.n_classes:
        raise HTTPException(422, detail=f"probs has {len(case.probs)} classes; model {info.version!r} has "
                                        f"{info.n_classes}")
    if case.challenger_version is not None:
        ch = model_info(hub, case.challenger_version)
        if ch is None:
            raise HTTPException(422, detail=f"unknown challenger version {case.challenger_version!r}")
        if case.challenger_probs is not None and len(case.challenger_probs) != ch.n_classes:
            raise HTTPException(422, detail=f"challenger_probs has {len(case.challenger_probs)} classes; model "
                                            f"{ch.version!r} has {ch.n_classes}")
        if case.challenger_class is not None and case.challenger_class >= ch.n_classes:
            raise HTTPException(422, detail=f"challenger_class {case.challenger_class} is out of range for "
                                            f"{ch.n_classes} classes")
    if case.human_action is not None and case.human_action >= info.n_classes:
        raise HTTPException(422, detail=f"human_action {case.human_action} is out of range for "
                                        f"{info.n_classes} classes")
    if case.embedding is None:
        return None, None
    raw = base64.b64decode(case.embedding)
    dim = len(raw) // 2
    if dim != info.embedding_dim:
        raise HTTPException(422, detail=f"embedding has {dim} values; model {info.version!r} has "
                                        f"embedding_dim {info.embedding_dim}")
    return raw, dim


def _existing(hub: Hub, case: Case) -> tuple[int, dict[str, Any]] | None:
    with read_session(hub.engine) as s:
        owner = s.exec(select(CaseRow.device_id).where(CaseRow.case_id == case.case_id)).first()
    if owner is None:
        return None
    if owner != case.device_id:
        raise HTTPException(409, detail=f"case id {case.case_id!r} was already sent by another device")
    return 200, {"case_id": case.case_id, "already": True}


def _undo_blob(hub: Hub, sha: str, created: bool) -> None:
    """Remove a blob this request created if no case ended up referring to it."""
    if not created:
        return
    try:
        with read_session(hub.engine) as s:
            used = s.exec(select(CaseRow.case_id).where(CaseRow.image_sha256 == sha).limit(1)).first()
        if used is None:
            hub.blobs.delete(sha)
    except Exception:  # the database is what failed; leave the blob (content-addressed, harmless)
        log.exception("could not check blob %s after a failed ingest", sha)


def decode_embedding_bytes(raw: bytes | None) -> np.ndarray | None:
    return None if raw is None else np.frombuffer(raw, dtype="<f2").astype(np.float32)


__all__ = ["ingest_case", "prepare_case", "PreparedCase", "check_png", "model_info", "Session"]
