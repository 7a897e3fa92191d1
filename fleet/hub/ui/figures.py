"""What the dashboard counts that no JSON route does: uploads per trigger, campaign and day; labels per hour.

Each looks at a recent window (``since``: unix seconds) so a page stays quick on a large pool.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from sqlmodel import Session, col, func, select

from fleet.hub.models import CaseRow, LabelRow

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
    since = _day_start(now) - (days - 1) * DAY
    rows = s.exec(select(CaseRow.received_at, CaseRow.campaign_id, CaseRow.campaign_version, CaseRow.payload)
                  .where(col(CaseRow.received_at) >= since)).all()
    triggers: Counter[str] = Counter()
    campaigns: Counter[str] = Counter()
    per_day = Counter(int((r[0] - since) // DAY) for r in rows)
    for _, campaign_id, campaign_version, payload in rows:
        triggers.update({str(t.get("name")) for t in (payload or {}).get("triggers", []) if isinstance(t, dict)})
        campaigns[f"{campaign_id} v{campaign_version}" if campaign_id else "(none)"] += 1
    return Uploads(since=since, total=len(rows), by_trigger=triggers.most_common(), by_campaign=campaigns.most_common(),
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
