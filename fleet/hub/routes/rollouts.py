"""Staged rollouts over HTTP: start, inspect, advance, roll back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException
from sqlmodel import col, select

from fleet.hub import rollouts
from fleet.hub.auth import Principal, require
from fleet.hub.context import Hub, get_hub
from fleet.hub.db import read_session, write_session
from fleet.hub.models import Rollout
from fleet.hub.schemas import RollbackRequest, RolloutCreate

router = APIRouter(tags=["rollouts"])


@router.post("/v1/rollouts", status_code=201)
def start(body: RolloutCreate, _: Principal = Depends(require("trainer")),
          hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    with write_session(hub.engine) as s:
        r = rollouts.start(hub, s, body.version, body.stages, body.stage_seconds)
        s.flush()
        return rollouts.rollout_status(s, r)


@router.get("/v1/rollouts")
def list_rollouts(_: Principal = Depends(require("trainer")), hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    with read_session(hub.engine) as s:
        rows = s.exec(select(Rollout).order_by(col(Rollout.created_at).desc())).all()
        return [rollouts.rollout_status(s, r) for r in rows]


@router.get("/v1/rollouts/{rollout_id}")
def get_rollout(rollout_id: str, _: Principal = Depends(require("trainer")),
                hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    with write_session(hub.engine) as s:
        r = _get(s, rollout_id)
        rollouts.evaluate(hub, s, r)
        s.flush()
        return rollouts.rollout_status(s, r)


@router.post("/v1/rollouts/{rollout_id}/advance")
def advance(rollout_id: str, _: Principal = Depends(require("trainer")), hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    with write_session(hub.engine) as s:
        r = _get(s, rollout_id)
        if rollouts.evaluate(hub, s, r) is None:  # (a due clock or a rollback already moved it)
            rollouts.advance(hub, s, r, reason="advanced by request")
        s.flush()
        return rollouts.rollout_status(s, r)


@router.post("/v1/rollouts/{rollout_id}/rollback")
def rollback(rollout_id: str, body: RollbackRequest | None = Body(None), _: Principal = Depends(require("trainer")),
             hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    with write_session(hub.engine) as s:
        r = _get(s, rollout_id)
        rollouts.rollback(hub, s, r, reason=(body or RollbackRequest()).reason)
        s.flush()
        return rollouts.rollout_status(s, r)


def _get(s: Any, rollout_id: str) -> Rollout:
    r = s.get(Rollout, rollout_id[:64])
    if r is None:
        raise HTTPException(404, detail=f"unknown rollout {rollout_id!r}")
    return r  # type: ignore[no-any-return]
