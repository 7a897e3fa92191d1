"""The hub's dashboard at ``/ui``: server-rendered pages (Jinja2, inline SVG charts, no script) behind an admin
login; :func:`install` adds it to an app."""

from __future__ import annotations

from typing import Any, cast

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse

from fleet.errors import FlywheelError, status_for


def install(app: FastAPI) -> None:
    """Mount the pages; a page without a valid session redirects to the login, and a fault inside ``/ui``
    renders as a page rather than JSON."""
    from fleet.hub.ui.pages import router, templates
    from fleet.hub.ui.session import LoginRequired, current_admin

    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse("/ui/login", status_code=303)

    previous: Any = app.exception_handlers[FlywheelError]

    @app.exception_handler(FlywheelError)
    async def _fault(request: Request, exc: FlywheelError) -> Response:
        if not request.url.path.startswith("/ui/"):
            return cast(Response, await previous(request, exc))
        try:
            admin = current_admin(request.app.state.hub, request)
        except LoginRequired:
            return RedirectResponse("/ui/login", status_code=303)
        return templates.TemplateResponse(request, "error.html", {"admin": admin, "nav": "", "detail": str(exc)},
                                          status_code=status_for(exc))

