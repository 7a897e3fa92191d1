"""Enrollment: trade the fleet secret for a device token, and pin the fleet's model-signing key."""

from __future__ import annotations

import logging
from pathlib import Path

from fleet.edge.config import FLEET_SECRET_ENV, AgentConfig
from fleet.edge.fsutil import atomic_write_bytes
from fleet.edge.hubclient import HubClient
from fleet.errors import InvalidInput, ProtocolError
from fleet.protocol import Enrollment

log = logging.getLogger(__name__)

ENROLLMENT_FILE = "enrollment.json"


def enrollment_path(data_dir: Path) -> Path:
    return data_dir / ENROLLMENT_FILE


def enroll(config: AgentConfig, client: HubClient, *, force: bool = False) -> Enrollment:
    """Enroll with the hub and store the token and pinned key (mode 0600) in the data folder."""
    path = enrollment_path(config.data_dir)
    if path.exists() and not force:
        raise InvalidInput(f"{path} exists: this device is already enrolled (use --force to enroll again)")
    secret = config.fleet_secret
    if not secret:
        raise InvalidInput(f"no fleet secret: set hub.fleet_secret in the config or {FLEET_SECRET_ENV}")
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
    config.data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, got.to_json().encode("utf-8"), mode=0o600)
    log.info("enrolled %s; pinned fleet key %s", got.device_id, key_id(got.fleet_public_key))
    return got


def load_enrollment(data_dir: Path) -> Enrollment:
    """The stored enrollment, or InvalidInput telling the user to enroll."""
    path = enrollment_path(data_dir)
    try:
        return Enrollment.from_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise InvalidInput(f"this device is not enrolled ({path} is missing): run 'flywheel agent enroll'") from exc
    except ProtocolError as exc:
        raise InvalidInput(f"{path} is damaged ({exc}); enroll again with 'flywheel agent enroll --force'") from exc
