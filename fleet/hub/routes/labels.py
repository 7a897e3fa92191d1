"""Human labels (idempotent per annotation) and the Label Studio webhook inbox."""

from __future__ import annotations

import hashlib
import hmac
import logging

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select

from fleet.errors import ProtocolError, Unauthorized
from fleet.hub import labels
from fleet.hub.api import HubDep, LabelerCaller, ReaderCaller, message_body, message_response, request_body
from fleet.hub.bodies import loads_or_none, parse_json
from fleet.hub.db import insert_ignore, read_session, write_session
from fleet.hub.models import HubState, LabelRow, WebhookEvent
from fleet.protocol import Ack, EventPage, LabelPage, LabelPost, LabelReceipt, StoredEvent, check_name

router = APIRouter(tags=["labels"])
log = logging.getLogger(__name__)

ACK_KEY = "labeling_events_acked"


@router.post("/v1/labels", response_model=LabelReceipt, openapi_extra=request_body(LabelPost))
def post_label(_: LabelerCaller, hub: HubDep, body: LabelPost = message_body(LabelPost)) -> Response:
    """Create, update or delete one annotation's answer; the hub decides its status (fleet.hub.labels) and
    answers with the verdicts on every answer of the case. The same post twice changes nothing."""
    for attempt in range(3):
        try:
            with write_session(hub.engine) as s:
                receipt = labels.apply(hub, s, body)
            return message_response(receipt)
        except DBIntegrityError:  # the same annotation raced in twice; the retry sees the winner
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@router.get("/v1/labels", response_model=LabelPage)
def list_labels(_: ReaderCaller, hub: HubDep, case_id: str | None = Query(None),
                limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0, le=2**63 - 1)) -> Response:
    q = select(LabelRow)
    if case_id is not None:  # a case id is a name (PostgreSQL refuses a NUL in text: that was a 500)
        q = q.where(LabelRow.case_id == check_name(case_id, "case_id"))
    with read_session(hub.engine) as s:
        rows = s.exec(q.order_by(LabelRow.id).offset(offset).limit(limit)).all()
    return message_response(LabelPage(labels=[labels.label_public(r) for r in rows]))


# ---------------------------------------------------------------------------------------------
# Label Studio webhook inbox
# ---------------------------------------------------------------------------------------------


@router.post("/v1/labeling/webhook", status_code=204, response_class=Response,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "description": "a Label Studio webhook body, stored as it came"}}}}})
async def webhook(request: Request, hub: HubDep) -> Response:
    """Store a raw webhook body once (idempotent by its hash); the bridge drains the inbox."""
    secret = request.headers.get("x-flywheel-webhook-secret", "")
    if not hmac.compare_digest(secret.encode(), hub.settings.webhook_secret.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-Flywheel-Webhook-Secret header")
    raw = await request.body()
    cfg = hub.settings
    doc = parse_json(raw, "webhook body", max_bytes=cfg.max_json_bytes, max_depth=cfg.max_json_depth)
    if not isinstance(doc, dict):
        raise ProtocolError(f"webhook body must be a JSON object; received {type(doc).__name__}")
    text = raw.decode("utf-8")  # parse_json checked it is UTF-8: what is stored reads back as it came
    digest = hashlib.sha256(raw).hexdigest()
    with write_session(hub.engine) as s:
        s.execute(insert_ignore(hub.engine, WebhookEvent.__table__,  # type: ignore[arg-type]
                                {"body_sha256": digest, "body": text, "received_at": hub.now()}))
    return Response(status_code=204)


@router.get("/v1/labeling/events", response_model=EventPage)
def events(_: LabelerCaller, hub: HubDep, after: int | None = Query(None, ge=0, le=2**31 - 1),
           limit: int = Query(100, ge=1, le=1000)) -> Response:
    with read_session(hub.engine) as s:
        if after is None:
            after = acked(s)
        rows = s.exec(select(WebhookEvent).where(col(WebhookEvent.id) > after)
                      .order_by(WebhookEvent.id).limit(limit)).all()
    return message_response(EventPage(events=[_event(r, hub.settings.max_json_depth) for r in rows]))


def _event(row: WebhookEvent, max_depth: int) -> StoredEvent:
    """One inbox event; a stored body that cannot be read (stored by an older hub) comes back as
    ``body: null`` with the reason, so one bad event never blocks the feed: the bridge skips and acks it."""
    body, error = loads_or_none(row.body, max_depth=max_depth)
    if error is None:
        return StoredEvent(id=int(row.id or 0), received_at=row.received_at, body=body)
    log.warning("webhook event %s cannot be read (%s); served without its body", row.id, error)
    return StoredEvent(id=int(row.id or 0), received_at=row.received_at, body=None, error=f"stored body is {error}")


@router.post("/v1/labeling/events/ack", status_code=204, response_class=Response, openapi_extra=request_body(Ack))
def ack(_: LabelerCaller, hub: HubDep, body: Ack = message_body(Ack)) -> Response:
    with write_session(hub.engine) as s:
        state = s.get(HubState, ACK_KEY)
        current = int(state.value) if state is not None else 0
        s.merge(HubState(key=ACK_KEY, value=str(max(current, body.up_to))))
    return Response(status_code=204)


def acked(s: Session) -> int:
    state = s.get(HubState, ACK_KEY)
    return int(state.value) if state is not None else 0
