"""Fleet signing-key rotations over HTTP (fleet.hub.keys)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from fleet.hub import keys
from fleet.hub.api import AdminCaller, AnyCaller, HubDep, message_body, message_response, request_body
from fleet.hub.db import read_session
from fleet.protocol import KeyRotation, KeyRotationList

router = APIRouter(tags=["keys"])


@router.post("/v1/keys/rotations", response_model=KeyRotation, status_code=201,
             openapi_extra=request_body(KeyRotation))
def post_rotation(_: AdminCaller, hub: HubDep, body: KeyRotation = message_body(KeyRotation)) -> Response:
    """Announce a new fleet key (``flywheel keys rotate`` makes the body): kept if a key the hub trusts signed it
    (422 if not); devices get it in their assignment, and models signed by the old key count until
    ``old_key_until``."""
    status, out = keys.add_rotation(hub, body)
    return message_response(out, status_code=status)


@router.get("/v1/keys/rotations", response_model=KeyRotationList)
def list_rotations(_: AnyCaller, hub: HubDep) -> Response:
    """Every rotation, oldest first."""
    with read_session(hub.engine) as s:
        return message_response(KeyRotationList(keys.rotations(s)))
