"""Human labels (idempotent per annotation) and the Label Studio webhook inbox."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select

from fleet.hub.auth import Principal, require
from fleet.hub.bodies import loads_or_none, parse_json
from fleet.hub.context import Hub, get_hub
from fleet.hub.db import insert_ignore, read_session, write_session
from fleet.hub.ingest import model_info
from fleet.hub.models import CaseRow, HubState, LabelRow, WebhookEvent
from fleet.hub.schemas import AckRequest, LabelCreate

router = APIRouter(tags=["labels"])
log = logging.getLogger(__name__)

_COMPARED = ("case_id", "label", "annotator", "task_id", "created_at", "agreement", "n_annotators", "status")
ACK_KEY = "labeling_events_acked"


@router.post("/v1/labels")
def post_label(body: LabelCreate, _: Principal = Depends(require("labeler")),
               hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Create, update or delete the label of one annotation; the same payload twice changes nothing."""
    for attempt in range(3):
        try:
            with write_session(hub.engine) as s:
                return _apply_label(hub, s, body)
        except DBIntegrityError:  # the same annotation raced in twice; the retry sees the winner
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _apply_label(hub: Hub, s: Session, body: LabelCreate) -> dict[str, Any]:
    case = s.get(CaseRow, body.case_id, with_for_update=s.get_bind().dialect.name != "sqlite")
    if case is None:
        raise HTTPException(404, detail=f"unknown case {body.case_id!r}")
    info = model_info(hub, case.model_version)
    if info is not None and body.label >= info.n_classes:
        raise HTTPException(422, detail=f"label {body.label} is out of range: model {info.version!r} has "
                                        f"{info.n_classes} classes {list(info.class_names)}")
    existing = s.exec(select(LabelRow).where(LabelRow.source == body.source,
                                             LabelRow.annotation_id == body.annotation_id)).first()
    if existing is not None and existing.case_id != body.case_id:
        raise HTTPException(409, detail=f"annotation {body.source}:{body.annotation_id} belongs to case "
                                        f"{existing.case_id!r}, not {body.case_id!r}")
    now = hub.now()
    if body.deleted:
        if existing is None:
            return {"label_id": None, "action": "unchanged", "case_state": case.state}
        label_id = existing.id
        s.delete(existing)
        s.flush()
        _recompute(s, case)
        return {"label_id": label_id, "action": "deleted", "case_state": case.state}
    fields = body.model_dump(include=set(_COMPARED))
    if existing is not None:
        if all(getattr(existing, k) == v for k, v in fields.items()):
            return {"label_id": existing.id, "action": "unchanged", "case_state": case.state}
        for k, v in fields.items():
            setattr(existing, k, v)
        existing.updated_at = now
        s.add(existing)
        s.flush()
        _recompute(s, case)
        return {"label_id": existing.id, "action": "updated", "case_state": case.state}
    row = LabelRow(**fields, source=body.source, annotation_id=body.annotation_id, updated_at=now)
    s.add(row)
    s.flush()
    _recompute(s, case)
    return {"label_id": row.id, "action": "created", "case_state": case.state}


def _recompute(s: Session, case: CaseRow) -> None:
    """The case's consensus: gold wins, else the majority of accepted labels, else held, else none."""
    labels = s.exec(select(LabelRow).where(LabelRow.case_id == case.case_id)
                    .order_by(col(LabelRow.updated_at).desc(), col(LabelRow.id).desc())).all()
    gold = [lb for lb in labels if lb.status == "gold"]
    accepted = [lb for lb in labels if lb.status == "accepted"]
    if gold:
        case.label, case.label_status, case.state = gold[0].label, "gold", "labeled"
    elif accepted:
        votes = Counter(lb.label for lb in accepted)
        top = max(votes.values())
        # ties go to the most recent of the tied labels
        case.label = next(lb.label for lb in accepted if votes[lb.label] == top)
        case.label_status, case.state = "accepted", "labeled"
    elif labels:
        case.label, case.label_status, case.state = None, "held", "held"
    else:
        case.label, case.label_status = None, None
        case.state = "queued" if case.selection_id else "unlabeled"
    s.add(case)


@router.get("/v1/labels")
def list_labels(case_id: str | None = Query(None), limit: int = Query(1000, ge=1, le=10000),
                offset: int = Query(0, ge=0, le=2**63 - 1), _: Principal = Depends(require("labeler", "trainer")),
                hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    q = select(LabelRow)
    if case_id is not None:
        q = q.where(LabelRow.case_id == case_id)
    with read_session(hub.engine) as s:
        rows = s.exec(q.order_by(LabelRow.id).offset(offset).limit(limit)).all()
    return {"labels": [r.model_dump() for r in rows]}


# ---------------------------------------------------------------------------------------------
# Label Studio webhook inbox
# ---------------------------------------------------------------------------------------------


@router.post("/v1/labeling/webhook", status_code=204)
async def webhook(request: Request, hub: Hub = Depends(get_hub)) -> Response:
    """Store a raw webhook body once (idempotent by its hash); the bridge drains the inbox."""
    secret = request.headers.get("x-flywheel-webhook-secret", "")
    if not hmac.compare_digest(secret.encode(), hub.settings.webhook_secret.get_secret_value().encode()):
        raise HTTPException(401, detail="missing or wrong X-Flywheel-Webhook-Secret header")
    raw = await request.body()
    cfg = hub.settings
    doc = parse_json(raw, "webhook body", max_bytes=cfg.max_json_bytes, max_depth=cfg.max_json_depth)
    if not isinstance(doc, dict):
        raise HTTPException(422, detail=f"webhook body must be a JSON object; received {type(doc).__name__}")
    text = raw.decode("utf-8")  # parse_json checked it is UTF-8: what is stored reads back as it came
    digest = hashlib.sha256(raw).hexdigest()
    with write_session(hub.engine) as s:
        s.execute(insert_ignore(hub.engine, WebhookEvent.__table__,  # type: ignore[arg-type]
                                {"body_sha256": digest, "body": text, "received_at": hub.now()}))
    return Response(status_code=204)


@router.get("/v1/labeling/events")
def events(after: int | None = Query(None, ge=0, le=2**31 - 1), limit: int = Query(100, ge=1, le=1000),
           _: Principal = Depends(require("labeler")), hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    with read_session(hub.engine) as s:
        if after is None:
            after = acked(s)
        rows = s.exec(select(WebhookEvent).where(col(WebhookEvent.id) > after)
                      .order_by(WebhookEvent.id).limit(limit)).all()
    return {"events": [_event(r, hub.settings.max_json_depth) for r in rows]}


def _event(row: WebhookEvent, max_depth: int) -> dict[str, Any]:
    """One inbox event; a stored body that cannot be read (stored by an older hub) comes back as
    ``body: null`` with the reason, so one bad event never blocks the feed: the bridge skips and acks it."""
    body, error = loads_or_none(row.body, max_depth=max_depth)
    if error is None:
        return {"id": row.id, "received_at": row.received_at, "body": body}
    log.warning("webhook event %s cannot be read (%s); served without its body", row.id, error)
    return {"id": row.id, "received_at": row.received_at, "body": None, "error": f"stored body is {error}"}


@router.post("/v1/labeling/events/ack", status_code=204)
def ack(body: AckRequest, _: Principal = Depends(require("labeler")), hub: Hub = Depends(get_hub)) -> Response:
    with write_session(hub.engine) as s:
        state = s.get(HubState, ACK_KEY)
        current = int(state.value) if state is not None else 0
        s.merge(HubState(key=ACK_KEY, value=str(max(current, body.up_to))))
    return Response(status_code=204)


def acked(s: Session) -> int:
    state = s.get(HubState, ACK_KEY)
    return int(state.value) if state is not None else 0
