"""Health, Prometheus metrics and the JSON summary."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Request, Response

from fleet.hub import observe
from fleet.hub.auth import Principal, require
from fleet.hub.context import Hub, get_hub
from fleet.hub.db import read_session
from fleet.hub.routes.labels import acked

router = APIRouter(tags=["observability"])


@router.get("/healthz")
def healthz(hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Liveness and database reachability (no auth)."""
    try:
        with hub.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        raise HTTPException(503, detail=f"database unreachable: {type(exc).__name__}") from None
    return {"ok": True, "database": hub.engine.dialect.name, "time": hub.now()}


@router.get("/metrics")
def metrics(request: Request, _: Principal = Depends(require("admin")), hub: Hub = Depends(get_hub)) -> Response:
    with read_session(hub.engine) as s:
        text = observe.prometheus(s, request.app.state.request_metrics, events_acked=acked(s))
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/summary")
def summary(_: Principal = Depends(require("trainer", "labeler")), hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    with read_session(hub.engine) as s:
        return observe.summary(s, events_acked=acked(s))
