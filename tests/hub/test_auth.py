"""Enrollment, scoped tokens, revocation, and a device acting only for itself."""

from __future__ import annotations

import pytest

from tests.hub.conftest import HubHarness


def test_enroll_issues_a_device_token_that_reads_its_assignment(hub: HubHarness) -> None:
    r = hub.client.post("/v1/enroll", json={"device_id": "cam-7", "fleet_secret": "dev-fleet-secret"})
    assert r.status_code == 200
    body = r.json()
    assert body["device_id"] == "cam-7" and body["token"].startswith("fwt_")
    assert body["fleet_public_key"] == hub.keypair.public_b64
    a = hub.client.get("/v1/assignment", headers={"Authorization": f"Bearer {body['token']}"})
    assert a.status_code == 200 and a.json()["device_id"] == "cam-7"


def test_tokens_are_stored_hashed(hub: HubHarness) -> None:
    from sqlmodel import Session, select

    from fleet.hub.models import ApiToken

    token = hub.devices["d1"]["Authorization"].split()[1]
    with Session(hub.hub.engine) as s:
        rows = s.exec(select(ApiToken)).all()
    assert rows and all(token not in (r.token_hash, r.name) for r in rows)


def test_wrong_fleet_secret_is_refused(hub: HubHarness) -> None:
    r = hub.client.post("/v1/enroll", json={"device_id": "cam-8", "fleet_secret": "nope"})
    assert r.status_code == 401 and "fleet secret" in r.json()["detail"]


@pytest.mark.parametrize("device_id", ["../etc", "a/b", "", "x" * 200, "dev ice", 7])
def test_enroll_refuses_unsafe_device_ids(hub: HubHarness, device_id: object) -> None:
    r = hub.client.post("/v1/enroll", json={"device_id": device_id, "fleet_secret": "dev-fleet-secret"})
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], str) and "device_id" in r.json()["detail"]


def test_missing_and_unknown_tokens_get_401(hub: HubHarness) -> None:
    assert hub.client.get("/v1/assignment").status_code == 401
    r = hub.client.get("/v1/assignment", headers={"Authorization": "Bearer fwt_nonsense"})
    assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]


def test_device_token_on_admin_route_gets_403(hub: HubHarness) -> None:
    r = hub.client.post("/v1/tokens", json={"scope": "admin", "name": "evil"}, headers=hub.devices["d1"])
    assert r.status_code == 403 and "device token" in r.json()["detail"]
    r = hub.client.post("/v1/selections", json={"budget": 1}, headers=hub.devices["d1"])
    assert r.status_code == 403


def test_labeler_cannot_upload_models_and_trainer_cannot_select(hub: HubHarness) -> None:
    r = hub.client.post("/v1/models", headers=hub.labeler, files={"onnx": ("m", b"x")}, data={"manifest": "{}"})
    assert r.status_code == 403
    assert hub.client.post("/v1/selections", json={"budget": 1}, headers=hub.trainer).status_code == 403


def test_revoked_token_gets_401(hub: HubHarness) -> None:
    headers = hub.token("trainer", "ci-trainer")
    assert hub.client.get("/v1/models", headers=headers).status_code == 200
    r = hub.client.delete("/v1/tokens/ci-trainer", headers=hub.admin)
    assert r.status_code == 200
    assert hub.client.get("/v1/models", headers=headers).status_code == 401


def test_duplicate_token_name_is_a_conflict(hub: HubHarness) -> None:
    hub.token("labeler", "bridge")
    r = hub.client.post("/v1/tokens", json={"scope": "labeler", "name": "bridge"}, headers=hub.admin)
    assert r.status_code == 409


def test_token_scope_device_cannot_be_minted_by_hand(hub: HubHarness) -> None:
    r = hub.client.post("/v1/tokens", json={"scope": "device", "name": "x"}, headers=hub.admin)
    assert r.status_code == 422


def test_revoked_device_loses_access_and_cannot_reenroll(hub: HubHarness) -> None:
    assert hub.client.get("/v1/assignment", headers=hub.devices["d1"]).status_code == 200
    r = hub.client.post("/v1/devices/d1/revoke", headers=hub.admin)
    assert r.status_code == 200 and r.json()["tokens_revoked"] == 1
    assert hub.client.get("/v1/assignment", headers=hub.devices["d1"]).status_code == 401
    r = hub.client.post("/v1/enroll", json={"device_id": "d1", "fleet_secret": "dev-fleet-secret"})
    assert r.status_code == 403


def test_revoking_an_unknown_device_is_404(hub: HubHarness) -> None:
    r = hub.client.post("/v1/devices/ghost/revoke", headers=hub.admin)
    assert r.status_code == 404 and "ghost" in r.json()["detail"]


def test_reenrolling_replaces_the_old_token(hub: HubHarness) -> None:
    old = hub.devices["d1"]
    new = hub.enroll("d1")
    assert hub.client.get("/v1/assignment", headers=new).status_code == 200
    assert hub.client.get("/v1/assignment", headers=old).status_code == 401


def test_device_reads_only_its_own_assignment(hub: HubHarness) -> None:
    hub.enroll("d2")
    r = hub.client.get("/v1/assignment", params={"device_id": "d2"}, headers=hub.devices["d1"])
    assert r.status_code == 200 and r.json()["device_id"] == "d1"  # the query is ignored for devices
    r = hub.client.get("/v1/assignment", params={"device_id": "d2"}, headers=hub.admin)
    assert r.json()["device_id"] == "d2"
    assert hub.client.get("/v1/assignment", params={"device_id": "zz"}, headers=hub.admin).status_code == 404


def test_device_cannot_write_another_devices_case_or_heartbeat(hub: HubHarness) -> None:
    hub.enroll("d2")
    case, image = hub.make_case("d2")
    r = hub.post_case(case, image, headers=hub.devices["d1"])
    assert r.status_code == 403 and "d1" in r.json()["detail"] and "d2" in r.json()["detail"]
    hb = {"device_id": "d2", "sent_at": 1.0, "boot_id": "b1", "model_version": "m1"}
    assert hub.client.post("/v1/heartbeats", json=hb, headers=hub.devices["d1"]).status_code == 403
