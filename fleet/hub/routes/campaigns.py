"""Campaigns (versioned, expiring trigger specs aimed at device groups) and novelty banks."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import col, func, select

from fleet.hub import rollouts
from fleet.hub.auth import Principal, require
from fleet.hub.context import Hub, get_hub
from fleet.hub.db import insert_ignore, read_session, write_session
from fleet.hub.ingest import decode_embedding_bytes
from fleet.hub.models import Blob, Campaign, CaseRow, NoveltyBankRow
from fleet.hub.schemas import BankCreate, CampaignCreate
from fleet.protocol import check_name

router = APIRouter(tags=["campaigns"])


@router.post("/v1/campaigns", status_code=201)
def create_campaign(payload: Any = Body(...), _: Principal = Depends(require("admin")),
                    hub: Hub = Depends(get_hub)) -> JSONResponse:
    """A trigger spec (bare, or as ``{spec, groups, novelty_bank}``), validated with ``trigger.parse_spec``."""
    if not isinstance(payload, dict):
        raise HTTPException(422, detail=f"campaign must be a JSON object; received {type(payload).__name__}")
    body = CampaignCreate.model_validate(payload if "spec" in payload else {"spec": payload})
    spec = parse_spec(body.spec)
    campaign_id = check_name(spec.id, "campaign id")
    now = hub.now()
    expires_at = spec.expires_at
    if expires_at is not None and expires_at <= now:
        raise HTTPException(422, detail=f"campaign {campaign_id!r} v{spec.version} expired at {expires_at}; "
                                        f"set expires_at in the future")
    doc = spec.to_dict()
    with write_session(hub.engine) as s:
        if body.novelty_bank is not None and s.get(NoveltyBankRow, body.novelty_bank) is None:
            raise HTTPException(422, detail=f"unknown novelty bank {body.novelty_bank!r}; build it at "
                                            f"POST /v1/novelty-banks first")
        same = s.get(Campaign, (campaign_id, spec.version))
        if same is not None:
            if same.spec == doc and same.groups == body.groups and same.novelty_bank == body.novelty_bank \
                    and same.deleted_at is None:
                return JSONResponse({**campaign_public(same), "already": True}, status_code=200)
            raise HTTPException(409, detail=f"campaign {campaign_id!r} version {spec.version} already exists with "
                                            f"different content; bump the version")
        newest = s.exec(select(func.max(Campaign.version)).where(Campaign.campaign_id == campaign_id)).one()
        if newest is not None and spec.version < newest:
            raise HTTPException(409, detail=f"campaign {campaign_id!r} is at version {newest}; received older "
                                            f"version {spec.version}")
        row = Campaign(campaign_id=campaign_id, version=spec.version, spec=doc, groups=body.groups,
                       expires_at=expires_at, novelty_bank=body.novelty_bank, created_at=now)
        s.add(row)
    return JSONResponse(campaign_public(row), status_code=201)


@router.get("/v1/campaigns")
def list_campaigns(include_deleted: bool = Query(False), _: Principal = Depends(require("admin")),
                   hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """The newest version of each campaign."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(Campaign).order_by(Campaign.campaign_id, col(Campaign.version).desc())).all()
    out, seen = [], set()
    for r in rows:
        if r.campaign_id in seen or (r.deleted_at is not None and not include_deleted):
            continue
        seen.add(r.campaign_id)
        out.append(campaign_public(r, now=hub.now()))
    return out


@router.get("/v1/campaigns/{campaign_id}")
def get_campaign(campaign_id: str, _: Principal = Depends(require("admin")),
                 hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    check_name(campaign_id, "campaign id")
    with read_session(hub.engine) as s:
        rows = s.exec(select(Campaign).where(Campaign.campaign_id == campaign_id)
                      .order_by(col(Campaign.version).desc())).all()
    if not rows:
        raise HTTPException(404, detail=f"unknown campaign {campaign_id!r}")
    return {"campaign_id": campaign_id, "versions": [campaign_public(r, now=hub.now()) for r in rows]}


@router.delete("/v1/campaigns/{campaign_id}")
def delete_campaign(campaign_id: str, _: Principal = Depends(require("admin")),
                    hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Withdraw every version of a campaign from assignments (rows are kept for lineage)."""
    check_name(campaign_id, "campaign id")
    with write_session(hub.engine) as s:
        n = s.execute(sa.update(Campaign).where(col(Campaign.campaign_id) == campaign_id,
                                                col(Campaign.deleted_at).is_(None)).values(deleted_at=hub.now()))
    if n.rowcount == 0:
        raise HTTPException(404, detail=f"no live campaign {campaign_id!r}")
    return {"campaign_id": campaign_id, "deleted_versions": n.rowcount}


def campaign_public(row: Campaign, *, now: float | None = None) -> dict[str, Any]:
    return {
        "campaign_id": row.campaign_id, "version": row.version, "spec": row.spec, "groups": row.groups,
        "expires_at": row.expires_at, "novelty_bank": row.novelty_bank, "created_at": row.created_at,
        "deleted_at": row.deleted_at,
        "expired": None if now is None else (row.expires_at is not None and row.expires_at <= now),
    }


def parse_spec(doc: dict[str, Any]) -> Any:
    try:
        from trigger import SpecError
        from trigger import parse_spec as _parse
    except ImportError as exc:  # pragma: no cover - the trigger package ships with the hub
        raise HTTPException(503, detail=f"trigger.parse_spec is not available: {exc}") from None
    try:
        return _parse(doc)
    except (SpecError, ValueError, TypeError) as exc:
        raise HTTPException(422, detail=f"invalid trigger spec: {exc}") from None


# ---------------------------------------------------------------------------------------------
# novelty banks
# ---------------------------------------------------------------------------------------------


@router.post("/v1/novelty-banks", status_code=201)
def build_bank(body: BankCreate | None = Body(None), _: Principal = Depends(require("admin")),
               hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Build a bank from the embeddings of labeled cases of one model version (default: the active one)."""
    from trigger import NoveltyBank

    body = body or BankCreate()
    with read_session(hub.engine) as s:
        version = body.model_version
        if version is None:
            active = rollouts.active_model(s)
            version = active.version if active is not None else None
        if version is None:
            raise HTTPException(409, detail="no active model; name model_version to build a bank from")
        rows = s.exec(select(CaseRow.embedding, CaseRow.label)
                      .where(CaseRow.state == "labeled", CaseRow.model_version == version,
                             col(CaseRow.embedding).is_not(None))).all()
    if not rows:
        raise HTTPException(409, detail=f"no labeled cases with embeddings from model {version!r} to build a bank from")
    emb = np.stack([decode_embedding_bytes(e) for e, _ in rows])  # type: ignore[misc]
    labels = np.asarray([-1 if lb is None else lb for _, lb in rows], dtype=np.int64)
    bank = NoveltyBank.from_embeddings(emb, labels=labels, max_size=body.max_size, seed=body.seed)
    data = _bank_bytes(bank)
    sha, _created = hub.blobs.put(data)
    now = hub.now()
    bank_id = body.bank_id or f"bank-{int(now)}-{secrets.token_hex(3)}"
    try:
        with write_session(hub.engine) as s:
            s.execute(insert_ignore(hub.engine, Blob.__table__,  # type: ignore[arg-type]
                                    {"sha256": sha, "size": len(data), "kind": "bank", "created_at": now}))
            row = NoveltyBankRow(bank_id=bank_id, sha256=sha, size=len(data), n=len(bank), dim=int(emb.shape[1]),
                                 model_version=version, created_at=now)
            s.add(row)
    except DBIntegrityError:
        raise HTTPException(409, detail=f"a novelty bank named {bank_id!r} already exists") from None
    return row.model_dump()


@router.get("/v1/novelty-banks")
def list_banks(_: Principal = Depends(require("device", "trainer", "labeler")),
               hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    with read_session(hub.engine) as s:
        return [r.model_dump() for r in s.exec(select(NoveltyBankRow).order_by(NoveltyBankRow.created_at)).all()]


@router.get("/v1/novelty-banks/{bank_id}")
def get_bank(bank_id: str, _: Principal = Depends(require("device", "trainer", "labeler")),
             hub: Hub = Depends(get_hub)) -> Response:
    check_name(bank_id, "bank_id")
    with read_session(hub.engine) as s:
        row = s.get(NoveltyBankRow, bank_id)
    if row is None:
        raise HTTPException(404, detail=f"unknown novelty bank {bank_id!r}")
    return Response(hub.blobs.get(row.sha256), media_type="application/octet-stream",
                    headers={"X-Sha256": row.sha256})


def _bank_bytes(bank: Any) -> bytes:
    if hasattr(bank, "to_bytes"):
        return bytes(bank.to_bytes())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bank.npz"
        bank.save(path)
        return path.read_bytes()
