"""Enrollment, tokens, heartbeats, OTA reports and each device's assignment."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select

from fleet.errors import Conflict, InvalidInput, NotFound, ProtocolError
from fleet.hub import enrollment, heartbeats, rollouts
from fleet.hub.api import AdminCaller, DeviceCaller, HubDep, message_body, message_response, request_body
from fleet.hub.auth import bearer, issue_token, require_device
from fleet.hub.context import Hub
from fleet.hub.db import read_session, write_session
from fleet.hub.models import ApiToken, Device, EnrollmentAttempt, HeartbeatState, OtaReportRow
from fleet.protocol import (
    ENROLL_OUTCOMES,
    MAX_DEVICES_PAGE,
    Assignment,
    DeviceList,
    DevicePublic,
    DeviceRevoked,
    Enrollment,
    EnrollmentAttemptList,
    EnrollmentAttemptPublic,
    EnrollRequest,
    Grant,
    GrantCreate,
    Heartbeat,
    OtaReport,
    TokenCreate,
    TokenIssued,
    TokenList,
    TokenPublic,
    check_name,
)

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
    except enrollment.REFUSALS as exc:
        enrollment.record(hub, client=client, device_id=body.device_id, outcome="refused", detail=str(exc))
        raise
    except DBIntegrityError:
        raise Conflict(f"device {body.device_id!r} is enrolling concurrently; retry") from None
    enrollment.record(hub, client=client, device_id=body.device_id, outcome="re-enrolled" if again else "enrolled",
                      method=granted.method)
    rollouts.fleet_changed()  # a canary stage counts the fleet's devices
    hub.tokens.clear()
    return message_response(Enrollment(device_id=body.device_id, token=token,
                                       fleet_public_key=hub.settings.public_key() or "", hub_time=now))


@router.post("/v1/devices/{device_id}/enrollment-token", status_code=201, response_model=Grant,
             openapi_extra=request_body(GrantCreate, required=False))
def create_enrollment_token(device_id: str, principal: AdminCaller, hub: HubDep,
                            body: GrantCreate = message_body(GrantCreate, optional=True)) -> Response:
    """A one-time, expiring token that enrolls ``device_id`` (new, or again after it lost its credentials)."""
    check_name(device_id, "device_id")
    ttl = body.ttl_s or hub.settings.enrollment_token_ttl_s
    with write_session(hub.engine) as s:
        token, expires = enrollment.issue_grant(s, device_id=device_id, group=body.group, now=hub.now(), ttl_s=ttl,
                                                created_by=principal.name)
    return message_response(Grant(device_id=device_id, enrollment_token=token, expires_at=expires, group=body.group),
                            status_code=201)


EnrollOutcome = Literal["enrolled", "re-enrolled", "refused"]
assert set(EnrollOutcome.__args__) == set(ENROLL_OUTCOMES)  # type: ignore[attr-defined]


@router.get("/v1/enrollment-attempts", response_model=EnrollmentAttemptList)
def enrollment_attempts(_: AdminCaller, hub: HubDep, device_id: str | None = Query(None, max_length=128),
                        outcome: EnrollOutcome | None = Query(None),
                        limit: int = Query(100, ge=1, le=1000)) -> Response:
    """The enrollment audit, newest first: who enrolled which device how, and every refused attempt."""
    q = select(EnrollmentAttempt)
    if device_id is not None:  # a device id is a name (PostgreSQL refuses a NUL in text: that was a 500)
        q = q.where(EnrollmentAttempt.device_id == check_name(device_id, "device_id"))
    if outcome is not None:
        q = q.where(EnrollmentAttempt.outcome == outcome)
    with read_session(hub.engine) as s:
        rows = s.exec(q.order_by(col(EnrollmentAttempt.id).desc()).limit(limit)).all()
    return message_response(EnrollmentAttemptList(attempts=[
        EnrollmentAttemptPublic(id=int(r.id or 0), at=r.at, client=r.client, device_id=r.device_id,
                                outcome=r.outcome, method=r.method, detail=r.detail) for r in rows]))


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
def assignment(principal: DeviceCaller, hub: HubDep, device_id: str | None = Query(None),
               triggers: str | None = Query(None, max_length=8192, description=(
                   "The trigger kinds the device's agent evaluates, comma-separated; campaigns come without the "
                   "leaves of other kinds (none left: the campaign is not sent). Absent: every kind."))) -> Response:
    """What the calling device should run (an admin may ask for any device with ?device_id=)."""
    target = principal.device_id if not principal.is_admin else device_id
    if target is None:
        raise ProtocolError("an admin must name the device: ?device_id=<id>")
    check_name(target, "device_id")
    kinds = parse_trigger_kinds(triggers)
    require_device(principal, target, "assignment request")
    if _rollout_due(hub):
        with write_session(hub.engine) as s:
            rollouts.evaluate_running(hub, s)
    with read_session(hub.engine) as s:
        device = s.get(Device, target)
        if device is None or device.revoked_at is not None:
            raise NotFound(f"unknown or revoked device {target!r}")
        return message_response(rollouts.assignment_for(s, device, now=hub.now(), triggers=kinds))


TRIGGER_KIND_RE = re.compile(r"[a-z0-9_]{1,64}")


def parse_trigger_kinds(text: str | None) -> frozenset[str] | None:
    """``?triggers=entropy,margin,...`` -> the set of kinds; None when absent. Each must be a trigger name
    (lowercase letters, digits, '_'); at most 256."""
    if text is None:
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if not TRIGGER_KIND_RE.fullmatch(k)]
    if bad or not kinds or len(kinds) > 256:
        raise ProtocolError(f"triggers must be 1 to 256 comma-separated trigger kinds (lowercase letters, digits, "
                            f"'_', up to 64 each); received {text[:200]!r}")
    return frozenset(kinds)


def _rollout_due(hub: Hub) -> bool:
    """Whether a running rollout's stage clock has run out (metric rollbacks happen on heartbeats)."""
    with read_session(hub.engine) as s:
        running = rollouts.running_rollouts(s)
    return any(r.stage_seconds is not None and hub.now() - r.stage_started_at >= r.stage_seconds for r in running)


DEVICES_LISTED = 1000  # devices a GET /v1/devices answers by default (?limit=, up to MAX_DEVICES_PAGE)
MAX_SEARCH = 64  # characters of a search of the devices (a device id or group is at most 64)


@router.get("/v1/devices", response_model=DeviceList)
def list_devices(_: AdminCaller, hub: HubDep, limit: int = Query(DEVICES_LISTED, ge=1, le=MAX_DEVICES_PAGE),
                 offset: int = Query(0, ge=0, le=2**63 - 1),
                 q: str = Query("", description="only devices whose id or group holds this text, in any case "
                                                f"(at most {MAX_SEARCH} characters)")) -> Response:
    """The enrolled devices by id, ``limit`` of them from ``offset`` (``total``: how many match in all, so a
    client pages until it has them), those whose id or group holds ``?q=`` where one is given."""
    with read_session(hub.engine) as s:
        page = device_page(s, offset=offset, limit=limit, search=q)
    return message_response(DeviceList(devices=page.devices, total=page.matching))


@dataclass(frozen=True)
class DevicePage:
    """One page of the enrolled devices (by id) matching a search, and how many match in all."""

    devices: list[DevicePublic]
    matching: int


def device_page(s: Session, *, offset: int, limit: int, search: str = "") -> DevicePage:
    """Rows ``offset`` to ``offset + limit`` of the enrolled devices, by id, whose id or group holds ``search``
    (any case, surrounding spaces dropped; empty: every device), with their spools and their evictions and human
    comparisons summed over their boots. The heartbeat sums are read for those devices alone, so a page costs the
    same in a fleet of a hundred devices or of a hundred thousand. A search over :data:`MAX_SEARCH` characters, or
    with a NUL, is an InvalidInput."""
    search = search.strip()
    if len(search) > MAX_SEARCH:
        raise InvalidInput(f"the search may be at most {MAX_SEARCH} characters; received {len(search)}")
    if "\x00" in search:  # PostgreSQL's text cannot hold a NUL (that was a 500); no id or group holds one
        raise InvalidInput(f"the search may not hold a NUL character; received {search!r}")
    where = sa.true() if not search else sa.or_(col(Device.device_id).icontains(search, autoescape=True),
                                                col(Device.group).icontains(search, autoescape=True))
    matching = int(s.exec(select(sa.func.count()).select_from(Device).where(where)).one())
    if offset >= matching:  # past the last (an offset beyond what the database's integers hold is not sent)
        return DevicePage([], matching)
    rows = s.exec(select(Device).where(where).order_by(Device.device_id).offset(offset).limit(limit)).all()
    return DevicePage(_public(s, rows), matching)


def _public(s: Session, rows: Sequence[Device]) -> list[DevicePublic]:
    """The devices ``rows`` with their sums over their boots' heartbeats."""
    summed: dict[str, dict[str, int]] = {}
    for device_id, values in s.exec(select(HeartbeatState.device_id, HeartbeatState.values)
                                    .where(col(HeartbeatState.device_id).in_([d.device_id for d in rows]))).all():
        acc = summed.setdefault(device_id, {})
        for k in _SUMMED:
            acc[k] = acc.get(k, 0) + int(values.get(k, 0))
    return [DevicePublic(device_id=d.device_id, group=d.group, enrolled_at=d.enrolled_at, revoked_at=d.revoked_at,
                         last_seen_at=d.last_seen_at, model_version=d.model_version, boot_id=d.boot_id,
                         spool_bytes=d.spool_bytes, spool_items=d.spool_items, **summed.get(d.device_id, {}))
            for d in rows]


def fleet_counts(s: Session) -> tuple[int, int, dict[str, int]]:
    """Enrolled devices, those ever heard from, and devices per model version (``(none)``: no model yet)."""
    total, heard = s.exec(select(sa.func.count(), sa.func.count(col(Device.last_seen_at)))).one()
    per_model = {str(v or "(none)"): int(n) for v, n in s.exec(
        select(Device.model_version, sa.func.count()).group_by(Device.model_version)
        .order_by(Device.model_version)).all()}
    return int(total), int(heard), per_model


_SUMMED = ("evicted", "human_compared", "human_disagreed")  # cumulative per boot in HeartbeatState.values


@router.post("/v1/devices/{device_id}/revoke", response_model=DeviceRevoked)
def revoke_device(device_id: str, _: AdminCaller, hub: HubDep) -> Response:
    """The device never enrolls again, and every token it holds stops working."""
    check_name(device_id, "device_id")
    now = hub.now()
    with write_session(hub.engine) as s:
        device = s.get(Device, device_id)
        if device is None:
            raise NotFound(f"unknown device {device_id!r}")
        device.revoked_at = device.revoked_at or now
        s.add(device)
        n = s.execute(sa.update(ApiToken).where(col(ApiToken.device_id) == device_id,
                                                col(ApiToken.revoked_at).is_(None)).values(revoked_at=now))
    hub.tokens.clear()
    rollouts.fleet_changed()
    return message_response(DeviceRevoked(device_id=device_id, revoked_at=device.revoked_at, tokens_revoked=n.rowcount))


@router.post("/v1/tokens", status_code=201, response_model=TokenIssued, openapi_extra=request_body(TokenCreate))
def create_token(_: AdminCaller, hub: HubDep, body: TokenCreate = message_body(TokenCreate)) -> Response:
    """A new admin, labeler or trainer token (shown once)."""
    try:
        with write_session(hub.engine) as s:
            token = issue_token(s, scope=body.scope, name=body.name, now=hub.now())
    except DBIntegrityError:
        raise Conflict(f"a token named {body.name!r} already exists; revoke it or pick another name") from None
    return message_response(TokenIssued(name=body.name, scope=body.scope, token=token), status_code=201)


@router.get("/v1/tokens", response_model=TokenList)
def list_tokens(_: AdminCaller, hub: HubDep) -> Response:
    """The admin, labeler and trainer tokens by name (never the tokens themselves)."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(ApiToken).where(ApiToken.scope != "device").order_by(ApiToken.name)).all()
    return message_response(TokenList(tokens=[token_public(t) for t in rows]))


@router.delete("/v1/tokens/{name}", response_model=TokenPublic)
def revoke_token(name: str, _: AdminCaller, hub: HubDep) -> Response:
    check_name(name, "token name")
    with write_session(hub.engine) as s:
        tok = s.exec(select(ApiToken).where(ApiToken.name == name)).first()
        if tok is None:
            raise NotFound(f"no token named {name!r}")
        tok.revoked_at = tok.revoked_at or hub.now()
        s.add(tok)
        out = token_public(tok)
    hub.tokens.clear()
    return message_response(out)


def token_public(t: ApiToken) -> TokenPublic:
    return TokenPublic(name=t.name, scope=t.scope, created_at=t.created_at, revoked_at=t.revoked_at)
