"""Bearer tokens (stored as sha256, revocable), scopes, FastAPI dependencies and signed image URLs.

Scopes: ``device`` (issued by enrollment, bound to one device), ``admin`` (engineers; may do
anything), ``labeler`` (the labeling bridge) and ``trainer``. A worker caches a token lookup for
``token_cache_ttl_s`` seconds; a revocation is seen at once by the worker that made it and by the
others within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from fleet.errors import Forbidden, Unauthorized
from fleet.hub.context import Hub, get_hub
from fleet.hub.models import ApiToken
from fleet.protocol import SCOPES

TOKEN_PREFIX = "fwt_"
BOOTSTRAP_ADMIN = "bootstrap-admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's scope and name, and for a device token the device it is bound to."""

    scope: str
    name: str
    device_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(session: Session, *, scope: str, name: str, now: float, device_id: str | None = None) -> str:
    """Add a token row (the caller commits) and return the only copy of the plain token."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}; received {scope!r}")
    token = new_token()
    session.add(ApiToken(name=name, scope=scope, token_hash=hash_token(token), device_id=device_id,
                         created_at=now))
    return token


def lookup_token(hub: Hub, token: str) -> Principal | None:
    """The principal behind ``token``, or None if it is unknown or revoked."""
    digest = hash_token(token)
    admin = hub.settings.admin_token.get_secret_value()
    if admin and hmac.compare_digest(digest, hash_token(admin)):
        return Principal(scope="admin", name=BOOTSTRAP_ADMIN)
    cached = hub.tokens.get(digest)
    if cached is not None:
        return cached if isinstance(cached, Principal) else None
    with Session(hub.engine) as s:
        row = s.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    found = None if row is None or row.revoked_at is not None else Principal(row.scope, row.name, row.device_id)
    hub.tokens.put(digest, found if found is not None else False)
    return found


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    return token.strip()


def require(*scopes: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits tokens of ``scopes`` (admin always) and returns the caller."""
    allowed = set(scopes) | {"admin"}
    for s in scopes:
        assert s in SCOPES, s

    async def dependency(request: Request, hub: Hub = Depends(get_hub)) -> Principal:
        token = bearer(request)
        digest = hash_token(token)
        cached = hub.tokens.get(digest)
        principal = cached if isinstance(cached, Principal) else None
        if cached is None:
            principal = await run_in_threadpool(lookup_token, hub, token)
        if principal is None:
            raise Unauthorized("unknown or revoked token")
        if principal.scope not in allowed:
            raise Forbidden(f"a {principal.scope} token may not call {request.method} {request.url.path}; it needs "
                            f"scope {sorted(allowed)}")
        return principal

    return dependency


def require_device(principal: Principal, device_id: str, what: str) -> None:
    """A device token may only act for its own device (admin may act for any)."""
    if principal.is_admin:
        return
    if principal.device_id != device_id:
        raise Forbidden(f"this token is bound to device {principal.device_id!r}; the {what} names device "
                        f"{device_id!r}")


# ---------------------------------------------------------------------------------------------
# signed, expiring image URLs (for annotators' browsers, which cannot send a bearer token)
# ---------------------------------------------------------------------------------------------


def sign_image(secret: str, case_id: str, expires: int) -> str:
    msg = f"image:{case_id}:{expires}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def image_query(secret: str, case_id: str, ttl_s: float, *, now: float | None = None) -> str:
    exp = int((time.time() if now is None else now) + ttl_s)
    return f"exp={exp}&sig={sign_image(secret, case_id, exp)}"


def check_image_signature(secret: str, case_id: str, exp: int, sig: str, *, now: float) -> None:
    if exp < now:
        raise Forbidden(f"image link expired at {exp} (now {int(now)}); ask for a fresh selection")
    # as bytes: compare_digest refuses str with non-ASCII characters (a 500 on a garbled link)
    if not hmac.compare_digest(sign_image(secret, case_id, exp).encode(), (sig or "").encode("utf-8", "replace")):
        raise Forbidden("image link signature does not verify")
