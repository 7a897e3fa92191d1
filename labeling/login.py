"""Logging a Label Studio user in (or signing one up through the invite link), as a person does in the browser."""

from __future__ import annotations

import httpx

from fleet.errors import TransportError, Unauthorized


def user_token(url: str, email: str, password: str, *, invite_token: str | None = None,
               transport: httpx.BaseTransport | None = None, timeout_s: float = 30.0) -> str:
    """The API token of a Label Studio user, signing the user up (through the organization's invite
    link) the first time and logging in afterwards, the way a person does in the browser."""
    base = url.rstrip("/")
    session = httpx.Client(base_url=base, timeout=timeout_s, follow_redirects=False, transport=transport)
    try:
        for path in ("/user/login/", f"/user/signup/?token={invite_token}" if invite_token else None):
            if path is None:
                continue
            try:
                session.get(path)
                csrf = session.cookies.get("csrftoken") or ""
                session.post(path, data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
                             headers={"Referer": base + path, "X-CSRFToken": csrf})
                r = session.get("/api/current-user/token")
            except httpx.TransportError as exc:
                raise TransportError(f"Label Studio login for {email}: {type(exc).__name__}: {exc}") from exc
            if r.status_code == 200 and "token" in r.json():
                return str(r.json()["token"])
        raise Unauthorized(f"could not log in or sign up {email!r} at {base} (is signup allowed with the invite link?)")
    finally:
        session.close()
