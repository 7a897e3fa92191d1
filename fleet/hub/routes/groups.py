"""Device groups over HTTP (fleet.hub.rollouts): which model each group runs, and unpinning a group's own model.

A group gets a model of its own by a rollout aimed at it (``POST /v1/rollouts {version, group}``); this lists the
groups and takes a group back to the fleet's active model."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlmodel import Session, col, func, select

from fleet.hub import rollouts
from fleet.hub.api import AdminCaller, HubDep, ReaderCaller, message_response
from fleet.hub.db import read_session, write_session
from fleet.hub.models import Device, GroupModel
from fleet.protocol import GroupList, GroupPublic, check_name

router = APIRouter(tags=["groups"])


@router.get("/v1/groups", response_model=GroupList)
def list_groups(_: ReaderCaller, hub: HubDep) -> Response:
    """Every group with enrolled devices, a model of its own or a running rollout, by name."""
    with read_session(hub.engine) as s:
        return message_response(group_list(s))


@router.delete("/v1/groups/{group}/model", response_model=GroupPublic)
def unpin(group: str, _: AdminCaller, hub: HubDep) -> Response:
    """The group runs the fleet's active model again, and takes part in fleet-wide rollouts."""
    check_name(group, "group")
    with write_session(hub.engine) as s:
        rollouts.unpin(hub, s, group)
        return message_response(group_public(s, group, devices=_device_count(s, group)))


def group_list(s: Session) -> GroupList:
    counts = dict(s.exec(select(Device.group, func.count()).where(col(Device.revoked_at).is_(None))
                         .group_by(Device.group)).all())
    names = set(counts) | {p.group for p in rollouts.pinned_groups(s)}
    names |= {r.group for r in rollouts.running_rollouts(s) if r.group is not None}
    return GroupList(groups=[group_public(s, g, devices=int(counts.get(g, 0))) for g in sorted(names)])


def group_public(s: Session, group: str, *, devices: int) -> GroupPublic:
    pin = s.get(GroupModel, group)
    model = rollouts.model_for_group(s, group)
    rollout = rollouts.governing_rollout(s, group)
    return GroupPublic(group=group, devices=devices, model=model.version if model is not None else None,
                       pinned=pin is not None, previous=pin.previous if pin is not None else None,
                       rollout_id=rollout.rollout_id if rollout is not None else None)


def _device_count(s: Session, group: str) -> int:
    return int(s.exec(select(func.count()).select_from(Device)
                      .where(Device.group == group, col(Device.revoked_at).is_(None))).one())
