"""Fleet key rotation at the hub (fleet.hub.keys): kept only when a trusted key signed it, served to devices in
their assignment, and the hub's own trust moves with it (uploads, and the models it serves)."""

from __future__ import annotations

from typing import Any

from fleet.hub.trust import retire_untrusted_models
from fleet.protocol import Assignment, KeyRotation, KeyRotationList
from fleet.signing import generate_keypair, load_private_key, sign_rotation
from tests.hub.conftest import HubHarness
from tests.support.models import make_model_files


def post(hub: HubHarness, rotation: KeyRotation, headers: dict[str, str] | None = None) -> Any:
    return hub.client.post("/v1/keys/rotations", content=rotation.to_json(), headers={
        **(headers if headers is not None else hub.admin), "Content-Type": "application/json"})


def upload(hub: HubHarness, version: str, private_pem: bytes) -> Any:
    files = make_model_files(hub.tmp / "models", version, private_key=load_private_key(private_pem), seed=4)
    return hub.client.post("/v1/models", headers=hub.trainer, data={"manifest": files.signed.to_json()},  # type: ignore[union-attr]
                           files={"onnx": ("model.onnx", files.onnx_path.read_bytes(), "application/octet-stream")})


def test_a_rotation_is_kept_served_and_moves_the_hubs_trust(hub: HubHarness) -> None:
    new, stranger = generate_keypair(), generate_keypair()
    now = hub.clock()
    forged = sign_rotation(load_private_key(stranger.private_pem), new.public_b64, old_key_until=now + 100,
                           issued_at=now)
    r = post(hub, forged)
    assert r.status_code == 422 and "not trusted here" in r.text
    rotation = sign_rotation(load_private_key(hub.keypair.private_pem), new.public_b64, old_key_until=now + 100,
                             issued_at=now)
    assert post(hub, rotation, hub.labeler).status_code == 403
    assert post(hub, rotation).status_code == 201
    assert post(hub, rotation).status_code == 200  # announced already
    listed = KeyRotationList.from_json(hub.client.get("/v1/keys/rotations", headers=hub.devices["d1"]).content)
    assert listed.rotations == [rotation]
    got = Assignment.from_json(hub.client.get("/v1/assignment", headers=hub.devices["d1"]).content)
    assert got.key_rotations == [rotation]

    assert upload(hub, "by-new", new.private_pem).status_code == 201
    assert upload(hub, "by-old", hub.keypair.private_pem).status_code == 201  # within the overlap
    r = upload(hub, "by-stranger", stranger.private_pem)
    assert r.status_code == 422 and "not a trusted fleet key" in r.text
    hub.clock.advance(101)
    r = upload(hub, "late-old", hub.keypair.private_pem)
    assert r.status_code == 422 and "rotated out" in r.text
    # at its next start the hub stops serving what the old key signed (m1, the active model, and by-old)
    assert retire_untrusted_models(hub.hub) == ["by-old", "m1"]
    assert hub.model_statuses() == {"m1": "retired", "by-new": "candidate", "by-old": "retired"}
