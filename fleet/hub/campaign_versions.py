"""A campaign's newest live version, and the next version the hub publishes itself (budgets moved towards
yield, a learned trigger fitted): the same groups, bank and expiry, the spec document's version bumped."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from fleet.errors import NotFound
from fleet.hub.models import Campaign


def latest_live(s: Session, campaign_id: str) -> Campaign:
    """The newest version of a campaign that was not deleted; NotFound if there is none."""
    row = s.exec(select(Campaign).where(Campaign.campaign_id == campaign_id, col(Campaign.deleted_at).is_(None))
                 .order_by(col(Campaign.version).desc())).first()
    if row is None:
        raise NotFound(f"no live campaign {campaign_id!r}")
    return row


def next_version(s: Session, row: Campaign, doc: dict[str, Any], *, now: float) -> Campaign:
    """Store ``doc`` as the version after ``row`` (its ``version`` field set to match) and return it."""
    new = Campaign(campaign_id=row.campaign_id, version=row.version + 1, spec={**doc, "version": row.version + 1},
                   groups=list(row.groups), expires_at=row.expires_at, novelty_bank=row.novelty_bank,
                   created_at=now, auto_budgets=row.auto_budgets, learned_for=row.learned_for,
                   learned_rate=row.learned_rate, learned_leaves=dict(row.learned_leaves or {}))
    s.add(new)
    return new
