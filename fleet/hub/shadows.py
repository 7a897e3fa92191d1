"""Shadow trials (issue 19.4): an operator runs a candidate in shadow on one device group, reads its field
agreement with the active model, then promotes it to a canary.

``POST /v1/shadows {version, group, frames}`` makes ``version`` the challenger in the assignment of every device in
``group`` (beside the active model; devices run it on the same frames and count agreement, fleet.edge.shadow).
Their heartbeats' challenger comparisons count for the trial (``field_metrics`` scope = the trial id, and per
device), only while the device runs the trial's incumbent with the trial's version as challenger. Once the group
has compared ``frames`` frames the trial is ``done`` and the challenger leaves the assignments. Promoting a trial
(``POST /v1/shadows/{id}/promote``) starts a staged rollout of its version, a canary with the usual rollback
rules (fleet.hub.evidence); a trial can be cancelled. One trial runs per group at a time, and none while a rollout
that decides the group's model runs (the canary's own shadow comparisons are the rollout's). On a group with a model
of its own (fleet.hub.rollouts, pinned), the trial runs beside that model and promotes to a canary on that group;
elsewhere, beside the fleet's active model, to a fleet-wide canary.
"""

from __future__ import annotations

import secrets

from sqlmodel import Session, col, func, select

from fleet.errors import Conflict, NotFound
from fleet.hub import rollouts
from fleet.hub.context import Hub
from fleet.hub.db import upsert_add
from fleet.hub.models import FieldMetric, GroupModel, ModelVersion, Rollout, RolloutDeviceMetric, ShadowTrial
from fleet.protocol import ShadowCreate, ShadowPublic

COUNTED = ("challenger_compared", "challenger_agreed")


def running_trial(s: Session, group: str) -> ShadowTrial | None:
    return s.exec(select(ShadowTrial).where(ShadowTrial.group == group, ShadowTrial.state == "running")
                  .order_by(col(ShadowTrial.created_at).desc())).first()


def start(hub: Hub, s: Session, body: ShadowCreate) -> ShadowTrial:
    mv = s.get(ModelVersion, body.version)
    if mv is None:
        raise NotFound(f"unknown model version {body.version!r}")
    active = rollouts.model_for_group(s, body.group)
    if active is None:
        raise Conflict("no model is active: a shadow trial compares a candidate with the active model")
    if active.version == body.version:
        raise Conflict(f"model {body.version!r} is the active model of group {body.group!r}; a shadow trial runs "
                       f"another version beside it")
    if mv.status == "canary":
        raise Conflict(f"model {body.version!r} is a canary of a fleet-wide rollout; a shadow trial runs a "
                       f"candidate (or a retired version, or on a group with its own model the fleet's) beside the "
                       f"group's model")
    other = running_trial(s, body.group)
    if other is not None:
        raise Conflict(f"shadow trial {other.trial_id} of {other.version!r} is still running on group "
                       f"{body.group!r}; cancel it or let it finish first")
    running = rollouts.governing_rollout(s, body.group)
    if running is not None:
        raise Conflict(f"rollout {running.rollout_id} of {running.version!r} is running; its canary runs the "
                       f"incumbent in shadow already")
    now = hub.now()
    trial = ShadowTrial(trial_id=f"sh-{int(now)}-{secrets.token_hex(3)}", version=body.version, group=body.group,
                        frames=body.frames, state="running", incumbent=active.version, created_at=now)
    s.add(trial)
    return trial


def record(hub: Hub, s: Session, *, device_id: str, group: str, model_version: str | None,
           challenger_version: str | None, increments: dict[str, int]) -> None:
    """Count a heartbeat's challenger comparisons for the group's running trial, if the device ran it as the
    trial says; end the trial once its frames are compared."""
    trial = running_trial(s, group)
    if trial is None or challenger_version != trial.version or model_version != trial.incumbent:
        return
    counted = {k: int(increments.get(k, 0)) for k in COUNTED}
    if not counted["challenger_compared"]:
        return
    bind = s.get_bind()
    s.execute(upsert_add(bind, FieldMetric.__table__,  # type: ignore[arg-type]
                         {"scope": trial.trial_id, "version": trial.version}, counted))
    s.execute(upsert_add(bind, RolloutDeviceMetric.__table__,  # type: ignore[arg-type]
                         {"rollout_id": trial.trial_id, "version": trial.version, "device_id": device_id}, counted))
    s.flush()
    if rollouts.field_metrics(s, trial.version, trial.trial_id).challenger_compared >= trial.frames:
        trial.state, trial.ended_at = "done", hub.now()
        trial.reason = f"{trial.frames} frames compared"
        s.add(trial)


def promote(hub: Hub, s: Session, trial: ShadowTrial, stages: list[float], stage_seconds: float | None) -> Rollout:
    """Start the canary: a staged rollout of the trial's version."""
    if trial.state not in ("running", "done"):
        raise Conflict(f"shadow trial {trial.trial_id} is {trial.state}; only a running or done trial is promoted")
    status = status_of(s, trial)
    if status.compared == 0:
        raise Conflict(f"shadow trial {trial.trial_id} has no field comparisons yet; wait for the group's devices")
    own = s.get(GroupModel, trial.group) is not None  # a group with its own model gets a canary of its own
    rollout = rollouts.start(hub, s, trial.version, stages, stage_seconds, group=trial.group if own else None,
                             reason=f"from shadow trial {trial.trial_id} on group {trial.group!r}: agreement "
                                    f"{status.agreement:.3f} over {status.compared} frames")
    trial.state, trial.ended_at, trial.rollout_id = "promoted", hub.now(), rollout.rollout_id
    s.add(trial)
    return rollout


def cancel(hub: Hub, s: Session, trial: ShadowTrial) -> None:
    if trial.state != "running":
        raise Conflict(f"shadow trial {trial.trial_id} is {trial.state}; only a running trial is cancelled")
    trial.state, trial.ended_at, trial.reason = "cancelled", hub.now(), "cancelled by an operator"
    s.add(trial)


def get(s: Session, trial_id: str) -> ShadowTrial:
    trial = s.get(ShadowTrial, trial_id)
    if trial is None:
        raise NotFound(f"unknown shadow trial {trial_id!r}")
    return trial


def status_of(s: Session, trial: ShadowTrial) -> ShadowPublic:
    fm = rollouts.field_metrics(s, trial.version, trial.trial_id)
    devices = int(s.exec(select(func.count()).select_from(RolloutDeviceMetric)
                         .where(RolloutDeviceMetric.rollout_id == trial.trial_id)).one())
    return ShadowPublic(trial_id=trial.trial_id, version=trial.version, group=trial.group, frames=trial.frames,
                        state=trial.state, created_at=trial.created_at, incumbent=trial.incumbent,
                        compared=fm.challenger_compared, agreed=fm.challenger_agreed,
                        agreement=fm.challenger_agreement, devices=devices, ended_at=trial.ended_at,
                        rollout_id=trial.rollout_id, reason=trial.reason)
