"""Staged rollouts: device bucketing, assignments, field metrics from heartbeats, automatic rollback.

A rollout moves a candidate through stages (fractions of the fleet). A device is in the canary when
``bucket(device_id, rollout_id) < stage fraction``: it runs the candidate as ``active`` and the
incumbent as ``challenger`` (shadow), so field agreement is measured; every other device keeps the
incumbent. Field metrics are summed heartbeat deltas per version, overall (scope ``all``) and per
rollout. A rollout rolls back by itself when the candidate's human-disagreement rate exceeds the
incumbent's by ``rollback_margin`` (each side with at least ``rollback_min_compared`` frames) or
its health failures reach ``rollback_health_failures``; the incumbent is then assigned everywhere
and the candidate is retired.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

import sqlalchemy as sa
from fastapi import HTTPException
from sqlmodel import Session, col, select

from fleet.hub.context import Hub
from fleet.hub.db import upsert_add
from fleet.hub.models import (
    FIELD_COUNTERS,
    Campaign,
    Device,
    FieldMetric,
    HeartbeatState,
    ModelVersion,
    NoveltyBankRow,
    Rollout,
)
from fleet.protocol import Assignment, CampaignRef, Heartbeat, ModelRef, OtaReport

log = logging.getLogger(__name__)

# heartbeat value -> field metric it feeds (all cumulative per boot_id on the device)
_HEARTBEAT_VALUES = (
    "frames_seen", "flagged", "uploaded", "evicted", "upload_failures", "health_failures",
    "human_compared", "human_disagreed", "challenger_compared", "challenger_agreed",
)


def bucket(device_id: str, rollout_id: str) -> float:
    """The device's stable position in [0, 1) for this rollout."""
    return int(hashlib.sha256((device_id + rollout_id).encode()).hexdigest()[:8], 16) / 2**32


def in_canary(device_id: str, rollout: Rollout) -> bool:
    return bucket(device_id, rollout.rollout_id) < rollout.stages[rollout.stage_index]


# ---------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------


def running_rollout(s: Session) -> Rollout | None:
    return s.exec(select(Rollout).where(Rollout.state == "running")
                  .order_by(col(Rollout.created_at).desc())).first()


def active_model(s: Session) -> ModelVersion | None:
    return s.exec(select(ModelVersion).where(ModelVersion.status == "active")
                  .order_by(col(ModelVersion.activated_at).desc())).first()


def model_ref(mv: ModelVersion | None) -> ModelRef | None:
    return None if mv is None else ModelRef(version=mv.version, onnx_sha256=mv.onnx_sha256)


def field_metrics(s: Session, version: str, scope: str = "all") -> dict[str, Any]:
    """Summed counters and the derived rates for ``version`` in ``scope``."""
    row = s.get(FieldMetric, (scope, version))
    out: dict[str, Any] = {k: (getattr(row, k) if row is not None else 0) for k in FIELD_COUNTERS}
    out["version"] = version
    out["scope"] = scope
    out["disagreement"] = _rate(out["human_disagreed"], out["human_compared"])
    out["trigger_rate"] = _rate(out["flagged"], out["frames_seen"])
    out["challenger_agreement"] = _rate(out["challenger_agreed"], out["challenger_compared"])
    return out


def _rate(num: int, den: int) -> float | None:
    return None if den <= 0 else num / den


# ---------------------------------------------------------------------------------------------
# assignment
# ---------------------------------------------------------------------------------------------


def assignment_for(s: Session, device: Device, *, now: float) -> Assignment:
    """What ``device`` should run now."""
    rollout = running_rollout(s)
    active = active_model(s)
    challenger = None
    rollout_id = None
    if rollout is not None:
        rollout_id = rollout.rollout_id
        incumbent = s.get(ModelVersion, rollout.incumbent) if rollout.incumbent else None
        if in_canary(device.device_id, rollout):
            active, challenger = s.get(ModelVersion, rollout.version), incumbent
        else:
            active = incumbent
    return Assignment(
        device_id=device.device_id,
        active=model_ref(active),
        challenger=model_ref(challenger),
        campaigns=campaigns_for(s, device.group, now=now),
        rollout_id=rollout_id,
        issued_at=now,
    )


def campaigns_for(s: Session, group: str, *, now: float) -> list[CampaignRef]:
    """The newest live version of each campaign aimed at ``group`` (or at every group)."""
    rows = s.exec(select(Campaign).where(col(Campaign.deleted_at).is_(None))
                  .order_by(Campaign.campaign_id, col(Campaign.version).desc())).all()
    out: list[CampaignRef] = []
    seen: set[str] = set()
    for c in rows:
        if c.campaign_id in seen:
            continue
        seen.add(c.campaign_id)
        if c.expires_at is not None and c.expires_at <= now:
            continue
        if c.groups and group not in c.groups:
            continue
        bank_sha = None
        if c.novelty_bank:
            bank = s.get(NoveltyBankRow, c.novelty_bank)
            bank_sha = bank.sha256 if bank is not None else None
        out.append(CampaignRef(campaign_id=c.campaign_id, version=c.version, spec=c.spec,
                               expires_at=c.expires_at, novelty_bank=c.novelty_bank if bank_sha else None,
                               novelty_bank_sha256=bank_sha))
    return out


# ---------------------------------------------------------------------------------------------
# heartbeats and OTA reports -> field metrics
# ---------------------------------------------------------------------------------------------


def heartbeat_values(hb: Heartbeat) -> dict[str, int]:
    values = {k: int(hb.counters.get(k, 0)) for k in _HEARTBEAT_VALUES[:6]}
    for k in _HEARTBEAT_VALUES[6:]:
        values[k] = int(getattr(hb, k))
    return values


def deltas(previous: dict[str, int] | None, current: dict[str, int]) -> dict[str, int]:
    """Per-counter increase since ``previous``; a counter that went down restarted, so counts whole."""
    out = {}
    for k, v in current.items():
        before = (previous or {}).get(k, 0)
        out[k] = v - before if v >= before else v
    return out


def record_heartbeat(hub: Hub, s: Session, hb: Heartbeat) -> None:
    """Update the device, the (device, boot) counters, and add the deltas to the version's metrics."""
    now = hub.now()
    device = s.get(Device, hb.device_id, with_for_update=not _sqlite(s))
    if device is None:
        raise HTTPException(404, detail=f"unknown device {hb.device_id!r}; enroll it first")
    device.last_seen_at = now
    device.model_version = hb.model_version
    device.boot_id = hb.boot_id
    s.add(device)
    current = heartbeat_values(hb)
    state = s.get(HeartbeatState, (hb.device_id, hb.boot_id))
    delta = deltas(state.values if state is not None else None, current)
    if state is None:
        s.add(HeartbeatState(device_id=hb.device_id, boot_id=hb.boot_id, model_version=hb.model_version,
                             challenger_version=hb.challenger_version, values=current, sent_at=hb.sent_at,
                             received_at=now))
    else:
        state.values = current
        state.model_version = hb.model_version
        state.challenger_version = hb.challenger_version
        state.sent_at = hb.sent_at
        state.received_at = now
        s.add(state)
    if hb.model_version is None:
        return
    delta["heartbeats"] = 1
    rollout = running_rollout(s)
    scopes = ["all"]
    if rollout is not None and hb.model_version in (rollout.version, rollout.incumbent):
        scopes.append(rollout.rollout_id)
    for scope in scopes:
        s.execute(upsert_add(s.get_bind(), FieldMetric.__table__,  # type: ignore[arg-type]
                             {"scope": scope, "version": hb.model_version}, delta))


def record_ota_failure(hub: Hub, s: Session, report: OtaReport) -> None:
    """A refused or rolled-back install counts as a health failure of the version."""
    rollout = running_rollout(s)
    scopes = ["all"]
    if rollout is not None and report.version == rollout.version:
        scopes.append(rollout.rollout_id)
    for scope in scopes:
        s.execute(upsert_add(s.get_bind(), FieldMetric.__table__,  # type: ignore[arg-type]
                             {"scope": scope, "version": report.version},
                             {"ota_failures": 1, "health_failures": 1}))


def _sqlite(s: Session) -> bool:
    return s.get_bind().dialect.name == "sqlite"


# ---------------------------------------------------------------------------------------------
# the rollout state machine
# ---------------------------------------------------------------------------------------------


def start(hub: Hub, s: Session, version: str, stages: list[float], stage_seconds: float | None) -> Rollout:
    now = hub.now()
    mv = s.get(ModelVersion, version)
    if mv is None:
        raise HTTPException(404, detail=f"unknown model version {version!r}")
    if mv.status not in ("candidate", "retired"):
        raise HTTPException(409, detail=f"model {version!r} is {mv.status}; only a candidate or a retired "
                                         f"version can be rolled out")
    other = running_rollout(s)
    if other is not None:
        raise HTTPException(409, detail=f"rollout {other.rollout_id} of {other.version!r} is still running; "
                                         f"advance it to the end or roll it back first")
    incumbent = active_model(s)
    rollout = Rollout(
        rollout_id=f"ro-{int(now)}-{secrets.token_hex(3)}", version=version,
        incumbent=incumbent.version if incumbent else None, stages=list(stages), stage_index=0,
        stage_seconds=stage_seconds, state="running", created_at=now, stage_started_at=now,
    )
    _set_status(mv, "canary", now)
    s.add(mv)
    s.add(rollout)
    log.info("rollout %s: %s over %s, stages %s", rollout.rollout_id, version, rollout.incumbent, stages)
    return rollout


def advance(hub: Hub, s: Session, rollout: Rollout, *, reason: str = "advanced") -> Rollout:
    _require_running(rollout)
    now = hub.now()
    if rollout.stage_index + 1 < len(rollout.stages):
        rollout.stage_index += 1
        rollout.stage_started_at = now
        log.info("rollout %s: stage %d (%.0f%%): %s", rollout.rollout_id, rollout.stage_index,
                 100 * rollout.stages[rollout.stage_index], reason)
    else:
        promote(hub, s, rollout.version)
        rollout.state = "completed"
        rollout.finished_at = now
        rollout.reason = reason
        log.info("rollout %s: completed; %s is active", rollout.rollout_id, rollout.version)
    s.add(rollout)
    return rollout


def rollback(hub: Hub, s: Session, rollout: Rollout, *, reason: str) -> Rollout:
    _require_running(rollout)
    now = hub.now()
    rollout.state = "rolled_back"
    rollout.reason = reason
    rollout.finished_at = now
    mv = s.get(ModelVersion, rollout.version)
    if mv is not None:
        _set_status(mv, "retired", now)
        s.add(mv)
    s.add(rollout)
    log.warning("rollout %s: rolled back %s: %s", rollout.rollout_id, rollout.version, reason)
    return rollout


def promote(hub: Hub, s: Session, version: str) -> ModelVersion:
    """Make ``version`` the active model; the previous active one is retired."""
    now = hub.now()
    mv = s.get(ModelVersion, version)
    if mv is None:
        raise HTTPException(404, detail=f"unknown model version {version!r}")
    for other in s.exec(select(ModelVersion).where(ModelVersion.status == "active")).all():
        if other.version != version:
            _set_status(other, "retired", now)
            s.add(other)
    _set_status(mv, "active", now)
    mv.activated_at = now
    s.add(mv)
    return mv


def evaluate(hub: Hub, s: Session, rollout: Rollout) -> str | None:
    """Roll back or advance ``rollout`` if its field metrics or its clock say so; return what happened."""
    if rollout.state != "running":
        return None
    cfg = hub.settings
    cand = field_metrics(s, rollout.version, rollout.rollout_id)
    if cand["health_failures"] >= cfg.rollback_health_failures:
        rollback(hub, s, rollout, reason=f"health failures {cand['health_failures']} reached the threshold "
                                         f"{cfg.rollback_health_failures}")
        return "rolled_back"
    if rollout.incumbent is not None and cand["human_compared"] >= cfg.rollback_min_compared:
        inc = field_metrics(s, rollout.incumbent, rollout.rollout_id)
        if inc["human_compared"] < cfg.rollback_min_compared:
            inc = field_metrics(s, rollout.incumbent, "all")
        if inc["human_compared"] >= cfg.rollback_min_compared:
            gap = cand["disagreement"] - inc["disagreement"]
            if gap > cfg.rollback_margin:
                rollback(hub, s, rollout, reason=(
                    f"field disagreement {cand['disagreement']:.3f} over {cand['human_compared']} frames exceeds "
                    f"the incumbent's {inc['disagreement']:.3f} by {gap:.3f} > margin {cfg.rollback_margin}"))
                return "rolled_back"
    if rollout.stage_seconds is not None and hub.now() - rollout.stage_started_at >= rollout.stage_seconds:
        advance(hub, s, rollout, reason=f"stage held {rollout.stage_seconds:g}s without a rollback")
        return "advanced"
    return None


def evaluate_running(hub: Hub, s: Session) -> str | None:
    rollout = running_rollout(s)
    return None if rollout is None else evaluate(hub, s, rollout)


def rollout_status(s: Session, rollout: Rollout) -> dict[str, Any]:
    versions = [rollout.version] + ([rollout.incumbent] if rollout.incumbent else [])
    return {
        "rollout_id": rollout.rollout_id,
        "version": rollout.version,
        "incumbent": rollout.incumbent,
        "state": rollout.state,
        "status": rollout.state,
        "stages": rollout.stages,
        "stage": rollout.stage_index,
        "fraction": rollout.stages[rollout.stage_index],
        "stage_seconds": rollout.stage_seconds,
        "stage_started_at": rollout.stage_started_at,
        "created_at": rollout.created_at,
        "finished_at": rollout.finished_at,
        "reason": rollout.reason,
        "metrics": {v: field_metrics(s, v, rollout.rollout_id) for v in versions},
    }


def _require_running(rollout: Rollout) -> None:
    if rollout.state != "running":
        raise HTTPException(409, detail=f"rollout {rollout.rollout_id} is {rollout.state}, not running")


def _set_status(mv: ModelVersion, status: str, now: float) -> None:
    mv.status = status
    mv.status_changed_at = now


__all__ = ["bucket", "assignment_for", "record_heartbeat", "evaluate", "start", "advance", "rollback", "sa"]
