"""Serve only what the fleet key signs: models signed by a key the hub no longer trusts are retired at start.

The signing key is a setting, so it changes only with a restart; a rotation (fleet.hub.keys) adds keys and ends
an old key's overlap. At start every model that could still reach a device (active, canary, candidate) is
checked against the keys that count now. One that does not verify is retired, and a running rollout of it
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
from fleet.hub.keys import keyring
from fleet.hub.models import ModelVersion
from fleet.protocol import SignedManifest
from fleet.signing import KeyRing

log = logging.getLogger(__name__)

LIVE = ("active", "canary", "candidate")


def trusted(mv: ModelVersion, ring: KeyRing, now: float) -> bool:
    """Whether ``mv``'s stored signed manifest verifies under a key of ``ring`` that still counts at ``now``."""
    try:
        ring.verify(SignedManifest.from_dict(mv.signed_manifest), now=now)
    except (IntegrityError, ProtocolError):
        return False
    return True


def retire_untrusted_models(hub: Hub) -> list[str]:
    """Retire the live models the keys that count now do not verify; return their versions."""
    if hub.settings.public_key() is None:
        return []
    key, now = keyring(hub), hub.now()
    kid = ", ".join(k.key_id for k in key.keys if k.until is None or k.until >= now)
    with write_session(hub.engine) as s:
        live = s.exec(select(ModelVersion).where(col(ModelVersion.status).in_(LIVE))).all()
        bad = {mv.version for mv in live if not trusted(mv, key, now)}
        if not bad:
            return []
        why = f"signed by a key this hub no longer trusts (it trusts {kid})"
        for running in rollouts.running_rollouts(s):
            if running.version in bad:
                rollouts.rollback(hub, s, running, reason=f"{running.version} is {why}")
        for pin in rollouts.pinned_groups(s):  # such a group runs the fleet's model again
            if pin.version in bad:
                s.delete(pin)
                log.warning("group %s no longer runs %s: %s", pin.group, pin.version, why)
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
            fallback = next((mv for mv in earlier if trusted(mv, key, now)), None)
            if fallback is not None:
                rollouts.promote(hub, s, fallback.version)
                log.warning("re-activated %s, the last active model signed by key %s", fallback.version, kid)
    hub.models.clear()
    log.warning("retired model(s) %s: %s", sorted(bad), why)
    return sorted(bad)
