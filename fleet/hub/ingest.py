"""Case ingest: validate a device's case and image, store the image by hash, record the case once."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import col, select

from fleet.errors import Conflict, PayloadTooLarge, ProtocolError
from fleet.hub.auth import Principal, require_device
from fleet.hub.blobs import sha256_hex
from fleet.hub.bodies import parse_json
from fleet.hub.context import Hub
from fleet.hub.db import read_session, write_connection, write_session
from fleet.hub.images import check_png
from fleet.hub.models import CaseRow, ModelVersion
from fleet.hub.quota import admit, throttled
from fleet.hub.selection import box_informativeness, informativeness
from fleet.protocol import Case, CaseReceipt, Classification, Detection
from trigger.boxes import Boxes

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelInfo:
    version: str
    n_classes: int
    embedding_dim: int
    class_names: tuple[str, ...]
    task: str = "classify"
    operating_threshold: float = 0.0  # a detector's: the boxes it reports score at least this


def model_info(hub: Hub, version: str) -> ModelInfo | None:
    """A registered model's task, class count and embedding width (cached per worker)."""
    hit = hub.models.get(version)
    if hit is not None:
        return hit if isinstance(hit, ModelInfo) else None
    with read_session(hub.engine) as s:
        mv = s.get(ModelVersion, version)
    manifest = {} if mv is None else (mv.signed_manifest.get("manifest") or {})
    info = None if mv is None else ModelInfo(
        mv.version, len(mv.class_names), mv.embedding_dim, tuple(mv.class_names),
        str(manifest.get("task", "classify")),
        float((manifest.get("detector") or {}).get("operating_threshold", 0.0)))
    if info is not None:
        hub.models.put(version, info)
    return info


def ingest_case(hub: Hub, principal: Principal, case_text: str | bytes, image: bytes) -> tuple[int, CaseReceipt]:
    """Validate and store one case; returns (HTTP status, body). Idempotent on the case id.

    The hot path of the hub: SQLAlchemy Core, one short write transaction (blob row, duplicate
    lookup, case row). A case id the hub already holds is answered from the stored row before the
    image is written (so a reused id never leaves a blob behind); one that raced in meanwhile fails
    the insert, and the blob this request wrote is removed again if nothing refers to it.
    """
    prepared = prepare_case(hub, principal, case_text, image)
    case, row = prepared.case, prepared.row
    existing = _existing(hub, case)
    if existing is not None:
        return existing
    admission = admit(hub, [(case.campaign_id, case.campaign_version)])
    if not admission.all:
        raise throttled(admission)
    sha, created = hub.blobs.put(image, sha256=case.image_sha256, verified=True)  # _check_image hashed it
    sql = _statements(hub)
    try:
        _store_row(hub, sql, row)
    except (DBIntegrityError, *sql.integrity_errors):
        _undo_blob(hub, sha, created)
        existing = _existing(hub, case)
        if existing is not None:
            return existing
        raise
    except BaseException:
        _undo_blob(hub, sha, created)
        raise
    if row["duplicate_of"]:
        kept = settle_duplicates(hub, [sha]).get(sha, row["duplicate_of"])
        if kept != case.case_id:
            log.info("case %s from %s duplicates %s (image %s)", case.case_id, case.device_id, kept, sha[:12])
            return 201, CaseReceipt(case.case_id, "duplicate", duplicate_of=kept)
    return 201, CaseReceipt(case.case_id, "created")


def settle_duplicates(hub: Hub, shas: list[str]) -> dict[str, str]:
    """Which copy of each image the pool keeps, whatever order the copies arrived in -> {sha256: kept case id}.

    A case whose image the hub already holds is stored as a ``duplicate`` of the kept one (the first received).
    While the kept case is still ``unlabeled``, a copy that ranks higher by :func:`copy_rank` takes its place, and
    the others point at it; once the kept case is queued, labeled or held it stays whatever arrives. So when two
    devices upload one frame, the pool holds the copy that says most, and the same copy whichever device's arrived
    first: a seeded demo repeats (before, the copy kept, with its human action and capturing model, followed the
    upload race, and runs of one seed parted from the second turn on)."""
    kept_of: dict[str, str] = {}
    for sha in sorted(set(shas)):
        with write_session(hub.engine) as s:
            rows = list(s.exec(select(CaseRow).where(CaseRow.image_sha256 == sha)
                               .order_by(col(CaseRow.received_at), col(CaseRow.case_id)).with_for_update()).all())
            heads = [r for r in rows if r.duplicate_of is None]
            if not heads:
                continue
            head = heads[0]
            kept_of[sha] = head.case_id
            if len(heads) > 1 or head.state != "unlabeled":
                continue
            copies = [r for r in rows if r.state == "duplicate" and r.duplicate_of == head.case_id]
            best = max([head, *copies], key=copy_rank)  # of copies alike but for id and time: the earliest received
            if best is head:
                continue
            for r in (head, *copies):
                r.state, r.duplicate_of = ("unlabeled", None) if r is best else ("duplicate", best.case_id)
                s.add(r)
            kept_of[sha] = best.case_id
            log.info("image %s: case %s (informativeness %.3f) is kept in place of %s (%.3f)", sha[:12],
                     best.case_id, best.uncertainty, head.case_id, head.uncertainty)
    return kept_of


_VOLATILE = ("case_id", "captured_at")  # what differs between two copies of one frame that say the same


def copy_rank(row: CaseRow) -> tuple[float, bool, str]:
    """How much a copy of an image says, to choose the copy the pool keeps: its capture-time informativeness (the
    copy whose human disagreed with the model, or whose model doubted more), then whether the human's action is
    known (a later model can disagree with it: re-scoring reads it), then a digest of all it carries but its id
    and capture time. The digest orders copies of equal informativeness that differ in what the re-scoring or a
    balanced selection reads (the human's action, the tags), the same way whichever arrived first: two copies of
    one digits frame, one with the human's label and one without, both scored 0.797 at capture, and the pool kept
    whichever came first, so runs of one seed re-scored different copies and parted from the second turn on."""
    payload = row.payload or {}
    kept = {k: v for k, v in payload.items() if k not in _VOLATILE}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return float(row.uncertainty), payload.get("human_action") is not None, digest


@dataclass(frozen=True)
class PreparedCase:
    """A case that passed every check, and the ``cases`` row it becomes (blob not stored yet)."""

    case: Case
    image: bytes
    row: dict[str, Any]


def prepare_case(hub: Hub, principal: Principal, case_text: str | bytes, image: bytes) -> PreparedCase:
    """Parse and validate one case and its image for ``principal``; raise a permanent fault (fleet.errors) if bad.

    The single and the batch upload both go through here, so a case is accepted or refused the same
    way whichever endpoint carries it.
    """
    cfg = hub.settings
    case = Case.from_dict(parse_json(case_text, "part 'case'", max_bytes=cfg.max_json_bytes,
                                     max_depth=cfg.max_json_depth, invalid=ProtocolError))
    require_device(principal, case.device_id, "case")
    _check_image(hub, case, image)
    embedding, dim = _check_model(hub, case)
    info = model_info(hub, case.model_version)
    return PreparedCase(case=case, image=image, row=case_row(
        case, received_at=hub.now(), embedding=embedding, embedding_dim=dim, image_size=len(image),
        floor=info.operating_threshold if info is not None else 0.0))


def case_row(case: Case, *, received_at: float, embedding: bytes | None, embedding_dim: int | None,
             image_size: int, floor: float = 0.0) -> dict[str, Any]:
    """The ``cases`` row of a new case: the case itself as its payload (its embedding kept compactly beside
    it), and the columns the hub selects, counts and joins on."""
    payload = case.to_dict()
    payload["embedding"] = None
    return {
        "case_id": case.case_id, "device_id": case.device_id, "captured_at": case.captured_at,
        "received_at": received_at, "model_version": case.model_version, "task": case.task,
        "predicted_class": case.prediction.label if isinstance(case.prediction, Classification) else None,
        "uncertainty": case_informativeness(case, floor=floor),
        "priority": case.priority, "campaign_id": case.campaign_id, "campaign_version": case.campaign_version,
        "payload": payload, "embedding": embedding, "embedding_dim": embedding_dim,
        "image_sha256": case.image_sha256, "image_size": image_size, "duplicate_of": None, "state": "unlabeled",
        "selection_id": None, "label": None, "label_payload": None, "label_status": None,
    }


def detection_boxes(detections: list[Detection]) -> Boxes:
    """The boxes of ``detections`` (one per frame) as :class:`trigger.boxes.Boxes`, each box's class
    distribution kept when every box has one of the same width."""
    per = [d.boxes for d in detections]
    widths = {len(b.probs) if b.probs is not None else 0 for bs in per for b in bs}
    probs = None
    if len(widths) == 1 and 0 not in widths:
        probs = [[b.probs for b in bs] for bs in per]
    return Boxes.from_frames([[(b.x1, b.y1, b.x2, b.y2) for b in bs] for bs in per],
                             scores=[[1.0 if b.score is None else b.score for b in bs] for bs in per],
                             labels=[[b.label for b in bs] for bs in per], probs=probs)


def case_informativeness(case: Case, *, floor: float = 0.0) -> float:
    """How much labeling ``case`` would teach, in [0, 1] (see :func:`fleet.hub.selection.informativeness`, and
    :func:`fleet.hub.selection.box_informativeness` for a detector's case, ``floor`` its operating threshold)."""
    if isinstance(case.prediction, Detection):
        hb = case.human_action if isinstance(case.human_action, Detection) else None
        ch = case.challenger.prediction if case.challenger is not None else None
        return float(box_informativeness(
            detection_boxes([case.prediction]), human=None if hb is None else detection_boxes([hb]),
            challenger=detection_boxes([ch]) if isinstance(ch, Detection) else None, floor=floor)[0])
    assert isinstance(case.prediction, Classification)
    probs = np.asarray(case.prediction.probs, dtype=np.float64)[None, :]
    human = case.human_action.label if isinstance(case.human_action, Classification) else -1
    challenger = case.challenger.prediction.label if case.challenger is not None and isinstance(
        case.challenger.prediction, Classification) else -1
    return float(informativeness(probs, human=np.asarray([human]), challenger=np.asarray([challenger]))[0])


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
        raise PayloadTooLarge(f"image is {len(image)} bytes; the limit is {limit}")
    if len(image) != case.image_size:
        raise ProtocolError(f"image is {len(image)} bytes but case.image_size says {case.image_size}")
    digest = sha256_hex(image)
    if digest != case.image_sha256:
        raise ProtocolError(f"image sha256 is {digest} but case.image_sha256 says {case.image_sha256}")
    check_png(image, max_side=hub.settings.max_image_side, max_pixels=hub.settings.max_image_pixels)


def _check_model(hub: Hub, case: Case) -> tuple[bytes | None, int | None]:
    """The case must fit the model that made it (its task, classes and embedding width); returns the
    embedding's bytes and width."""
    info = model_info(hub, case.model_version)
    if info is None:
        raise ProtocolError(f"unknown model version {case.model_version!r}; register it at POST /v1/models "
                            f"before devices report cases from it")
    if case.task != info.task:
        raise ProtocolError(f"a {case.task!r} prediction from model {info.version!r}, a {info.task!r} model")
    if isinstance(case.prediction, Classification) and case.prediction.probs is None:
        raise ProtocolError("a device's classify prediction must carry its probs; received none")
    case.prediction.check_classes(info.n_classes, f"prediction of model {info.version!r}")
    if case.human_action is not None:
        case.human_action.check_classes(info.n_classes, "human_action")
    if case.challenger is not None:
        ch = model_info(hub, case.challenger.version)
        if ch is None:
            raise ProtocolError(f"unknown challenger version {case.challenger.version!r}")
        case.challenger.prediction.check_classes(ch.n_classes, f"challenger {ch.version!r}")
    if case.embedding is None:
        return None, None
    raw = base64.b64decode(case.embedding)
    dim = len(raw) // 2
    if dim != info.embedding_dim:
        raise ProtocolError(f"embedding has {dim} values; model {info.version!r} has embedding_dim "
                            f"{info.embedding_dim}")
    return raw, dim


# what makes two uploads under one case id the same case (a retry) rather than two cases
CASE_IDENTITY = ("device_id", "image_sha256", "model_version", "captured_at")


def stored_identity(hub: Hub, case_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """The :data:`CASE_IDENTITY` columns of the cases the hub holds among ``case_ids``.

    On the hot path (every upload asks before it writes a blob), so through the driver's cursor: a
    primary-key lookup costs tens of microseconds there, and several times that through the ORM.
    """
    sqlite = hub.engine.dialect.name == "sqlite"
    p = "?" if sqlite else "%s"
    engine = hub.engine if sqlite else hub.autocommit_engine()
    with engine.connect() as conn:
        cur = conn.connection.cursor()
        try:
            return identities(cur, p, case_ids)
        finally:
            cur.close()


def identities(cur: Any, p: str, case_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """:func:`stored_identity` on an open driver cursor (``p``: its parameter marker)."""
    out: dict[str, tuple[Any, ...]] = {}
    for start in range(0, len(case_ids), 500):
        chunk = case_ids[start:start + 500]
        cur.execute(f"SELECT case_id, {', '.join(CASE_IDENTITY)} FROM cases "
                    f"WHERE case_id IN ({', '.join([p] * len(chunk))})", chunk)
        out.update((r[0], tuple(r[1:])) for r in cur.fetchall())
    return out


def conflict(case: Case, stored: tuple[Any, ...]) -> str | None:
    """Why ``case`` cannot be stored under its id, which the hub already holds as ``stored``; None if a retry."""
    held = dict(zip(CASE_IDENTITY, stored, strict=True))
    if held["device_id"] != case.device_id:
        return f"case id {case.case_id!r} was already sent by another device"
    differ = [k for k in CASE_IDENTITY[1:] if held[k] != getattr(case, k)]
    if differ:
        shown = ", ".join(f"{k} {getattr(case, k)!r} (stored: {held[k]!r})" for k in differ)
        return (f"case id {case.case_id!r} is already stored with different content: {shown}; "
                f"a case id names one case, so send new content under a new case id")
    return None


def _existing(hub: Hub, case: Case) -> tuple[int, CaseReceipt] | None:
    """The answer for a case id the hub already holds: 200 ``already`` for a retry, 409 for anything else."""
    stored = stored_identity(hub, [case.case_id]).get(case.case_id)
    if stored is None:
        return None
    why = conflict(case, stored)
    if why is not None:
        raise Conflict(why)
    return 200, CaseReceipt(case.case_id, "already")


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


