"""Health, Prometheus metrics and the JSON summary."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response

from fleet.errors import ServerBusy
from fleet.hub import observe
from fleet.hub.api import AdminCaller, HubDep, ReaderCaller, message_response
from fleet.hub.db import read_session
from fleet.hub.routes.labels import acked
from fleet.hub.yields import recent_yields
from fleet.protocol import Health, Summary

router = APIRouter(tags=["observability"])

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", response_model=Health,
            responses={503: {"description": "the database is unreachable (ServerBusy)"}})
def healthz(hub: HubDep) -> Response:
    """Liveness and database reachability (no auth)."""
    try:
        with hub.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        raise ServerBusy(f"database unreachable: {type(exc).__name__}") from None
    return message_response(Health(ok=True, database=hub.engine.dialect.name, time=hub.now()))


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
def metrics(request: Request, _: AdminCaller, hub: HubDep) -> Response:
    with read_session(hub.engine) as s:
        text = observe.prometheus(s, request.app.state.request_metrics, events_acked=acked(s),
                                  yields=recent_yields(hub, s))
    return Response(text, media_type=PROMETHEUS_TEXT)


@router.get("/v1/summary", response_model=Summary)
def summary(_: ReaderCaller, hub: HubDep) -> Response:
    """The loop at a glance: per model version, the queues, totals, the active model and the running rollout."""
    with read_session(hub.engine) as s:
        return message_response(observe.summary(s, events_acked=acked(s)))
