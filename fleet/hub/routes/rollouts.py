"""Staged rollouts over HTTP: start, inspect, advance, roll back."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlmodel import Session, col, select

from fleet.errors import NotFound, ProtocolError
from fleet.hub import rollouts
from fleet.hub.api import HubDep, TrainerCaller, message_body, message_response, request_body
from fleet.hub.db import read_session, write_session
from fleet.hub.models import Rollout
from fleet.protocol import RollbackRequest, RolloutCreate, RolloutList, RolloutPublic, check_name

router = APIRouter(tags=["rollouts"])


@router.post("/v1/rollouts", status_code=201, response_model=RolloutPublic, openapi_extra=request_body(RolloutCreate))
def start(_: TrainerCaller, hub: HubDep, body: RolloutCreate = message_body(RolloutCreate)) -> Response:
    with write_session(hub.engine) as s:
        r = rollouts.start(hub, s, body.version, body.stages, body.stage_seconds, group=body.group)
        s.flush()
        return message_response(rollouts.rollout_status(s, r), status_code=201)


@router.get("/v1/rollouts", response_model=RolloutList)
def list_rollouts(_: TrainerCaller, hub: HubDep) -> Response:
    """Every rollout, newest first."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(Rollout).order_by(col(Rollout.created_at).desc())).all()
        return message_response(RolloutList(rollouts=[rollouts.rollout_status(s, r) for r in rows]))


@router.get("/v1/rollouts/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: str, _: TrainerCaller, hub: HubDep) -> Response:
    """The rollout, after applying what its evidence and its stage clock say."""
    with write_session(hub.engine) as s:
        r = _get(s, rollout_id)
        rollouts.evaluate(hub, s, r)
        s.flush()
        return message_response(rollouts.rollout_status(s, r))


@router.post("/v1/rollouts/{rollout_id}/advance", response_model=RolloutPublic)
def advance(rollout_id: str, _: TrainerCaller, hub: HubDep) -> Response:
    """The next stage now (the last stage completes the rollout)."""
    with write_session(hub.engine) as s:
        r = _get(s, rollout_id)
        if rollouts.evaluate(hub, s, r) is None:  # (a due clock or a rollback already moved it)
            rollouts.advance(hub, s, r, reason="advanced by request")
        s.flush()
        return message_response(rollouts.rollout_status(s, r))


@router.post("/v1/rollouts/{rollout_id}/rollback", response_model=RolloutPublic,
             openapi_extra=request_body(RollbackRequest, required=False))
def rollback(rollout_id: str, _: TrainerCaller, hub: HubDep,
             body: RollbackRequest = message_body(RollbackRequest, optional=True)) -> Response:
    """Back to the incumbent everywhere; the candidate is retired."""
    if body.to is not None:
        raise ProtocolError(f"a rollout rolls back to its incumbent; received to={body.to!r} (re-activate a "
                            f"version with POST /v1/models/rollback)")
    with write_session(hub.engine) as s:
        r = _get(s, rollout_id)
        rollouts.rollback(hub, s, r, reason=body.reason)
        s.flush()
        return message_response(rollouts.rollout_status(s, r))


def _get(s: Session, rollout_id: str) -> Rollout:
    check_name(rollout_id, "rollout id")  # (PostgreSQL refuses a NUL in text: that was a 500)
    r = s.get(Rollout, rollout_id) if len(rollout_id) <= 64 else None  # (a rollout id has at most 64)
    if r is None:
        raise NotFound(f"unknown rollout {rollout_id!r}")
    return r
