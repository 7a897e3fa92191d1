"""The dashboard's login: an admin token posted once, then a signed, HttpOnly, SameSite=Strict session cookie.

The cookie holds the token's sha256 and the time it was signed (itsdangerous, keyed by the hub's URL secret),
never the token. Every page checks it again: a revoked admin token, or a changed bootstrap token, ends the
session at once; it also ends after ``SESSION_MAX_AGE_S``.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlmodel import select

from fleet.hub.auth import BOOTSTRAP_ADMIN, Principal, hash_token, lookup_token
from fleet.hub.context import Hub
from fleet.hub.db import read_session
from fleet.hub.models import ApiToken

COOKIE = "flywheel_ui"
COOKIE_PATH = "/ui"
SESSION_MAX_AGE_S = 12 * 3600
_SALT = "flywheel-ui-session"


class LoginRequired(Exception):
    """Raised by a page whose request carries no valid session; the app answers with a redirect to the login."""


def login(hub: Hub, token: str) -> Principal | None:
    """The admin behind ``token``, or None when it is unknown, revoked or of another scope."""
    principal = lookup_token(hub, token.strip()) if token.strip() else None
    return principal if principal is not None and principal.is_admin else None


def set_session(hub: Hub, request: Request, response: Response, token: str) -> None:
    value = _serializer(hub).dumps({"digest": hash_token(token.strip())})
    response.set_cookie(COOKIE, value, max_age=SESSION_MAX_AGE_S, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def clear_session(response: Response) -> None:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")


def current_admin(hub: Hub, request: Request) -> Principal:
    """The admin whose session the request carries; :class:`LoginRequired` when none is valid now."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        raise LoginRequired("no session")
    try:
        data = _serializer(hub).loads(raw, max_age=SESSION_MAX_AGE_S)
    except BadSignature:
        raise LoginRequired("the session cookie does not verify or has expired") from None
    digest = data.get("digest") if isinstance(data, dict) else None
    if not isinstance(digest, str):
        raise LoginRequired("the session cookie holds no token digest")
    admin = hub.settings.admin_token.get_secret_value()
    if admin and hmac.compare_digest(digest, hash_token(admin)):
        return Principal(scope="admin", name=BOOTSTRAP_ADMIN)
    with read_session(hub.engine) as s:
        row = s.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or row.revoked_at is not None or row.scope != "admin":
        raise LoginRequired("the session's admin token was revoked")
    return Principal(scope=row.scope, name=row.name)


def _serializer(hub: Hub) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(hub.settings.url_secret.get_secret_value(), salt=_SALT)
