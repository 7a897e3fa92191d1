"""Enrollment that cannot steal an identity: who may enroll which device id, the audit, the rate limit.

A device id is bound to its first enrollment. The credentials ``POST /v1/enroll`` accepts:

=====================  ============================================================================
``fleet-secret``       the shared fleet secret (every device's config holds it): enrolls a *new*
                       device id only, and only one on ``enrollment_allow`` when that list is set,
                       and never when ``enrollment_require_token`` is on.
``enrollment-token``   a one-time, expiring token an admin issued for exactly this device id
                       (``POST /v1/devices/{id}/enrollment-token`` or ``flywheel hub enrollment-token``):
                       enrolls it new or again (a device that lost its credentials).
``device-token``       the device's own current token (``Authorization: Bearer``; what
                       ``flywheel agent enroll --force`` sends): re-enrolls that device, nothing else.
``admin``              an admin token (``Authorization: Bearer``): enrolls or re-enrolls any id.
=====================  ============================================================================

Re-enrolling an enrolled id with the fleet secret alone is a 409 that names these options. A
revoked device never enrolls again. Every attempt, granted or refused, is a row of
``enrollment_attempts`` (``GET /v1/enrollment-attempts``); a client address with
``enroll_max_failures`` refusals within ``enroll_failure_window_s`` gets 429 and Retry-After
until the window has moved on (counted in the database, so across every worker).
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import secrets
from dataclasses import dataclass

from sqlmodel import Session, col, func, select

from fleet.errors import Conflict, Forbidden, TooManyRequests, Unauthorized
from fleet.hub.auth import Principal, hash_token, lookup_token
from fleet.hub.context import Hub
from fleet.hub.db import read_session, write_session
from fleet.hub.models import Device, EnrollmentAttempt, EnrollmentGrant

log = logging.getLogger(__name__)

GRANT_PREFIX = "fwe_"


@dataclass(frozen=True)
class Credentials:
    """What an enrollment request carries besides the device id."""

    fleet_secret: str = ""
    enrollment_token: str = ""
    bearer: str | None = None


@dataclass(frozen=True)
class Granted:
    method: str  # fleet-secret | enrollment-token | device-token | admin
    grant_id: int | None = None
    group: str | None = None  # a grant's group, which wins over the request's


# what a refused enrollment is (recorded in the audit and counted against the client): refused credentials
# (Unauthorized, 401; Forbidden, 403) or an id the credentials cannot enroll again (Conflict, 409)
REFUSALS = (Unauthorized, Conflict)


def check_rate(hub: Hub, client: str) -> None:
    """429 if ``client`` had ``enroll_max_failures`` refusals within the window."""
    cfg = hub.settings
    since = hub.now() - cfg.enroll_failure_window_s
    with read_session(hub.engine) as s:
        n, first = s.exec(select(func.count(), func.min(EnrollmentAttempt.at)).where(
            EnrollmentAttempt.client == client, EnrollmentAttempt.outcome == "refused",
            col(EnrollmentAttempt.at) >= since)).one()
    if n >= cfg.enroll_max_failures:
        retry = max(1, int((first or since) + cfg.enroll_failure_window_s - hub.now()) + 1)
        log.warning("enrollment from %s refused: %d failed attempts in %.0f s", client, n, cfg.enroll_failure_window_s)
        raise TooManyRequests(f"{n} failed enrollment attempts from {client} in the last "
                              f"{cfg.enroll_failure_window_s:g} s; the limit is {cfg.enroll_max_failures}: "
                              f"retry after {retry} s", retry_after=retry)


def authorize(hub: Hub, s: Session, device_id: str, creds: Credentials) -> Granted:
    """Which credential lets this request enroll ``device_id`` (or one of :data:`REFUSALS` saying why not)."""
    device = s.get(Device, device_id)
    if device is not None and device.revoked_at is not None:
        raise Forbidden(f"device {device_id!r} was revoked; it cannot enroll again")
    if creds.bearer is not None:
        return _by_bearer(hub, device_id, creds.bearer)
    if creds.enrollment_token:
        return _by_grant(hub, s, device_id, creds.enrollment_token)
    cfg = hub.settings
    if not creds.fleet_secret:
        raise Unauthorized("no credentials: send fleet_secret, an enrollment_token, or "
                           "'Authorization: Bearer <this device's token or an admin token>'")
    if not hmac.compare_digest(creds.fleet_secret.encode("utf-8", "replace"),  # (JSON may carry lone surrogates)
                               cfg.fleet_secret.get_secret_value().encode()):
        raise Unauthorized("fleet secret does not match this hub's")
    if device is not None:
        raise Conflict(
            f"device {device_id!r} is already enrolled; the fleet secret only enrolls new devices. To enroll it "
            f"again send its current token ('Authorization: Bearer ...', which 'flywheel agent enroll --force' "
            f"does), an admin token, or an enrollment token an admin issued for it "
            f"(POST /v1/devices/{device_id}/enrollment-token or 'flywheel hub enrollment-token {device_id}')")
    if cfg.enrollment_require_token:
        raise Forbidden(f"this hub enrolls devices only with a per-device enrollment token; ask an "
                        f"admin for one for {device_id!r}")
    if cfg.enrollment_allow and not any(fnmatch.fnmatchcase(device_id, p) for p in cfg.enrollment_allow):
        raise Forbidden(f"device id {device_id!r} is not on this hub's enrollment allow-list "
                        f"{cfg.enrollment_allow}; ask an admin for an enrollment token")
    return Granted("fleet-secret")


def _by_bearer(hub: Hub, device_id: str, token: str) -> Granted:
    principal: Principal | None = lookup_token(hub, token)
    if principal is None:
        raise Unauthorized("unknown or revoked bearer token")
    if principal.is_admin:
        return Granted("admin")
    if principal.scope == "device" and principal.device_id == device_id:
        return Granted("device-token")
    raise Forbidden(f"a {principal.scope} token"
                    f"{f' of device {principal.device_id!r}' if principal.device_id else ''} cannot "
                    f"enroll device {device_id!r}")


def _by_grant(hub: Hub, s: Session, device_id: str, token: str) -> Granted:
    if not token.isascii():  # every token the hub issues is ASCII
        raise Unauthorized(f"enrollment token is not valid for device {device_id!r}")
    grant = s.exec(select(EnrollmentGrant).where(EnrollmentGrant.token_hash == hash_token(token))).first()
    if grant is None or grant.device_id != device_id:
        raise Unauthorized(f"enrollment token is not valid for device {device_id!r}")
    if grant.used_at is not None:
        raise Unauthorized(f"enrollment token for {device_id!r} was already used; ask for a new one")
    if grant.expires_at <= hub.now():
        raise Unauthorized(f"enrollment token for {device_id!r} expired; ask for a new one")
    return Granted("enrollment-token", grant_id=grant.id, group=grant.group)


def use_grant(hub: Hub, s: Session, granted: Granted) -> None:
    """Spend a one-time enrollment token (in the enrolling transaction)."""
    if granted.grant_id is not None:
        grant = s.get(EnrollmentGrant, granted.grant_id)
        assert grant is not None
        grant.used_at = hub.now()
        s.add(grant)


def record(hub: Hub, *, client: str, device_id: str | None, outcome: str, method: str = "", detail: str = "") -> None:
    """One audit row (its own transaction, so a refusal is recorded even though its request failed)."""
    with write_session(hub.engine) as s:
        s.add(EnrollmentAttempt(at=hub.now(), client=client[:64], device_id=device_id, outcome=outcome,
                                method=method, detail=detail[:2000]))
    if outcome == "refused":
        log.warning("enrollment of %r from %s refused: %s", device_id, client, detail)


def issue_grant(s: Session, *, device_id: str, group: str | None, now: float, ttl_s: float,
                created_by: str) -> tuple[str, float]:
    """Add a one-time enrollment token for ``device_id`` (the caller commits); return it and its expiry."""
    device = s.get(Device, device_id)
    if device is not None and device.revoked_at is not None:
        raise Conflict(f"device {device_id!r} was revoked; it cannot enroll again")
    token = GRANT_PREFIX + secrets.token_urlsafe(32)
    s.add(EnrollmentGrant(device_id=device_id, token_hash=hash_token(token), group=group, created_at=now,
                          expires_at=now + ttl_s, created_by=created_by))
    return token, now + ttl_s
