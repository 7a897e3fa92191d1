"""Enrollment: trade the fleet secret (or an admin's enrollment token) for a device token, and pin the fleet's
model-signing key. ``--force`` enrolls again with the device's own current token."""

from __future__ import annotations

import logging
from pathlib import Path

from fleet.edge.config import FLEET_SECRET_ENV, AgentConfig
from fleet.edge.fsutil import atomic_write_bytes, private_dir
from fleet.edge.hubclient import HubClient
from fleet.errors import InvalidInput, ProtocolError, Unauthorized
from fleet.protocol import Enrollment

log = logging.getLogger(__name__)

ENROLLMENT_FILE = "enrollment.json"
ENROLLMENT_TOKEN_ENV = "FLYWHEEL_ENROLLMENT_TOKEN"


def enrollment_path(data_dir: Path) -> Path:
    return data_dir / ENROLLMENT_FILE


def enroll(config: AgentConfig, client: HubClient, *, force: bool = False, enrollment_token: str = "") -> Enrollment:
    """Enroll with the hub and store the token and pinned key (mode 0600) in the data folder.

    The hub binds a device id to its first enrollment: the fleet secret enrolls a new id only. With
    ``force`` an enrolled device enrolls again with its current token (from the data folder); one
    whose credentials are lost needs an ``enrollment_token`` from an admin.
    """
    path = enrollment_path(config.data_dir)
    if path.exists() and not force:
        raise InvalidInput(f"{path} exists: this device is already enrolled (use --force to enroll again)")
    secret = config.fleet_secret
    current = _current_token(config) if force and not enrollment_token else None
    if not secret and not enrollment_token and current is None:
        raise InvalidInput(f"no fleet secret: set hub.fleet_secret in the config or {FLEET_SECRET_ENV}, "
                           f"or pass an enrollment token from an admin ({ENROLLMENT_TOKEN_ENV})")
    try:
        got = client.enroll(config.device_id, secret, config.hub.group, current_token=current,
                            enrollment_token=enrollment_token)
    except Unauthorized:
        if current is None or not secret:
            raise
        # the hub no longer knows our token (a new hub database): as a new device, if it has none by this id
        log.warning("the hub refused this device's current token; enrolling with the fleet secret instead")
        got = client.enroll(config.device_id, secret, config.hub.group)
    if got.device_id != config.device_id:
        raise ProtocolError(f"hub enrolled device {got.device_id!r}, but this device is {config.device_id!r}")
    pinned = config.hub.fleet_public_key.strip()
    if pinned and got.fleet_public_key.strip() != pinned:
        raise InvalidInput(
            f"the hub offered fleet key {got.fleet_public_key[:12]}..., but the config pins {pinned[:12]}...; "
            "refusing to enroll with a hub that signs with another key"
        )
    from fleet.signing import key_id

    key_id(got.fleet_public_key)  # refuses a key that is not 32 raw bytes of base64
    private_dir(config.data_dir)
    atomic_write_bytes(path, got.to_json().encode("utf-8"), mode=0o600)
    log.info("enrolled %s; pinned fleet key %s", got.device_id, key_id(got.fleet_public_key))
    return got


def _current_token(config: AgentConfig) -> str | None:
    """The token of the stored enrollment, if there is a readable one for this device id."""
    try:
        stored = load_enrollment(config.data_dir)
    except InvalidInput:
        return None
    return stored.token if stored.device_id == config.device_id else None


def load_enrollment(data_dir: Path) -> Enrollment:
    """The stored enrollment, or InvalidInput telling the user to enroll."""
    path = enrollment_path(data_dir)
    try:
        return Enrollment.from_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise InvalidInput(f"this device is not enrolled ({path} is missing): run 'flywheel agent enroll'") from exc
    except ProtocolError as exc:
        raise InvalidInput(f"{path} is damaged ({exc}); enroll again with 'flywheel agent enroll --force'") from exc
