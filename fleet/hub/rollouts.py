"""Staged rollouts: device bucketing, assignments, promotions, the rollout state machine and automatic rollback.

A rollout moves a candidate through stages (fractions of the fleet). A stage of fraction f holds the
ceil(f x n) of the n devices it covers (at least one) with the lowest ``bucket(device_id, candidate version)``: it
runs the candidate as ``active`` and the incumbent as ``challenger`` (shadow), so field agreement is measured;
every other device keeps the incumbent. So a 50% canary on four devices is two of them, never none or all four (a
draw per device made it either one time in eight), and the same version goes to the same devices, run after run
(a seeded demo repeats). A device that enrolls during a stage joins it if its bucket is under the stage's
threshold (:func:`stage_threshold`); the threshold is recomputed when the hub sees a device it did not count,
so the stage grows with the fleet, and a newcomer with a lower bucket may take a member's place. Three kinds:

- ``staged``: ``POST /v1/rollouts`` (the trainer publishes this way);
- ``promotion``: ``flywheel models promote`` over an active model, a one-stage rollout to the whole
  fleet that completes after ``promote_hold_s`` unless the field evidence rolls it back;
- ``override``: the same with ``--override``: the model is active at once (no shadow), the override
  is recorded with who asked and why, and it is still undone if the evidence says so.

Device groups (issue 19.4): a rollout may be aimed at one group (``group``); its stages are fractions of that
group's devices and its incumbent is the group's model. When it completes, the group *pins* its version
(``group_models``): its devices run it instead of the fleet's active model, and stay out of fleet-wide rollouts,
until a later rollout on the group replaces it or an operator unpins the group (``DELETE /v1/groups/{group}/model``,
back to the fleet's model). One rollout runs per group, and one fleet-wide. A group rollout never changes a model's
fleet status (``active`` stays the fleet's model); rolling one back retires the candidate only when nothing else
runs it. The hub's own work that needs one model's space (re-scoring, selection, learned triggers) follows the
fleet's active model; a pinned group's devices get the novelty bank of the model they run.

Field metrics come from :mod:`fleet.hub.heartbeats` (only what devices were assigned counts); the
rules that roll a candidate back, and how many devices the evidence must come from, are in
:mod:`fleet.hub.evidence`. A rollback assigns the incumbent everywhere and retires the candidate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import secrets
import time
from typing import Any

from sqlmodel import Session, col, select

from fleet.errors import Conflict, NotFound
from fleet.hub import keys
from fleet.hub.context import Hub
from fleet.hub.evidence import DeviceEvidence, Pooled, Predictions, ShadowBound, verdict
from fleet.hub.learned import follow_models, spec_for_model, spec_for_triggers
from fleet.hub.models import (
    Campaign,
    Device,
    FieldMetric,
    GroupModel,
    ModelVersion,
    NoveltyBankRow,
    PredictionCount,
    Rollout,
    RolloutDeviceMetric,
    ShadowTrial,
)
from fleet.hub.running import active_model, model_for_group
from fleet.protocol import FIELD_COUNTERS, Assignment, CampaignRef, FieldMetrics, ModelRef, RolloutPublic

log = logging.getLogger(__name__)


def bucket(device_id: str, key: str) -> float:
    """The device's stable position in [0, 1) for ``key`` (a rollout's candidate version)."""
    return int(hashlib.sha256((device_id + key).encode()).hexdigest()[:8], 16) / 2**32


_THRESHOLDS: dict[tuple[str, int], tuple[float, float, frozenset[str]]] = {}
_THRESHOLD_TTL_S = 5.0


def stage_threshold(s: Session, rollout: Rollout) -> tuple[float, frozenset[str]]:
    """(threshold, devices counted) of the rollout's current stage: a device is in it when its bucket is at or
    under the threshold, the k-th lowest bucket of the n devices the rollout covers, k = ceil(fraction x n), at
    least 1 (infinite at a stage of 1.0, none with no device). Cached a few seconds per stage; an enrollment or a
    revocation in this worker (:func:`fleet_changed`), or the assignment of a device it did not count, recomputes
    it."""
    key = (rollout.rollout_id, rollout.stage_index)
    hit = _THRESHOLDS.get(key)
    if hit is not None and hit[0] > time.monotonic() - _THRESHOLD_TTL_S:
        return hit[1], hit[2]
    ids = frozenset(_covered(s, rollout))
    fraction = rollout.stages[rollout.stage_index]
    if fraction >= 1.0:
        threshold = math.inf
    elif not ids:
        threshold = -math.inf
    else:
        ranked = sorted(bucket(d, rollout.version) for d in ids)
        threshold = ranked[min(len(ranked), max(1, math.ceil(fraction * len(ranked)))) - 1]
    if len(_THRESHOLDS) > 256:
        _THRESHOLDS.clear()
    _THRESHOLDS[key] = (time.monotonic(), threshold, ids)
    return threshold, ids


def fleet_changed() -> None:
    """A device enrolled, moved or was revoked: this worker counts every stage again (another worker within
    ``_THRESHOLD_TTL_S``, or at once when a device it did not count asks)."""
    _THRESHOLDS.clear()


def in_canary(s: Session, device_id: str, rollout: Rollout) -> bool:
    """Whether ``device_id`` is in the rollout's current stage (see :func:`stage_threshold`)."""
    threshold, counted = stage_threshold(s, rollout)
    if device_id not in counted and threshold < math.inf:  # enrolled since (or the first): count it
        _THRESHOLDS.pop((rollout.rollout_id, rollout.stage_index), None)
        threshold, counted = stage_threshold(s, rollout)
    return bucket(device_id, rollout.version) <= threshold


# ---------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------


def running_rollout(s: Session, group: str | None = None) -> Rollout | None:
    """The running rollout aimed at ``group``; with None, the fleet-wide one."""
    q = select(Rollout).where(Rollout.state == "running")
    q = q.where(col(Rollout.group).is_(None)) if group is None else q.where(Rollout.group == group)
    return s.exec(q.order_by(col(Rollout.created_at).desc())).first()


def running_rollouts(s: Session) -> list[Rollout]:
    """Every running rollout, the fleet's and the groups'."""
    return list(s.exec(select(Rollout).where(Rollout.state == "running")).all())


def governing_rollout(s: Session, group: str) -> Rollout | None:
    """The rollout that decides what ``group``'s devices run: its own, else (unless it pins a model) the fleet's."""
    own = running_rollout(s, group)
    if own is not None or s.get(GroupModel, group) is not None:
        return own
    return running_rollout(s)


def model_ref(mv: ModelVersion | None) -> ModelRef | None:
    return None if mv is None else ModelRef(version=mv.version, onnx_sha256=mv.onnx_sha256)


def field_metrics(s: Session, version: str, scope: str = "all") -> FieldMetrics:
    """Summed counters and the derived rates for ``version`` in ``scope``."""
    row = s.get(FieldMetric, (scope, version))
    counts = {k: int(getattr(row, k)) for k in FIELD_COUNTERS} if row is not None else {}
    fm = FieldMetrics(version=version, scope=scope, **counts)
    fm.disagreement = _rate(fm.human_disagreed, fm.human_compared)
    fm.trigger_rate = _rate(fm.flagged, fm.frames_seen)
    fm.challenger_agreement = _rate(fm.challenger_agreed, fm.challenger_compared)
    return fm


def _rate(num: int, den: int) -> float | None:
    return None if den <= 0 else num / den


# ---------------------------------------------------------------------------------------------
# assignment
# ---------------------------------------------------------------------------------------------


def assigned_models(s: Session, device_id: str) -> tuple[ModelVersion | None, ModelVersion | None, Rollout | None]:
    """(active, challenger) the hub assigns ``device_id`` now, and the rollout that decides it if any."""
    device = s.get(Device, device_id)
    group = device.group if device is not None else None
    rollout = governing_rollout(s, group) if group is not None else running_rollout(s)
    if rollout is None:
        active = model_for_group(s, group)
        return active, _trial_challenger(s, group, active), None
    incumbent = s.get(ModelVersion, rollout.incumbent) if rollout.incumbent else None
    if in_canary(s, device_id, rollout):
        return s.get(ModelVersion, rollout.version), (None if rollout.kind == "override" else incumbent), rollout
    return incumbent, None, rollout


def _trial_challenger(s: Session, group: str | None, active: ModelVersion | None) -> ModelVersion | None:
    """The candidate of a running shadow trial on the device's group (fleet.hub.shadows), beside ``active``."""
    if active is None or group is None:
        return None
    trial = s.exec(select(ShadowTrial).where(ShadowTrial.group == group, ShadowTrial.state == "running",
                                             ShadowTrial.incumbent == active.version)).first()
    return None if trial is None else s.get(ModelVersion, trial.version)


def assignment_for(s: Session, device: Device, *, now: float, triggers: frozenset[str] | None = None) -> Assignment:
    """What ``device`` should run now (``triggers``: the trigger kinds its agent evaluates, when it said)."""
    active, challenger, rollout = assigned_models(s, device.device_id)
    return Assignment(
        device_id=device.device_id,
        active=model_ref(active),
        challenger=model_ref(challenger),
        campaigns=campaigns_for(s, device.group, now=now, model_version=active.version if active else None,
                                triggers=triggers),
        rollout_id=rollout.rollout_id if rollout is not None else None,
        issued_at=now,
        key_rotations=keys.rotations(s),
    )


def campaigns_for(s: Session, group: str, *, now: float, model_version: str | None = None,
                  triggers: frozenset[str] | None = None) -> list[CampaignRef]:
    """The newest live version of each campaign aimed at ``group`` (or at every group), each with the novelty
    bank of ``model_version``, the model the device is assigned (see :func:`bank_for`), with the learned leaf
    fitted for that model or without one (fleet.hub.learned.spec_for_model: never another model's weights), and
    without leaves of trigger kinds the device's agent does not evaluate (``triggers``, when it said;
    fleet.hub.learned.spec_for_triggers). A campaign with nothing left is not sent."""
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
        spec = spec_for_model(c, model_version)  # the learned leaf of the model the device runs, or none
        spec = None if spec is None else spec_for_triggers(c, spec, triggers)
        if spec is None:
            continue
        ref = CampaignRef(campaign_id=c.campaign_id, version=c.version, spec=spec, expires_at=c.expires_at)
        if c.novelty_bank or _needs_bank(spec):
            bank, ref.novelty_bank_version = bank_for(s, c.novelty_bank, model_version)
            if bank is not None:
                ref.novelty_bank, ref.novelty_bank_sha256 = bank.bank_id, bank.sha256
        out.append(ref)
    return out


def bank_for(s: Session, campaign_bank: str | None, model_version: str | None
             ) -> tuple[NoveltyBankRow | None, str | None]:
    """The novelty bank a device running ``model_version`` scores a campaign's novelty against, and the model
    version whose embeddings it must hold.

    The campaign's own bank if it was built in ``model_version``'s space (or its space is unknown, or the device
    has no model yet); else the newest bank of ``model_version`` (the trainer uploads one with each model);
    else none: ``(None, model_version)`` tells the device to pause the campaign until that bank exists.
    """
    own = s.get(NoveltyBankRow, campaign_bank) if campaign_bank else None
    if own is not None and (model_version is None or own.model_version in (None, model_version)):
        return own, own.model_version or model_version
    if model_version is None:
        return None, None
    newest = s.exec(select(NoveltyBankRow).where(NoveltyBankRow.model_version == model_version)
                    .order_by(col(NoveltyBankRow.created_at).desc())).first()
    return newest, model_version


def _needs_bank(spec: dict[str, Any]) -> bool:
    """Whether a stored trigger spec scores novelty (its rules need a bank)."""
    return "bank" in _spec_needs(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _spec_needs(doc: str) -> frozenset[str]:
    from trigger import parse_spec

    try:
        return frozenset(parse_spec(json.loads(doc)).needs)
    except (ValueError, TypeError):  # stored specs were parsed at creation; a newer parser may disagree
        return frozenset()


# ---------------------------------------------------------------------------------------------
# the rollout state machine
# ---------------------------------------------------------------------------------------------


def start(hub: Hub, s: Session, version: str, stages: list[float], stage_seconds: float | None, *,
          kind: str = "staged", reason: str | None = None, group: str | None = None) -> Rollout:
    if group is not None:
        return _start_on_group(hub, s, version, stages, stage_seconds, group=group, reason=reason)
    now = hub.now()
    mv = s.get(ModelVersion, version)
    if mv is None:
        raise NotFound(f"unknown model version {version!r}")
    if mv.status not in ("candidate", "retired"):
        raise Conflict(f"model {version!r} is {mv.status}; only a candidate or a retired version can be rolled out")
    other = _supersede_override(hub, s, running_rollout(s), by=version)
    if other is not None:
        raise Conflict(f"rollout {other.rollout_id} of {other.version!r} is still running; advance it to the end "
                       f"or roll it back first")
    incumbent = active_model(s)
    rollout = _new_rollout(version, incumbent, stages, stage_seconds, kind=kind, reason=reason, now=now)
    if kind == "override":  # active at once; the incumbent is what a rollback brings back
        promote(hub, s, version)
    else:
        _set_status(mv, "canary", now)
        s.add(mv)
    s.add(rollout)
    log.info("rollout %s (%s): %s over %s, stages %s", rollout.rollout_id, kind, version, rollout.incumbent, stages)
    return rollout


def _start_on_group(hub: Hub, s: Session, version: str, stages: list[float], stage_seconds: float | None, *,
                    group: str, reason: str | None) -> Rollout:
    """A staged rollout on one group's devices, from the group's model; the model's fleet status is kept."""
    now = hub.now()
    mv = s.get(ModelVersion, version)
    if mv is None:
        raise NotFound(f"unknown model version {version!r}")
    other = running_rollout(s, group)
    if other is not None:
        raise Conflict(f"rollout {other.rollout_id} of {other.version!r} is still running on group {group!r}; "
                       f"advance it to the end or roll it back first")
    incumbent = model_for_group(s, group)
    if incumbent is not None and incumbent.version == version:
        raise Conflict(f"group {group!r} runs {version!r} already")
    rollout = _new_rollout(version, incumbent, stages, stage_seconds, kind="staged", reason=reason, now=now,
                           group=group)
    s.add(rollout)
    log.info("rollout %s on group %s: %s over %s, stages %s", rollout.rollout_id, group, version,
             rollout.incumbent, stages)
    return rollout


def _new_rollout(version: str, incumbent: ModelVersion | None, stages: list[float], stage_seconds: float | None, *,
                 kind: str, reason: str | None, now: float, group: str | None = None) -> Rollout:
    """A running rollout of ``version`` over ``incumbent`` at its first stage (fleet-wide, or on ``group``)."""
    return Rollout(
        rollout_id=f"ro-{int(now)}-{secrets.token_hex(3)}", version=version,
        incumbent=incumbent.version if incumbent else None, stages=list(stages), stage_index=0,
        stage_seconds=stage_seconds, state="running", kind=kind, reason=reason, created_at=now,
        stage_started_at=now, group=group,
    )


def unpin(hub: Hub, s: Session, group: str) -> GroupModel:
    """The group runs the fleet's active model again (and joins fleet rollouts); the pin that was removed."""
    pin = s.get(GroupModel, group)
    if pin is None:
        raise NotFound(f"group {group!r} has no model of its own; it runs the fleet's active model")
    running = running_rollout(s, group)
    if running is not None:
        raise Conflict(f"rollout {running.rollout_id} of {running.version!r} is running on group {group!r}; "
                       f"finish or roll it back first")
    s.delete(pin)
    s.flush()
    log.info("group %s no longer pins %s; it runs the fleet's active model", group, pin.version)
    _follow_models(hub, s, why=f"group {group} runs the fleet's active model again")
    return pin


def pinned_groups(s: Session, version: str | None = None) -> list[GroupModel]:
    q = select(GroupModel).order_by(GroupModel.group)
    if version is not None:
        q = q.where(GroupModel.version == version)
    return list(s.exec(q).all())


def promote_version(hub: Hub, s: Session, version: str, *, override: bool, reason: str, actor: str
                    ) -> Rollout | None:
    """``flywheel models promote``: with no active model, activate at once (None); otherwise start a
    one-stage rollout to the whole fleet (``promotion``), or with ``override`` activate now and
    record it (``override``): either completes after ``promote_hold_s`` unless the evidence rolls it back."""
    mv = s.get(ModelVersion, version)
    if mv is None:
        raise NotFound(f"unknown model version {version!r}")
    running = running_rollout(s)
    if running is not None and running.version != version:
        running = _supersede_override(hub, s, running, by=version)
    if running is not None and running.version != version:
        raise Conflict(f"rollout {running.rollout_id} of {running.version!r} is running; roll it back before "
                       f"promoting {version!r}")
    if running is not None:
        if not override:
            raise Conflict(f"{version!r} is already rolling out ({running.rollout_id}, {running.kind}); advance "
                           f"that rollout, or promote with override to make it active now")
        if running.kind == "override":
            return running  # overridden already
        now = hub.now()
        running.state, running.finished_at = "aborted", now
        running.reason = _joined(running.reason, f"superseded by an admin override by {actor}")
        s.add(running)
        _set_status(mv, "candidate", now)  # the incumbent is still the active model
        s.add(mv)
        s.flush()
    current = active_model(s)
    if current is None:  # the first active model: nothing to compare it with, nothing to fall back to
        promote(hub, s, version)
        log.info("%s promoted %s: the first active model", actor, version)
        return None
    if current.version == version:
        return None
    hold = hub.settings.promote_hold_s
    if override:
        return start(hub, s, version, [1.0], hold, kind="override", reason=f"admin override by {actor}: {reason}")
    return start(hub, s, version, [1.0], hold, kind="promotion", reason=f"promotion by {actor}: {reason}")


def advance(hub: Hub, s: Session, rollout: Rollout, *, reason: str = "advanced") -> Rollout:
    _require_running(rollout)
    now = hub.now()
    if rollout.stage_index + 1 < len(rollout.stages):
        rollout.stage_index += 1
        rollout.stage_started_at = now
        log.info("rollout %s: stage %d (%.0f%%): %s", rollout.rollout_id, rollout.stage_index,
                 100 * rollout.stages[rollout.stage_index], reason)
    else:
        finish(hub, s, rollout, reason=reason)
    s.add(rollout)
    return rollout


def _supersede_override(hub: Hub, s: Session, running: Rollout | None, *, by: str) -> Rollout | None:
    """An override's watch ends when another version comes (its model is active already); None then."""
    if running is None or running.kind != "override":
        return running
    finish(hub, s, running, reason=f"watch ended: {by} is rolling out")
    s.flush()
    return None


def finish(hub: Hub, s: Session, rollout: Rollout, *, reason: str) -> Rollout:
    """Complete ``rollout``: its version is the active model (of its group, for a group rollout)."""
    _require_running(rollout)
    if rollout.group is not None:
        pin = s.get(GroupModel, rollout.group) or GroupModel(group=rollout.group, version=rollout.version,
                                                            set_at=hub.now())
        pin.version, pin.previous, pin.rollout_id, pin.set_at = (rollout.version, rollout.incumbent,
                                                                 rollout.rollout_id, hub.now())
        s.add(pin)
        s.flush()
        _follow_models(hub, s, why=f"group {rollout.group} runs {rollout.version}")
    else:
        mv = s.get(ModelVersion, rollout.version)
        if mv is None or mv.status != "active":
            promote(hub, s, rollout.version)
    rollout.state = "completed"
    rollout.finished_at = hub.now()
    rollout.reason = _joined(rollout.reason, reason) if rollout.kind != "staged" else reason
    s.add(rollout)
    log.info("rollout %s: completed; %s is active", rollout.rollout_id, rollout.version)
    return rollout


def rollback(hub: Hub, s: Session, rollout: Rollout, *, reason: str) -> Rollout:
    _require_running(rollout)
    now = hub.now()
    rollout.state = "rolled_back"
    rollout.reason = _joined(rollout.reason, reason) if rollout.kind != "staged" else reason
    rollout.finished_at = now
    if rollout.kind == "override" and rollout.incumbent is not None:
        promote(hub, s, rollout.incumbent)  # the override made it active: bring the incumbent back
    mv = s.get(ModelVersion, rollout.version)
    if mv is None or (rollout.group is not None and mv.status in ("active", "canary")):
        pass  # the fleet runs it, or is rolling it out: one group's rollback does not retire it
    elif pinned_groups(s, rollout.version):  # a group runs it: it stays a candidate
        if mv.status == "canary":
            _set_status(mv, "candidate", now)
            s.add(mv)
    else:
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
        raise NotFound(f"unknown model version {version!r}")
    for other in s.exec(select(ModelVersion).where(ModelVersion.status == "active")).all():
        if other.version != version:
            _set_status(other, "retired", now)
            s.add(other)
    _set_status(mv, "active", now)
    mv.activated_at = now
    s.add(mv)
    s.flush()
    _follow_models(hub, s, why=f"{version} is the fleet's active model")
    return mv


def _follow_models(hub: Hub, s: Session, *, why: str) -> None:
    """A learned fit belongs to one model: the campaigns whose devices now run another one follow it."""
    for campaign, what in follow_models(s, now=hub.now(), blobs=hub.blobs).items():
        log.info("campaign %s: learned trigger %s (%s)", campaign, what, why)


def evaluate(hub: Hub, s: Session, rollout: Rollout) -> str | None:
    """Roll back or advance ``rollout`` if its field evidence or its clock say so; return what happened."""
    if rollout.state != "running":
        return None
    why = rollback_reason(hub, s, rollout)
    if why is not None:
        rollback(hub, s, rollout, reason=why)
        return "rolled_back"
    if rollout.stage_seconds is not None and hub.now() - rollout.stage_started_at >= rollout.stage_seconds:
        advance(hub, s, rollout, reason=f"stage held {rollout.stage_seconds:g}s without a rollback")
        return "advanced"
    return None


def rollback_reason(hub: Hub, s: Session, rollout: Rollout) -> str | None:
    """The rules of :mod:`fleet.hub.evidence` applied to what this rollout's devices reported."""
    rows = s.exec(select(RolloutDeviceMetric).where(RolloutDeviceMetric.rollout_id == rollout.rollout_id,
                                                    RolloutDeviceMetric.version == rollout.version)).all()
    devices = [DeviceEvidence(device_id=r.device_id, health_failures=r.health_failures, ota_failures=r.ota_failures,
                              human_compared=r.human_compared, human_disagreed=r.human_disagreed,
                              challenger_compared=r.challenger_compared, challenger_agreed=r.challenger_agreed)
               for r in rows]
    predictions = prediction_evidence(s, rollout)
    if not devices and predictions is None:
        return None
    cand = field_metrics(s, rollout.version, rollout.rollout_id)
    incumbent = None
    if rollout.incumbent is not None:
        inc = field_metrics(s, rollout.incumbent, rollout.rollout_id)
        if inc.human_compared < hub.settings.rollback_min_compared:
            inc = field_metrics(s, rollout.incumbent, "all")
        incumbent = Pooled(inc.human_compared, inc.human_disagreed)
    return verdict(hub.settings, devices, canary_size=canary_size(hub, s, rollout),
                   candidate=Pooled(cand.human_compared, cand.human_disagreed), incumbent=incumbent,
                   shadow=shadow_bound(hub, s, rollout), predictions=predictions)


def prediction_evidence(s: Session, rollout: Rollout) -> Predictions | None:
    """Rule 5's histograms for ``rollout``: the candidate's per device, the incumbent's summed (None without an
    incumbent or any prediction counted for the candidate)."""
    if rollout.incumbent is None:
        return None
    rows = s.exec(select(PredictionCount).where(PredictionCount.scope == rollout.rollout_id)).all()
    candidate: dict[str, dict[str, int]] = {}
    incumbent: dict[str, int] = {}
    for r in rows:
        if r.version == rollout.version:
            candidate.setdefault(r.device_id, {})[r.label] = int(r.count)
        elif r.version == rollout.incumbent:
            incumbent[r.label] = incumbent.get(r.label, 0) + int(r.count)
    return Predictions(candidate, incumbent) if candidate else None


def shadow_bound(hub: Hub, s: Session, rollout: Rollout) -> ShadowBound | None:
    """Rule 4's bound: the candidate's and the incumbent's test errors (their manifests' ``test_accuracy``), or
    ``rollback_shadow_bound`` for models without one; None when there is no shadow (an override) or no bound."""
    if rollout.kind == "override" or rollout.incumbent is None:
        return None
    models = [s.get(ModelVersion, v) for v in (rollout.version, rollout.incumbent)]
    accs = [mv.metrics.get("test_accuracy") if mv is not None else None for mv in models]
    if all(isinstance(a, int | float) and 0.0 <= a <= 1.0 for a in accs):
        errs = [1.0 - float(a) for a in accs]  # type: ignore[arg-type]
        return ShadowBound(min(1.0, errs[0] + errs[1]), f"the candidate's and the incumbent's test errors "
                           f"({errs[0]:.3f} + {errs[1]:.3f})")
    if hub.settings.rollback_shadow_bound is not None:
        return ShadowBound(hub.settings.rollback_shadow_bound, "rollback_shadow_bound")
    return None


def canary_size(hub: Hub, s: Session, rollout: Rollout) -> int:
    """Enrolled, unrevoked devices in the rollout's current stage."""
    threshold, ids = stage_threshold(s, rollout)
    return sum(1 for d in ids if bucket(d, rollout.version) <= threshold)


def _covered(s: Session, rollout: Rollout) -> list[str]:
    """The enrolled, unrevoked devices ``rollout`` covers: its group's, or for a fleet-wide one every device
    outside the groups that run a model (or a rollout) of their own."""
    q = select(Device.device_id).where(col(Device.revoked_at).is_(None))
    if rollout.group is not None:
        q = q.where(Device.group == rollout.group)
    else:
        own = {p.group for p in pinned_groups(s)} | {r.group for r in running_rollouts(s) if r.group is not None}
        if own:
            q = q.where(col(Device.group).not_in(sorted(own)))
    return list(s.exec(q).all())


def evaluate_running(hub: Hub, s: Session) -> str | None:
    """Evaluate every running rollout (the fleet's and the groups'); what happened to the last that moved."""
    moved = None
    for rollout in running_rollouts(s):
        moved = evaluate(hub, s, rollout) or moved
    return moved


def rollout_status(s: Session, rollout: Rollout) -> RolloutPublic:
    """The rollout as the API shows it, with its candidate's and incumbent's field metrics in its scope."""
    versions = [rollout.version] + ([rollout.incumbent] if rollout.incumbent else [])
    return RolloutPublic(
        rollout_id=rollout.rollout_id, kind=rollout.kind, version=rollout.version, incumbent=rollout.incumbent,
        group=rollout.group,
        state=rollout.state, stages=list(rollout.stages), stage=rollout.stage_index,
        fraction=rollout.stages[rollout.stage_index], stage_seconds=rollout.stage_seconds,
        stage_started_at=rollout.stage_started_at, created_at=rollout.created_at, finished_at=rollout.finished_at,
        reason=rollout.reason, metrics={v: field_metrics(s, v, rollout.rollout_id) for v in versions},
    )


def _require_running(rollout: Rollout) -> None:
    if rollout.state != "running":
        raise Conflict(f"rollout {rollout.rollout_id} is {rollout.state}, not running")


def _set_status(mv: ModelVersion, status: str, now: float) -> None:
    mv.status = status
    mv.status_changed_at = now


def _joined(first: str | None, then: str) -> str:
    return then if not first else f"{first}; then {then}"


__all__ = ["bucket", "assignment_for", "assigned_models", "evaluate", "start", "advance", "rollback"]
