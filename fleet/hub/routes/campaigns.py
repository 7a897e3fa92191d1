"""Campaigns (versioned, expiring trigger specs aimed at device groups) and novelty banks."""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import col, func, select
from starlette.concurrency import run_in_threadpool

from fleet.errors import Conflict, InvalidInput, NotFound, ProtocolError
from fleet.hub import rollouts
from fleet.hub.api import (
    AdminCaller,
    AnyCaller,
    DeviceCaller,
    HubDep,
    TrainerCaller,
    binary_body,
    message_body,
    message_response,
    request_body,
)
from fleet.hub.auth import require_device
from fleet.hub.context import Hub
from fleet.hub.db import dialect_insert, insert_ignore, read_session, write_session
from fleet.hub.ingest import decode_embedding_bytes
from fleet.hub.models import Blob, Campaign, CampaignRefusalRow, CaseRow, ModelVersion, NoveltyBankRow
from fleet.protocol import (
    BankCreate,
    BankList,
    BankPublic,
    CampaignCreate,
    CampaignDeleted,
    CampaignList,
    CampaignPublic,
    CampaignReceipt,
    CampaignRefusal,
    CampaignRefusals,
    CampaignVersions,
    DeviceRefusal,
    LearnedFit,
    YieldReport,
    check_name,
)

log = logging.getLogger(__name__)

router = APIRouter(tags=["campaigns"])


@router.post("/v1/campaigns", status_code=201, response_model=CampaignReceipt,
             openapi_extra=request_body(CampaignCreate),
             responses={200: {"model": CampaignReceipt, "description": "the same version was there already"}})
def create_campaign(_: AdminCaller, hub: HubDep, body: CampaignCreate = message_body(CampaignCreate)) -> Response:
    """A trigger spec (as ``{spec, groups, novelty_bank}``, or bare), validated with ``trigger.parse_spec``;
    ``budgets.per_trigger: "auto"`` starts with even shares that ``POST .../rebalance`` moves towards yield."""
    from fleet.hub.autobudget import resolve_auto

    posted, auto = resolve_auto(body.spec)
    spec = parse_spec(posted)
    campaign_id = check_name(spec.id, "campaign id")
    now = hub.now()
    expires_at = spec.expires_at
    if expires_at is not None and expires_at <= now:
        raise ProtocolError(f"campaign {campaign_id!r} v{spec.version} expired at {expires_at}; set expires_at in "
                            f"the future")
    doc = spec.to_dict()
    with write_session(hub.engine) as s:
        if body.novelty_bank is not None and s.get(NoveltyBankRow, body.novelty_bank) is None:
            raise ProtocolError(f"unknown novelty bank {body.novelty_bank!r}; build it at POST /v1/novelty-banks "
                                f"first")
        same = s.get(Campaign, (campaign_id, spec.version))
        if same is not None:
            if same.spec == doc and same.groups == body.groups and same.novelty_bank == body.novelty_bank \
                    and same.deleted_at is None and same.auto_budgets == auto:
                return message_response(CampaignReceipt(**_campaign_fields(same), already=True))
            raise Conflict(f"campaign {campaign_id!r} version {spec.version} already exists with different "
                           f"content; bump the version")
        newest = s.exec(select(func.max(Campaign.version)).where(Campaign.campaign_id == campaign_id)).one()
        if newest is not None and spec.version < newest:
            raise Conflict(f"campaign {campaign_id!r} is at version {newest}; received older version {spec.version}")
        row = Campaign(campaign_id=campaign_id, version=spec.version, spec=doc, groups=body.groups,
                       expires_at=expires_at, novelty_bank=body.novelty_bank, created_at=now, auto_budgets=auto)
        s.add(row)
        out = CampaignReceipt(**_campaign_fields(row))
    return message_response(out, status_code=201)


@router.get("/v1/campaigns", response_model=CampaignList)
def list_campaigns(_: AdminCaller, hub: HubDep, include_deleted: bool = Query(False)) -> Response:
    """The newest version of each campaign."""
    return message_response(campaign_list(hub, include_deleted=include_deleted))


def campaign_list(hub: Hub, *, include_deleted: bool = False) -> CampaignList:
    """The newest version of each campaign (of the deleted ones too when ``include_deleted``)."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(Campaign).order_by(Campaign.campaign_id, col(Campaign.version).desc())).all()
    out, seen = [], set()
    for r in rows:
        if r.campaign_id in seen or (r.deleted_at is not None and not include_deleted):
            continue
        seen.add(r.campaign_id)
        out.append(campaign_public(r, now=hub.now()))
    return CampaignList(campaigns=out)


@router.post("/v1/campaigns/{campaign_id}/rebalance", response_model=CampaignReceipt)
def rebalance_campaign(campaign_id: str, _: AdminCaller, hub: HubDep) -> Response:
    """Move an auto campaign's trigger budgets towards yield (:mod:`fleet.hub.autobudget`): a new version when
    a share moved, else the current one with ``already`` true."""
    from fleet.hub.autobudget import rebalance

    check_name(campaign_id, "campaign id")
    with write_session(hub.engine) as s:
        row, new = rebalance(s, campaign_id, now=hub.now())
        out = CampaignReceipt(**_campaign_fields(row), already=not new)
    return message_response(out)


@router.post("/v1/campaigns/{campaign_id}/learn", status_code=201, response_model=LearnedFit)
def learn_trigger(campaign_id: str, _: AdminCaller, hub: HubDep,
                  target_rate: float = Query(0.05, gt=0, lt=1)) -> Response:
    """Fit the campaign's learned trigger (:mod:`fleet.hub.learned`) for each model its devices run (the fleet's
    active model, and each targeted group's own), on that model's labeled cases, and publish the leaves as a new
    campaign version firing at ``target_rate``; the answer describes the first fit (the fleet's active model's where
    it was fitted), the other models' fits in its ``others`` and why any model was not fitted in its
    ``not_fitted``. 422 when no model's cases suffice, saying why for each."""
    from fleet.hub.learned import learn

    check_name(campaign_id, "campaign id")
    with write_session(hub.engine) as s:
        _, fit = learn(s, campaign_id, now=hub.now(), target_rate=target_rate, blobs=hub.blobs)
    return message_response(fit, status_code=201)


@router.get("/v1/yields", response_model=YieldReport)
def get_yields(_: AdminCaller, hub: HubDep, campaign_id: str | None = Query(None)) -> Response:
    """Per campaign and trigger: uploads, labeled, errors found, yield, labels and bytes per error found
    (:mod:`fleet.hub.yields`); ``campaign_id`` keeps one campaign's rows (404 for an id the hub has seen neither
    as a campaign nor on an upload: a mistyped one is not an empty table)."""
    from fleet.hub.yields import trigger_yields

    if campaign_id is not None:
        check_name(campaign_id, "campaign id")
    with read_session(hub.engine) as s:
        report = trigger_yields(s, campaign_id=campaign_id)
        if campaign_id is not None and not report.yields and s.exec(
                select(Campaign.campaign_id).where(Campaign.campaign_id == campaign_id)).first() is None:
            raise NotFound(f"unknown campaign {campaign_id!r}: the hub has no version of it and no case it uploaded")
    return message_response(report)


@router.get("/v1/campaigns/{campaign_id}", response_model=CampaignVersions)
def get_campaign(campaign_id: str, _: AdminCaller, hub: HubDep) -> Response:
    """Every version of a campaign, newest first."""
    check_name(campaign_id, "campaign id")
    with read_session(hub.engine) as s:
        rows = s.exec(select(Campaign).where(Campaign.campaign_id == campaign_id)
                      .order_by(col(Campaign.version).desc())).all()
    if not rows:
        raise NotFound(f"unknown campaign {campaign_id!r}")
    return message_response(CampaignVersions(campaign_id=campaign_id,
                                              versions=[campaign_public(r, now=hub.now()) for r in rows]))


@router.delete("/v1/campaigns/{campaign_id}", response_model=CampaignDeleted)
def delete_campaign(campaign_id: str, _: AdminCaller, hub: HubDep) -> Response:
    """Withdraw every version of a campaign from assignments (rows are kept for lineage)."""
    check_name(campaign_id, "campaign id")
    with write_session(hub.engine) as s:
        n = s.execute(sa.update(Campaign).where(col(Campaign.campaign_id) == campaign_id,
                                                col(Campaign.deleted_at).is_(None)).values(deleted_at=hub.now()))
    if n.rowcount == 0:
        raise NotFound(f"no live campaign {campaign_id!r}")
    return message_response(CampaignDeleted(campaign_id=campaign_id, deleted_versions=n.rowcount))


@router.post("/v1/campaign-refusals", status_code=204, response_class=Response,
             openapi_extra=request_body(CampaignRefusal))
def campaign_refusal(principal: DeviceCaller, hub: HubDep,
                     body: CampaignRefusal = message_body(CampaignRefusal)) -> Response:
    """A device could not run a campaign version it was assigned; kept per (campaign, version, device) with the
    last reason and how many times (404: no such campaign version)."""
    require_device(principal, body.device_id, "campaign refusal")
    table = CampaignRefusalRow.__table__  # type: ignore[attr-defined]
    with write_session(hub.engine) as s:
        if s.get(Campaign, (body.campaign_id, body.version)) is None:
            raise NotFound(f"unknown campaign {body.campaign_id!r} v{body.version}")
        ins = dialect_insert(hub.engine, table).values(
            campaign_id=body.campaign_id, version=body.version, device_id=body.device_id, reason=body.reason,
            refused_at=body.refused_at, received_at=hub.now(), times=1)
        s.execute(ins.on_conflict_do_update(
            index_elements=["campaign_id", "version", "device_id"],
            set_={"reason": ins.excluded.reason, "refused_at": ins.excluded.refused_at,
                  "received_at": ins.excluded.received_at, "times": table.c.times + 1}))
    log.warning("device %s refused campaign %s v%d: %s", body.device_id, body.campaign_id, body.version,
                body.reason[:300])
    return Response(status_code=204)


@router.get("/v1/campaigns/{campaign_id}/refusals", response_model=CampaignRefusals)
def campaign_refusals(campaign_id: str, _: AdminCaller, hub: HubDep) -> Response:
    """The devices that could not run a version of this campaign, newest version first."""
    check_name(campaign_id, "campaign id")
    with read_session(hub.engine) as s:
        if s.exec(select(Campaign.version).where(Campaign.campaign_id == campaign_id).limit(1)).first() is None:
            raise NotFound(f"unknown campaign {campaign_id!r}")
        rows = s.exec(select(CampaignRefusalRow).where(CampaignRefusalRow.campaign_id == campaign_id)
                      .order_by(col(CampaignRefusalRow.version).desc(), col(CampaignRefusalRow.device_id))).all()
    return message_response(CampaignRefusals(campaign_id=campaign_id, refusals=[
        DeviceRefusal(device_id=r.device_id, version=r.version, reason=r.reason, refused_at=r.refused_at,
                      received_at=r.received_at, times=r.times) for r in rows]))


def campaign_public(row: Campaign, *, now: float) -> CampaignPublic:
    """A stored campaign version, with whether it had expired at ``now``."""
    return CampaignPublic(**_campaign_fields(row), expired=row.expires_at is not None and row.expires_at <= now)


def _campaign_fields(row: Campaign) -> dict[str, Any]:
    return {"campaign_id": row.campaign_id, "version": row.version, "spec": row.spec, "groups": list(row.groups),
            "expires_at": row.expires_at, "novelty_bank": row.novelty_bank, "created_at": row.created_at,
            "deleted_at": row.deleted_at, "auto_budgets": row.auto_budgets}


def parse_spec(doc: dict[str, Any]) -> Any:
    """The trigger spec ``doc`` parsed by ``trigger.parse_spec``, or a ProtocolError (422) with its reason."""
    from trigger import SpecError
    from trigger import parse_spec as _parse

    try:
        return _parse(doc)
    except (SpecError, ValueError, TypeError) as exc:
        raise ProtocolError(f"invalid trigger spec: {exc}") from None


# ---------------------------------------------------------------------------------------------
# novelty banks
# ---------------------------------------------------------------------------------------------


@router.post("/v1/novelty-banks", status_code=201, response_model=BankPublic,
             openapi_extra=request_body(BankCreate, required=False))
def build_bank(_: AdminCaller, hub: HubDep, body: BankCreate = message_body(BankCreate, optional=True)) -> Response:
    """Build a bank from the embeddings of labeled cases of one model version (default: the active one)."""
    from trigger import NoveltyBank

    with read_session(hub.engine) as s:
        version = body.model_version
        if version is None:
            active = rollouts.active_model(s)
            version = active.version if active is not None else None
        if version is None:
            raise Conflict("no active model; name model_version to build a bank from")
        rows = s.exec(select(CaseRow.embedding, CaseRow.label)
                      .where(CaseRow.state == "labeled", CaseRow.model_version == version,
                             col(CaseRow.embedding).is_not(None))).all()
    if not rows:
        raise Conflict(f"no labeled cases with embeddings from model {version!r} to build a bank from")
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
            out = bank_public(row)
    except DBIntegrityError:
        raise Conflict(f"a novelty bank named {bank_id!r} already exists") from None
    return message_response(out, status_code=201)


@router.put("/v1/models/{version}/novelty-bank", status_code=201, response_model=BankPublic,
            openapi_extra=binary_body("the bank as .npz (trigger.NoveltyBank.to_bytes), built from the model's "
                                      "embeddings of its training set"),
            responses={200: {"model": BankPublic, "description": "the same bank was there already, or replaced"}})
async def put_model_bank(version: str, request: Request, _: TrainerCaller, hub: HubDep) -> Response:
    """The novelty bank of model ``version`` (``model-{version}``): loaded with ``trigger.NoveltyBank`` and
    its width checked against the model's ``embedding_dim``. Devices that run ``version`` get this bank for
    their novelty triggers (see :func:`fleet.hub.rollouts.campaigns_for`); a new upload replaces it."""
    check_name(version, "version")
    data = await request.body()
    status, out = await run_in_threadpool(store_model_bank, hub, version, data)
    return message_response(out, status_code=status)


def model_bank_id(version: str) -> str:
    """The bank id of model ``version``'s own bank: ``model-{version}``, or a digest of a version too long."""
    name = f"model-{version}"
    return name if len(name) <= 128 else f"model-{hashlib.sha256(version.encode()).hexdigest()[:32]}"


def store_model_bank(hub: Hub, version: str, data: bytes) -> tuple[int, BankPublic]:
    """Validate ``data`` as the bank of ``version`` and store it: (201 created | 200 same or replaced, its row)."""
    from trigger import NoveltyBank

    with read_session(hub.engine) as s:
        mv = s.get(ModelVersion, version)
    if mv is None:
        raise NotFound(f"unknown model version {version!r}; upload the model before its novelty bank")
    if not data:
        raise InvalidInput("the request has no body; expected the novelty bank as .npz bytes")
    try:
        bank = NoveltyBank.from_bytes(data)
    except ValueError as exc:
        raise InvalidInput(f"not a novelty bank ({len(data)} bytes): {exc}") from None
    if bank.dim != mv.embedding_dim:
        raise InvalidInput(f"novelty bank embeddings have dimension {bank.dim}; model {version!r} has "
                           f"embedding_dim {mv.embedding_dim}")
    bank_id = model_bank_id(version)
    sha, _ = hub.blobs.put(data)
    now = hub.now()
    try:
        return _upsert_model_bank(hub, bank_id, version, bank, sha, len(data), now)
    except DBIntegrityError:
        raise Conflict(f"novelty bank {bank_id!r} was stored concurrently; send it again") from None


def _upsert_model_bank(hub: Hub, bank_id: str, version: str, bank: Any, sha: str, size: int,
                       now: float) -> tuple[int, BankPublic]:
    with write_session(hub.engine) as s:
        row = s.get(NoveltyBankRow, bank_id)
        if row is not None and row.model_version != version:
            raise Conflict(f"novelty bank {bank_id!r} exists and holds model {row.model_version!r}'s embeddings, "
                           f"not {version!r}'s")
        s.execute(insert_ignore(hub.engine, Blob.__table__,  # type: ignore[arg-type]
                                {"sha256": sha, "size": size, "kind": "bank", "created_at": now}))
        status = 201 if row is None else 200
        if row is None:
            row = NoveltyBankRow(bank_id=bank_id, sha256=sha, size=size, n=len(bank), dim=bank.dim,
                                 model_version=version, created_at=now)
        elif row.sha256 != sha:
            row.sha256, row.size, row.n, row.dim, row.created_at = sha, size, len(bank), bank.dim, now
        s.add(row)
        out = bank_public(row)
    return status, out


@router.get("/v1/novelty-banks", response_model=BankList)
def list_banks(_: AnyCaller, hub: HubDep) -> Response:
    """Every novelty bank, oldest first."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(NoveltyBankRow).order_by(NoveltyBankRow.created_at)).all()
    return message_response(BankList(banks=[bank_public(r) for r in rows]))


@router.get("/v1/novelty-banks/{bank_id}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "the bank as .npz (trigger.NoveltyBank); X-Sha256 names its sha256"}})
def get_bank(bank_id: str, _: AnyCaller, hub: HubDep) -> Response:
    check_name(bank_id, "bank_id")
    with read_session(hub.engine) as s:
        row = s.get(NoveltyBankRow, bank_id)
    if row is None:
        raise NotFound(f"unknown novelty bank {bank_id!r}")
    return Response(hub.blobs.get(row.sha256), media_type="application/octet-stream",
                    headers={"X-Sha256": row.sha256})


def bank_public(row: NoveltyBankRow) -> BankPublic:
    return BankPublic(bank_id=row.bank_id, sha256=row.sha256, size=row.size, n=row.n, dim=row.dim,
                      model_version=row.model_version, created_at=row.created_at)


def _bank_bytes(bank: Any) -> bytes:
    if hasattr(bank, "to_bytes"):
        return bytes(bank.to_bytes())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bank.npz"
        bank.save(path)
        return path.read_bytes()
