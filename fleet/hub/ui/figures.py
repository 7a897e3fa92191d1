"""What the dashboard counts that no JSON route does: uploads per trigger, campaign and day; labels per hour.

Each looks at a recent window (``since``: unix seconds) so a page stays quick on a large pool.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from fleet.hub.models import CaseRow, LabelRow
from fleet.hub.yields import trigger_hits

DAY = 86_400.0
HOUR = 3_600.0


@dataclass(frozen=True)
class Uploads:
    """Cases received since ``since``: per trigger that fired (a case counts once per trigger), per campaign
    (``"(none)"`` for cases no campaign asked for) and per UTC day, oldest first."""

    since: float
    total: int
    by_trigger: list[tuple[str, int]]
    by_campaign: list[tuple[str, int]]
    by_day: list[tuple[str, int]]


def uploads(s: Session, *, now: float, days: int = 14) -> Uploads:
    """Counted by the database: trigger names are read from each case's JSON in SQL
    (:func:`fleet.hub.yields.trigger_hits`), so no case's JSON is decoded here."""
    since = _day_start(now) - (days - 1) * DAY
    window = {"since": since}
    hits = trigger_hits(s, "c.received_at", "c.received_at >= :since")
    triggers = s.execute(sa.text(f"SELECT h.name, count(*) AS n FROM ({hits}) AS h WHERE h.name IS NOT NULL "
                                 "GROUP BY h.name ORDER BY n DESC, h.name"), window).all()
    campaigns = s.execute(sa.text("SELECT c.campaign_id, c.campaign_version, count(*) AS n FROM cases c "
                                  "WHERE c.received_at >= :since GROUP BY c.campaign_id, c.campaign_version "
                                  "ORDER BY n DESC, c.campaign_id, c.campaign_version"), window).all()
    by_campaign: Counter[str] = Counter()
    for cid, version, n in campaigns:
        by_campaign[f"{cid} v{version}" if cid else "(none)"] += int(n)
    received = s.exec(select(CaseRow.received_at).where(col(CaseRow.received_at) >= since)).all()
    per_day = Counter(int((t - since) // DAY) for t in received)
    return Uploads(since=since, total=len(received), by_trigger=[(str(name), int(n)) for name, n in triggers],
                   by_campaign=by_campaign.most_common(),
                   by_day=[(_day_name(since + d * DAY), per_day.get(d, 0)) for d in range(days)])


def labels_per_hour(s: Session, *, now: float, hours: int = 24) -> list[tuple[str, int]]:
    """Annotators' answers received per UTC hour over the last ``hours`` hours, oldest first."""
    since = (now // HOUR) * HOUR - (hours - 1) * HOUR
    times = s.exec(select(LabelRow.created_at).where(col(LabelRow.created_at) >= since)).all()
    per_hour = Counter(int((t - since) // HOUR) for t in times)
    return [(time.strftime("%H:00", time.gmtime(since + h * HOUR)), per_hour.get(h, 0)) for h in range(hours)]


def label_statuses(s: Session) -> dict[str, int]:
    """Annotators' answers by the hub's verdict (accepted, held, gold)."""
    return {str(k): int(v) for k, v in s.exec(select(LabelRow.status, func.count()).group_by(LabelRow.status)).all()}


def _day_start(t: float) -> float:
    return (t // DAY) * DAY


def _day_name(t: float) -> str:
    return time.strftime("%m-%d", time.gmtime(t))
