"""Enrollment, tokens, heartbeats, OTA reports and each device's assignment."""

from __future__ import annotations

import secrets
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import col, select

from fleet.hub import enrollment, heartbeats, rollouts
from fleet.hub.api import DeviceCaller, HubDep, message_body, message_response, request_body
from fleet.hub.auth import Principal, bearer, issue_token, require, require_device
from fleet.hub.context import Hub, get_hub
from fleet.hub.db import read_session, write_session
from fleet.hub.models import ENROLL_OUTCOMES, ApiToken, Device, EnrollmentAttempt, OtaReportRow
from fleet.hub.schemas import GrantCreate, TokenCreate, TokenPublic
from fleet.protocol import Assignment, Enrollment, EnrollRequest, Heartbeat, OtaReport, check_name

router = APIRouter(tags=["devices"])


@router.post("/v1/enroll", response_model=Enrollment, openapi_extra=request_body(EnrollRequest))
def enroll(request: Request, hub: HubDep, body: EnrollRequest = message_body(EnrollRequest)) -> Response:
    """Trade a credential for a per-device token; re-enrolling replaces the device's old tokens.

    The fleet secret enrolls only new device ids; an enrolled id needs its own current token, an
    admin token or an admin's enrollment token (fleet.hub.enrollment has the rules).
    """
    client = request.client.host if request.client else "unknown"
    enrollment.check_rate(hub, client)
    header = request.headers.get("authorization")
    creds = enrollment.Credentials(fleet_secret=body.fleet_secret, enrollment_token=body.enrollment_token,
                                   bearer=bearer(request) if header is not None else None)
    now = hub.now()
    try:
        with write_session(hub.engine) as s:
            granted = enrollment.authorize(hub, s, body.device_id, creds)
            group = granted.group or body.group
            device = s.get(Device, body.device_id)
            again = device is not None
            if device is None:
                device = Device(device_id=body.device_id, group=group, enrolled_at=now)
            else:
                device.group = group
                s.execute(sa.update(ApiToken).where(col(ApiToken.device_id) == body.device_id,
                                                    col(ApiToken.revoked_at).is_(None)).values(revoked_at=now))
            s.add(device)
            enrollment.use_grant(hub, s, granted)
            token = issue_token(s, scope="device", name=f"device-{secrets.token_hex(8)}", now=now,
                                device_id=body.device_id)
    except enrollment.Refused as exc:
        enrollment.record(hub, client=client, device_id=body.device_id, outcome="refused", detail=str(exc.detail))
        raise
    except DBIntegrityError:
        raise HTTPException(409, detail=f"device {body.device_id!r} is enrolling concurrently; retry") from None
    enrollment.record(hub, client=client, device_id=body.device_id, outcome="re-enrolled" if again else "enrolled",
                      method=granted.method)
    hub.tokens.clear()
    return message_response(Enrollment(device_id=body.device_id, token=token,
                                       fleet_public_key=hub.settings.public_key() or "", hub_time=now))


@router.post("/v1/devices/{device_id}/enrollment-token", status_code=201)
def create_enrollment_token(device_id: str, body: GrantCreate | None = Body(None),
                            principal: Principal = Depends(require("admin")),
                            hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """A one-time, expiring token that enrolls ``device_id`` (new, or again after it lost its credentials)."""
    check_name(device_id, "device_id")
    body = body or GrantCreate()
    ttl = body.ttl_s or hub.settings.enrollment_token_ttl_s
    with write_session(hub.engine) as s:
        token, expires = enrollment.issue_grant(s, device_id=device_id, group=body.group, now=hub.now(), ttl_s=ttl,
                                                created_by=principal.name)
    return {"device_id": device_id, "enrollment_token": token, "expires_at": expires, "group": body.group}


@router.get("/v1/enrollment-attempts")
def enrollment_attempts(device_id: str | None = Query(None, max_length=128), outcome: str | None = Query(None),
                        limit: int = Query(100, ge=1, le=1000), _: Principal = Depends(require("admin")),
                        hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """The enrollment audit, newest first: who enrolled which device how, and every refused attempt."""
    if outcome is not None and outcome not in ENROLL_OUTCOMES:
        raise HTTPException(422, detail=f"outcome must be one of {list(ENROLL_OUTCOMES)}; received {outcome!r}")
    q = select(EnrollmentAttempt)
    if device_id is not None:
        q = q.where(EnrollmentAttempt.device_id == device_id)
    if outcome is not None:
        q = q.where(EnrollmentAttempt.outcome == outcome)
    with read_session(hub.engine) as s:
        rows = s.exec(q.order_by(col(EnrollmentAttempt.id).desc()).limit(limit)).all()
    return [r.model_dump() for r in rows]


@router.post("/v1/heartbeats", status_code=204, response_class=Response, openapi_extra=request_body(Heartbeat))
def heartbeat(principal: DeviceCaller, hub: HubDep, hb: Heartbeat = message_body(Heartbeat)) -> Response:
    require_device(principal, hb.device_id, "heartbeat")
    for attempt in range(3):
        try:
            with write_session(hub.engine) as s:
                heartbeats.record_heartbeat(hub, s, hb)
                rollouts.evaluate_running(hub, s)
            break
        except DBIntegrityError:  # two heartbeats of one new boot raced; the second sees the first's row
            if attempt == 2:
                raise
    return Response(status_code=204)


@router.post("/v1/ota-reports", status_code=204, response_class=Response, openapi_extra=request_body(OtaReport))
def ota_report(principal: DeviceCaller, hub: HubDep, report: OtaReport = message_body(OtaReport)) -> Response:
    require_device(principal, report.device_id, "OTA report")
    with write_session(hub.engine) as s:
        s.add(OtaReportRow(device_id=report.device_id, version=report.version, outcome=report.outcome,
                           reason=report.reason, previous_version=report.previous_version,
                           reported_at=report.reported_at, received_at=hub.now()))
        if report.outcome in ("refused", "rolled_back") and heartbeats.record_ota_failure(hub, s, report):
            rollouts.evaluate_running(hub, s)
    return Response(status_code=204)


@router.get("/v1/assignment", response_model=Assignment)
def assignment(principal: DeviceCaller, hub: HubDep, device_id: str | None = Query(None)) -> Response:
    """What the calling device should run (an admin may ask for any device with ?device_id=)."""
    target = principal.device_id if not principal.is_admin else device_id
    if target is None:
        raise HTTPException(422, detail="an admin must name the device: ?device_id=<id>")
    check_name(target, "device_id")
    require_device(principal, target, "assignment request")
    if _rollout_due(hub):
        with write_session(hub.engine) as s:
            rollouts.evaluate_running(hub, s)
    with read_session(hub.engine) as s:
        device = s.get(Device, target)
        if device is None or device.revoked_at is not None:
            raise HTTPException(404, detail=f"unknown or revoked device {target!r}")
        return message_response(rollouts.assignment_for(s, device, now=hub.now()))


def _rollout_due(hub: Hub) -> bool:
    """Whether a running rollout's stage clock has run out (metric rollbacks happen on heartbeats)."""
    with read_session(hub.engine) as s:
        r = rollouts.running_rollout(s)
    return r is not None and r.stage_seconds is not None and hub.now() - r.stage_started_at >= r.stage_seconds


@router.get("/v1/devices")
def list_devices(_: Principal = Depends(require("admin")), hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    with read_session(hub.engine) as s:
        return [d.model_dump() for d in s.exec(select(Device).order_by(Device.device_id)).all()]


@router.post("/v1/devices/{device_id}/revoke")
def revoke_device(device_id: str, _: Principal = Depends(require("admin")),
                  hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    check_name(device_id, "device_id")
    now = hub.now()
    with write_session(hub.engine) as s:
        device = s.get(Device, device_id)
        if device is None:
            raise HTTPException(404, detail=f"unknown device {device_id!r}")
        device.revoked_at = device.revoked_at or now
        s.add(device)
        n = s.execute(sa.update(ApiToken).where(col(ApiToken.device_id) == device_id,
                                                col(ApiToken.revoked_at).is_(None)).values(revoked_at=now))
    hub.tokens.clear()
    return {"device_id": device_id, "revoked_at": device.revoked_at, "tokens_revoked": n.rowcount}


@router.post("/v1/tokens", status_code=201)
def create_token(body: TokenCreate, _: Principal = Depends(require("admin")),
                 hub: Hub = Depends(get_hub)) -> TokenPublic:
    try:
        with write_session(hub.engine) as s:
            token = issue_token(s, scope=body.scope, name=body.name, now=hub.now())
    except DBIntegrityError:
        raise HTTPException(409, detail=f"a token named {body.name!r} already exists; revoke it or pick "
                                        f"another name") from None
    return TokenPublic(name=body.name, scope=body.scope, token=token)


@router.get("/v1/tokens")
def list_tokens(_: Principal = Depends(require("admin")), hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    with read_session(hub.engine) as s:
        rows = s.exec(select(ApiToken).where(ApiToken.scope != "device").order_by(ApiToken.name)).all()
        return [{"name": t.name, "scope": t.scope, "created_at": t.created_at, "revoked_at": t.revoked_at}
                for t in rows]


@router.delete("/v1/tokens/{name}")
def revoke_token(name: str, _: Principal = Depends(require("admin")), hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    check_name(name, "token name")
    with write_session(hub.engine) as s:
        tok = s.exec(select(ApiToken).where(ApiToken.name == name)).first()
        if tok is None:
            raise HTTPException(404, detail=f"no token named {name!r}")
        tok.revoked_at = tok.revoked_at or hub.now()
        s.add(tok)
    hub.tokens.clear()
    return {"name": name, "revoked_at": tok.revoked_at}
