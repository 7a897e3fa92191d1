"""Heartbeats and OTA reports into field metrics, so that no device can forge another's or a rollout's numbers.

A heartbeat carries cumulative counters per ``boot_id``; the hub adds their increase since the
last heartbeat of that boot. Before anything is recorded:

- the increase must be plausible: at most ``heartbeat_max_rate_per_s`` per counter per second
  since the device's last heartbeat (or its enrollment), plus ``heartbeat_rate_grace_s`` (else 422,
  nothing recorded). Counters themselves are bounded by the wire contract (2^53).
- it counts only for a version the hub assigned the device (its active model or its shadow
  challenger right now): a device outside a canary cannot move the candidate's metrics, and a
  device claiming a version it was never given moves nothing. The device's own state is updated
  either way.

OTA reports of a refused or rolled-back install count the same way (the report row is always
kept). What counts for a running rollout is also kept per device, the evidence
:mod:`fleet.hub.evidence` needs from several devices before it rolls anything back.
"""

from __future__ import annotations

import logging

from sqlmodel import Session

from fleet.errors import NotFound, ProtocolError
from fleet.hub import rollouts, shadows
from fleet.hub.context import Hub
from fleet.hub.db import upsert_add, upsert_add_rows
from fleet.hub.evidence import rate_violation
from fleet.hub.models import Device, FieldMetric, HeartbeatState, PredictionCount, Rollout, RolloutDeviceMetric
from fleet.protocol import Heartbeat, OtaReport

log = logging.getLogger(__name__)

# heartbeat value -> field metric it feeds (all cumulative per boot_id on the device)
HEARTBEAT_VALUES = (
    "frames_seen", "flagged", "uploaded", "evicted", "upload_failures", "health_failures",
    "human_compared", "human_disagreed", "challenger_compared", "challenger_agreed",
)
PREDICTED, PREDICTED_VERSION = "predicted", "predicted_version"  # kept beside the counters of a (device, boot)
_EVIDENCE = ("health_failures", "human_compared", "human_disagreed", "challenger_compared", "challenger_agreed")


def heartbeat_values(hb: Heartbeat) -> dict[str, int]:
    values = {k: int(hb.counters.get(k, 0)) for k in HEARTBEAT_VALUES[:6]}
    for k in HEARTBEAT_VALUES[6:]:
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
    """Check the heartbeat, update the device and its (device, boot) counters, and count the increase."""
    now = hub.now()
    device = s.get(Device, hb.device_id, with_for_update=not _sqlite(s))
    if device is None:
        raise NotFound(f"unknown device {hb.device_id!r}; enroll it first")
    current = heartbeat_values(hb)
    state = s.get(HeartbeatState, (hb.device_id, hb.boot_id))
    delta = deltas(state.values if state is not None else None, current)
    predicted = prediction_values(hb)
    before = (state.values or {}) if state is not None else {}
    same = before.get(PREDICTED_VERSION) == hb.predicted_version
    predicted_delta = deltas(before.get(PREDICTED) if same else None, predicted)
    cfg = hub.settings
    last = device.last_seen_at if device.last_seen_at is not None else device.enrolled_at
    why = rate_violation({**delta, "predicted": sum(predicted_delta.values())}, elapsed_s=now - last,
                         max_rate_per_s=cfg.heartbeat_max_rate_per_s, grace_s=cfg.heartbeat_rate_grace_s)
    if why is not None:
        log.warning("heartbeat of %s refused: %s", hb.device_id, why)
        raise ProtocolError(why)
    device.last_seen_at = now
    device.model_version = hb.model_version
    device.boot_id = hb.boot_id
    device.spool_bytes, device.spool_items = hb.spool_bytes, hb.spool_items
    s.add(device)
    kept = {**current, PREDICTED: predicted, PREDICTED_VERSION: hb.predicted_version}
    if state is None:
        s.add(HeartbeatState(device_id=hb.device_id, boot_id=hb.boot_id, model_version=hb.model_version,
                             challenger_version=hb.challenger_version, values=kept, sent_at=hb.sent_at,
                             received_at=now))
    else:
        state.values = kept
        state.model_version = hb.model_version
        state.challenger_version = hb.challenger_version
        state.sent_at = hb.sent_at
        state.received_at = now
        s.add(state)
    if hb.model_version is None:
        return
    rollout = _counted(s, hb.device_id, hb.model_version, "heartbeat")
    if rollout is False:
        return
    delta["heartbeats"] = 1
    _add(s, hb.device_id, hb.model_version, rollout, delta, {k: delta[k] for k in _EVIDENCE} | {"heartbeats": 1})
    if hb.predicted_version == hb.model_version:
        _add_predictions(s, hb.device_id, hb.model_version, rollout, predicted_delta)
    if rollout is None and hb.challenger_version is not None:  # an operator's shadow trial on the device's group
        shadows.record(hub, s, device_id=hb.device_id, group=device.group, model_version=hb.model_version,
                       challenger_version=hb.challenger_version, increments=delta)


def prediction_values(hb: Heartbeat) -> dict[str, int]:
    """The heartbeat's prediction histogram by label: class indices as text, and ``none``."""
    out = {str(i): int(v) for i, v in enumerate(hb.predicted_counts) if v}
    if hb.predicted_none:
        out["none"] = int(hb.predicted_none)
    return out


def _add_predictions(s: Session, device_id: str, version: str, rollout: Rollout | None,
                     increments: dict[str, int]) -> None:
    """Sum a histogram's increase fleet-wide and, for a version in the running rollout, per device in it."""
    places = [("all", "*")]
    if rollout is not None and version in (rollout.version, rollout.incumbent):
        places.append((rollout.rollout_id, device_id))
    rows = [{"scope": scope, "version": version, "device_id": dev, "label": label, "count": n}
            for label, n in sorted(increments.items()) if n > 0 for scope, dev in places]
    if rows:  # one statement per heartbeat, whatever the number of classes
        s.execute(upsert_add_rows(s.get_bind(), PredictionCount.__table__, rows,  # type: ignore[arg-type]
                                  keys=["scope", "version", "device_id", "label"], increments=["count"]))


def record_ota_failure(hub: Hub, s: Session, report: OtaReport) -> bool:
    """A refused or rolled-back install counts as a health failure of the version, if it was assigned."""
    rollout = _counted(s, report.device_id, report.version, f"OTA {report.outcome} report")
    if rollout is False:
        return False
    fails = {"ota_failures": 1, "health_failures": 1}
    _add(s, report.device_id, report.version, rollout, fails, fails)
    return True


def _counted(s: Session, device_id: str, version: str, what: str) -> Rollout | None | bool:
    """False if ``version`` is not assigned to the device (nothing counts); else the running rollout or None."""
    active, challenger, rollout = rollouts.assigned_models(s, device_id)
    assigned = {mv.version for mv in (active, challenger) if mv is not None}
    if version not in assigned:
        log.info("%s of %s for %s not counted: the hub assigned it %s", what, device_id, version,
                 sorted(assigned) or "no model")
        return False
    return rollout


def _add(s: Session, device_id: str, version: str, rollout: Rollout | None, increments: dict[str, int],
         evidence: dict[str, int]) -> None:
    scopes = ["all"]
    in_rollout = rollout is not None and version in (rollout.version, rollout.incumbent)
    if in_rollout:
        assert rollout is not None
        scopes.append(rollout.rollout_id)
    for scope in scopes:
        s.execute(upsert_add(s.get_bind(), FieldMetric.__table__,  # type: ignore[arg-type]
                             {"scope": scope, "version": version}, increments))
    if in_rollout and any(evidence.values()):
        assert rollout is not None
        s.execute(upsert_add(s.get_bind(), RolloutDeviceMetric.__table__,  # type: ignore[arg-type]
                             {"rollout_id": rollout.rollout_id, "version": version, "device_id": device_id},
                             evidence))


def _sqlite(s: Session) -> bool:
    return s.get_bind().dialect.name == "sqlite"
