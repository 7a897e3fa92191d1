"""Fleet signing-key rotation at the hub (issue 19.7).

An operator makes a new key pair and announces it under the old key (``flywheel keys rotate``, which signs a
:class:`~fleet.protocol.KeyRotation` with the old private key and posts it). The hub accepts a rotation only if
a key it trusts signed it, keeps it, verifies model uploads under every key still counting (the old one only
until the overlap ends), and hands every rotation to devices in their assignment, oldest first, so a device that
pinned the first key follows them all (fleet.edge.modelstore). After the overlap, models signed by the old key
are refused by devices and by the hub alike.
"""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, select

from fleet.errors import ProtocolError
from fleet.hub.context import Hub
from fleet.hub.db import read_session, write_session
from fleet.hub.models import KeyRotationRow
from fleet.protocol import KeyRotation
from fleet.signing import KeyRing, key_id


def rotations(s: Session) -> list[KeyRotation]:
    """Every rotation the hub holds, oldest first."""
    return [KeyRotation.from_dict(r.payload) for r in s.exec(select(KeyRotationRow).order_by(KeyRotationRow.seq))]


def keyring(hub: Hub) -> KeyRing:
    """The keys the hub trusts now: the configured fleet key, then each rotation in order."""
    pinned = hub.settings.public_key()
    if pinned is None:
        raise ProtocolError("this hub has no fleet public key configured (FLYWHEEL_HUB_SIGNING_PUBLIC_KEY); it "
                            "cannot verify models")
    with read_session(hub.engine) as s:
        return KeyRing.following(pinned, rotations(s))


def add_rotation(hub: Hub, rotation: KeyRotation) -> tuple[int, KeyRotation]:
    """Keep ``rotation`` if a trusted key signed it (IntegrityError, a 422, if not): 201, or 200 when its key is
    trusted already (announced before, by this or another worker)."""
    if not keyring(hub).accept(rotation):
        return 200, rotation
    try:
        with write_session(hub.engine) as s:
            s.add(KeyRotationRow(new_key_id=key_id(rotation.new_public_key), payload=rotation.to_dict(),
                                 created_at=hub.now()))
    except DBIntegrityError:  # another worker stored the same key a moment ago
        return 200, rotation
    hub.models.clear()
    return 201, rotation
