"""Shadow trials over HTTP (fleet.hub.shadows): start one on a group, read its agreement, promote or cancel it."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlmodel import col, select

from fleet.hub import rollouts, shadows
from fleet.hub.api import AdminCaller, HubDep, ReaderCaller, message_body, message_response, request_body
from fleet.hub.db import read_session, write_session
from fleet.hub.models import ShadowTrial
from fleet.protocol import RolloutPublic, ShadowCreate, ShadowList, ShadowPromote, ShadowPublic, check_name

router = APIRouter(tags=["shadows"])


@router.post("/v1/shadows", status_code=201, response_model=ShadowPublic, openapi_extra=request_body(ShadowCreate))
def start(_: AdminCaller, hub: HubDep, body: ShadowCreate = message_body(ShadowCreate)) -> Response:
    """Run ``version`` as the challenger beside the active model on ``group``'s devices for ``frames`` frames."""
    with write_session(hub.engine) as s:
        trial = shadows.start(hub, s, body)
        s.flush()
        return message_response(shadows.status_of(s, trial), status_code=201)


@router.get("/v1/shadows", response_model=ShadowList)
def list_trials(_: ReaderCaller, hub: HubDep) -> Response:
    """Every shadow trial, newest first."""
    with read_session(hub.engine) as s:
        rows = s.exec(select(ShadowTrial).order_by(col(ShadowTrial.created_at).desc())).all()
        return message_response(ShadowList(trials=[shadows.status_of(s, t) for t in rows]))


@router.get("/v1/shadows/{trial_id}", response_model=ShadowPublic)
def get_trial(trial_id: str, _: ReaderCaller, hub: HubDep) -> Response:
    """The trial and the field agreement of its candidate with the active model so far."""
    check_name(trial_id, "trial_id")
    with read_session(hub.engine) as s:
        return message_response(shadows.status_of(s, shadows.get(s, trial_id)))


@router.post("/v1/shadows/{trial_id}/promote", status_code=201, response_model=RolloutPublic,
             openapi_extra=request_body(ShadowPromote, required=False))
def promote(trial_id: str, _: AdminCaller, hub: HubDep,
            body: ShadowPromote = message_body(ShadowPromote, optional=True)) -> Response:
    """Promote the trial's candidate to a canary: a staged rollout over ``stages``."""
    check_name(trial_id, "trial_id")
    with write_session(hub.engine) as s:
        rollout = shadows.promote(hub, s, shadows.get(s, trial_id), body.stages, body.stage_seconds)
        s.flush()
        return message_response(rollouts.rollout_status(s, rollout), status_code=201)


@router.post("/v1/shadows/{trial_id}/cancel", response_model=ShadowPublic)
def cancel(trial_id: str, _: AdminCaller, hub: HubDep) -> Response:
    check_name(trial_id, "trial_id")
    with write_session(hub.engine) as s:
        trial = shadows.get(s, trial_id)
        shadows.cancel(hub, s, trial)
        s.flush()
        return message_response(shadows.status_of(s, trial))
