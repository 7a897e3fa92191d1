"""Fleet-wide backpressure: token buckets every hub worker draws on, in the database (issue 19.5).

Each device keeps to its campaign's own budgets (``trigger``'s ``global``, ``per_trigger``, ``per_class``), but
a thousand devices each within budget can still flood the hub. Two caps hold the total:

- the fleet's: ``fleet_upload_rate_per_min`` and ``fleet_upload_burst`` in the hub's settings;
- a campaign's: its spec's ``budgets.fleet`` bucket (``{"rate_per_min": 600, "burst": 100}``), which devices
  ignore and the hub enforces over all the campaign's devices together.

A new case takes one token from each bucket that applies to it, or none at all; a case the hub holds already
(a retry) takes nothing. The buckets are rows of ``upload_buckets``, refilled from their last update time and
drawn in the same short transaction (the rows locked with ``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite has
one writer), so any number of workers share them exactly. A case refused for want of tokens gets 429 with
``Retry-After``: the seconds until every bucket it needs holds a token again. Nothing is stored for it; the
agent keeps it in its spool and sends it then (fleet.edge.uplink).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import col, select

from fleet.errors import TooManyRequests
from fleet.hub.context import Hub
from fleet.hub.db import dialect_insert, read_session, write_session
from fleet.hub.models import Campaign, UploadBucket
from trigger.spec import SpecError, parse_spec

LIFETIME_RETRY_S = 3600.0  # a bucket with no refill (rate 0) that is empty: ask again in an hour


@dataclass(frozen=True)
class Bucket:
    key: str
    rate_per_s: float
    burst: float


@dataclass(frozen=True)
class Admission:
    """Which of the asked cases may be stored, and when to ask again for the others (seconds)."""

    granted: list[bool]
    retry_after: float | None
    bucket: str | None = None  # the bucket that ran dry first

    @property
    def all(self) -> bool:
        return all(self.granted)


def fleet_bucket(hub: Hub) -> Bucket | None:
    rate = hub.settings.fleet_upload_rate_per_min
    return None if rate <= 0 else Bucket("fleet", rate / 60.0, hub.settings.fleet_upload_burst)


def campaign_bucket(hub: Hub, campaign_id: str | None, version: int | None) -> Bucket | None:
    """The campaign version's ``budgets.fleet`` bucket, if it has one (cached per worker)."""
    if campaign_id is None or version is None:
        return None
    key = f"quota:{campaign_id}:{version}"
    hit = hub.models.get(key)
    if hit is not None:
        return hit if isinstance(hit, Bucket) else None
    with read_session(hub.engine) as s:
        row = s.get(Campaign, (campaign_id, version))
    bucket: Bucket | bool = False  # cached "none"
    if row is not None:
        try:
            spec = parse_spec(row.spec).budgets
        except SpecError:  # stored before it was checked: no cap, as the device read it
            spec = None
        if spec is not None and spec.fleet_bucket is not None:
            bucket = Bucket(f"campaign:{campaign_id}", spec.fleet_bucket.rate_per_s, spec.fleet_bucket.burst)
    hub.models.put(key, bucket)
    return bucket if isinstance(bucket, Bucket) else None


def admit(hub: Hub, campaigns: Sequence[tuple[str | None, int | None]]) -> Admission:
    """Take one token per case (its campaign and version given) from every bucket that applies, in order; a
    case is granted only if all of them hold one."""
    fleet = fleet_bucket(hub)
    per_case = [[b for b in (fleet, campaign_bucket(hub, cid, v)) if b is not None] for cid, v in campaigns]
    buckets = {b.key: b for bs in per_case for b in bs}
    if not buckets:
        return Admission([True] * len(campaigns), None)
    now = hub.now()
    with write_session(hub.engine) as s:
        s.execute(dialect_insert(hub.engine, UploadBucket.__table__)  # type: ignore[attr-defined]
                  .values([{"key": k, "tokens": b.burst, "updated_at": now} for k, b in sorted(buckets.items())])
                  .on_conflict_do_nothing())
        rows = s.exec(select(UploadBucket).where(col(UploadBucket.key).in_(sorted(buckets)))
                      .order_by(UploadBucket.key).with_for_update()).all()
        tokens = {r.key: min(buckets[r.key].burst, r.tokens + max(0.0, now - r.updated_at) * buckets[r.key].rate_per_s)
                  for r in rows}
        granted = []
        dry: str | None = None
        for bs in per_case:
            short = next((b.key for b in bs if tokens[b.key] < 1.0), None)
            if short is None:
                for b in bs:
                    tokens[b.key] -= 1.0
            dry = dry or short
            granted.append(short is None)
        for k, t in tokens.items():
            s.execute(sa.update(UploadBucket).where(UploadBucket.key == k).values(tokens=t, updated_at=now))
    if all(granted):
        return Admission(granted, None)
    waits = [_wait(tokens[b.key], b) for bs, ok in zip(per_case, granted, strict=True) if not ok for b in bs
             if tokens[b.key] < 1.0]
    return Admission(granted, max(waits), dry)


def _wait(tokens: float, bucket: Bucket) -> float:
    if bucket.rate_per_s <= 0:
        return LIFETIME_RETRY_S
    return max(1.0, math.ceil((1.0 - tokens) / bucket.rate_per_s))


def throttled(admission: Admission) -> TooManyRequests:
    """The 429 a refused case gets: which cap, and when to try again (``Retry-After``)."""
    what = "the fleet's upload cap" if admission.bucket == "fleet" else \
        f"campaign {str(admission.bucket).removeprefix('campaign:')!r}'s fleet upload cap (budgets.fleet)"
    return TooManyRequests(f"{what} is reached; the case was not stored: send it again in "
                           f"{admission.retry_after:.0f} s", retry_after=admission.retry_after)
