"""Serve only what the fleet key signs: models signed by a key the hub no longer trusts are retired at start.

The signing key is a setting, so it changes only with a restart. When it does (a key rotated, or
switched back), every model that could still reach a device (active, canary, candidate) is checked
against the key now configured. One that does not verify is retired, and a running rollout of it
rolled back; if that leaves no active model, the most recently active model that does verify is
made active again (none: devices keep what they run until a model signed by the new key arrives).
Devices would refuse such a model anyway (they pin the key at enrollment): this keeps the hub from
telling them to try, and from reporting as active a model nothing can install.
"""

from __future__ import annotations

import logging

from sqlmodel import col, select

from fleet.errors import IntegrityError, ProtocolError
from fleet.hub import rollouts
from fleet.hub.context import Hub
from fleet.hub.db import write_session
from fleet.hub.models import ModelVersion
from fleet.protocol import SignedManifest
from fleet.signing import key_id, verify_manifest

log = logging.getLogger(__name__)

LIVE = ("active", "canary", "candidate")


def trusted(mv: ModelVersion, public_key: str) -> bool:
    """Whether ``mv``'s stored signed manifest verifies under ``public_key``."""
    try:
        verify_manifest(SignedManifest.from_dict(mv.signed_manifest), public_key)
    except (IntegrityError, ProtocolError):
        return False
    return True


def retire_untrusted_models(hub: Hub) -> list[str]:
    """Retire the live models the configured key does not verify; return their versions."""
    key = hub.settings.public_key()
    if key is None:
        return []
    kid = key_id(key)
    with write_session(hub.engine) as s:
        live = s.exec(select(ModelVersion).where(col(ModelVersion.status).in_(LIVE))).all()
        bad = {mv.version for mv in live if not trusted(mv, key)}
        if not bad:
            return []
        why = f"signed by a key this hub no longer trusts (it trusts {kid})"
        running = rollouts.running_rollout(s)
        if running is not None and running.version in bad:
            rollouts.rollback(hub, s, running, reason=f"{running.version} is {why}")
        now = hub.now()
        for mv in s.exec(select(ModelVersion).where(col(ModelVersion.version).in_(sorted(bad)))).all():
            if mv.status != "retired":
                mv.status, mv.status_changed_at = "retired", now
                s.add(mv)
        s.flush()
        if rollouts.active_model(s) is None:
            earlier = s.exec(select(ModelVersion).where(ModelVersion.status == "retired",
                                                        col(ModelVersion.activated_at).is_not(None),
                                                        col(ModelVersion.version).not_in(sorted(bad)))
                             .order_by(col(ModelVersion.activated_at).desc())).all()
            fallback = next((mv for mv in earlier if trusted(mv, key)), None)
            if fallback is not None:
                rollouts.promote(hub, s, fallback.version)
                log.warning("re-activated %s, the last active model signed by key %s", fallback.version, kid)
    hub.models.clear()
    log.warning("retired model(s) %s: %s", sorted(bad), why)
    return sorted(bad)
