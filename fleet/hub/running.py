"""What the fleet and each device group run outside a rollout: the fleet's active model, and a group's own
(pinned) model where it has one. Read by :mod:`fleet.hub.rollouts` (assignments) and :mod:`fleet.hub.learned` (the
model a campaign's learned trigger is fitted for)."""

from __future__ import annotations

from sqlmodel import Session, col, select

from fleet.hub.models import GroupModel, ModelVersion


def active_model(s: Session) -> ModelVersion | None:
    """The fleet's active model (the latest activated, should two ever be marked active)."""
    return s.exec(select(ModelVersion).where(ModelVersion.status == "active")
                  .order_by(col(ModelVersion.activated_at).desc())).first()


def model_for_group(s: Session, group: str | None) -> ModelVersion | None:
    """The model ``group`` runs outside a rollout: its pinned version, else the fleet's active model."""
    pin = s.get(GroupModel, group) if group is not None else None
    return s.get(ModelVersion, pin.version) if pin is not None else active_model(s)
