"""Enrollment that cannot steal an identity: ids bound to their first enrollment, grants, allow-list, audit."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fleet.errors import ProtocolError
from fleet.protocol import DeviceList, EnrollmentAttemptList, EnrollmentAttemptPublic
from tests.hub.conftest import HubHarness

SECRET = "dev-fleet-secret"


def _enroll(hub: HubHarness, device_id: str, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return hub.client.post("/v1/enroll", json={"device_id": device_id, **body}, headers=headers or {})


def _works(hub: HubHarness, headers: dict[str, str]) -> bool:
    return hub.client.get("/v1/assignment", headers=headers).status_code == 200


def _bearer(r: Any) -> dict[str, str]:
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _audit(hub: HubHarness, **params: Any) -> list[EnrollmentAttemptPublic]:
    r = hub.client.get("/v1/enrollment-attempts", params=params, headers=hub.admin)
    assert r.status_code == 200, r.text
    return EnrollmentAttemptList.from_json(r.content).attempts


def test_the_fleet_secret_cannot_take_over_an_enrolled_device(hub: HubHarness) -> None:
    """Finding 1 of issue 13: the fleet secret re-issued cam-1's token and locked the real cam-1 out."""
    real = hub.devices["d1"]
    r = _enroll(hub, "d1", fleet_secret=SECRET)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "already enrolled" in detail and "enrollment-token" in detail and "--force" in detail
    assert _works(hub, real)  # the real device keeps its token
    hb = {"device_id": "d1", "sent_at": 1.0, "boot_id": "b1", "model_version": "m1"}
    assert hub.client.post("/v1/heartbeats", json=hb, headers=real).status_code == 204
    refused = _audit(hub, outcome="refused")
    assert refused[0].device_id == "d1" and refused[0].client == "testclient"
    assert "already enrolled" in refused[0].detail


def test_a_device_re_enrolls_with_its_own_token_and_only_its_own(hub: HubHarness) -> None:
    other = hub.enroll("d2")
    assert _enroll(hub, "d1", headers=other).status_code == 403  # d2's token cannot enroll d1
    assert _enroll(hub, "d1", headers={"Authorization": "Bearer fwt_forged"}).status_code == 401
    old = hub.devices["d1"]
    new = _bearer(_enroll(hub, "d1", headers=old))
    assert _works(hub, new) and not _works(hub, old)
    assert dataclasses.replace(_audit(hub, device_id="d1")[0], at=0, id=0) == EnrollmentAttemptPublic(
        id=0, at=0, client="testclient", device_id="d1", outcome="re-enrolled", method="device-token", detail="")


def test_an_admin_can_enroll_any_id_but_not_a_revoked_one(hub: HubHarness) -> None:
    new = _bearer(_enroll(hub, "d1", headers=hub.admin))
    assert _works(hub, new) and not _works(hub, hub.devices["d1"])
    assert hub.client.post("/v1/devices/d1/revoke", headers=hub.admin).status_code == 200
    r = _enroll(hub, "d1", headers=hub.admin)
    assert r.status_code == 403 and "revoked" in r.json()["detail"]
    assert _enroll(hub, "d1", headers=hub.labeler).status_code == 403


def test_an_enrollment_token_enrolls_its_device_once(hub: HubHarness) -> None:
    r = hub.client.post("/v1/devices/d1/enrollment-token", json={"ttl_s": 60}, headers=hub.admin)
    assert r.status_code == 201, r.text
    grant = r.json()["enrollment_token"]
    assert grant.startswith("fwe_") and r.json()["expires_at"] == hub.clock() + 60
    assert _enroll(hub, "d2", enrollment_token=grant).status_code == 401  # for d1 only
    new = _bearer(_enroll(hub, "d1", enrollment_token=grant))  # a device that lost its credentials
    assert _works(hub, new) and not _works(hub, hub.devices["d1"])
    r = _enroll(hub, "d1", enrollment_token=grant)
    assert r.status_code == 401 and "already used" in r.json()["detail"]
    late = hub.client.post("/v1/devices/d9/enrollment-token", json={"ttl_s": 60}, headers=hub.admin).json()
    hub.clock.advance(61)
    r = _enroll(hub, "d9", enrollment_token=late["enrollment_token"])
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert hub.client.post("/v1/devices/d9/enrollment-token", headers=new).status_code == 403


def test_an_allow_list_limits_what_the_fleet_secret_enrolls(hub_factory: Any) -> None:
    hub: HubHarness = hub_factory(enrollment_allow=["cam-*"])
    assert _enroll(hub, "cam-1", fleet_secret=SECRET).status_code == 200
    r = _enroll(hub, "dev-1", fleet_secret=SECRET)
    assert r.status_code == 403 and "allow-list" in r.json()["detail"] and "cam-*" in r.json()["detail"]
    grant = hub.client.post("/v1/devices/dev-1/enrollment-token", json={"group": "lab"},
                            headers=hub.admin).json()["enrollment_token"]
    assert _enroll(hub, "dev-1", enrollment_token=grant).status_code == 200
    assert hub.devices_listed()["dev-1"].group == "lab"  # the grant's group wins


def test_a_hub_can_require_per_device_enrollment_tokens(hub_factory: Any) -> None:
    hub: HubHarness = hub_factory(enrollment_require_token=True)
    r = _enroll(hub, "cam-1", fleet_secret=SECRET)
    assert r.status_code == 403 and "enrollment token" in r.json()["detail"]
    grant = hub.client.post("/v1/devices/cam-1/enrollment-token", headers=hub.admin).json()["enrollment_token"]
    assert _enroll(hub, "cam-1", enrollment_token=grant).status_code == 200


def test_failed_attempts_are_rate_limited_per_client_and_audited(hub_factory: Any) -> None:
    hub: HubHarness = hub_factory(enroll_max_failures=3, enroll_failure_window_s=60)
    for i in range(3):
        assert _enroll(hub, f"cam-{i}", fleet_secret="guess").status_code == 401
        hub.clock.advance(1)
    r = _enroll(hub, "cam-9", fleet_secret=SECRET)  # even the right secret waits now
    assert r.status_code == 429 and "3 failed enrollment attempts" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    hub.clock.advance(60)
    assert _enroll(hub, "cam-9", fleet_secret=SECRET).status_code == 200
    audit = _audit(hub)
    assert [a.outcome for a in audit] == ["enrolled", "refused", "refused", "refused"]
    assert all("fleet secret does not match" in a.detail for a in audit[1:])
    assert hub.client.get("/v1/enrollment-attempts", params={"outcome": "x"}, headers=hub.admin).status_code == 422
    assert hub.client.get("/v1/enrollment-attempts", headers=hub.devices.get("cam-9", {})).status_code == 401


def test_the_enrollment_audit_refuses_a_device_id_that_is_not_a_name(hub: HubHarness) -> None:
    """Found by the OpenAPI fuzzing on PostgreSQL: a NUL in ``device_id`` was a 500 (text cannot hold it there)."""
    assert _enroll(hub, "cam-7", fleet_secret=SECRET).status_code == 200
    for bad in ("a\x00b", "\u008f\x00^\U0005179e", "x" * 200):
        r = hub.client.get("/v1/enrollment-attempts", params={"device_id": bad}, headers=hub.admin)
        assert r.status_code == 422 and "device_id" in r.json()["detail"], (bad, r.text)
    assert [a.device_id for a in _audit(hub, device_id="cam-7", outcome="enrolled")] == ["cam-7"]


@pytest.mark.parametrize("body", [{}, {"fleet_secret": ""}, {"enrollment_token": ""}])
def test_enrolling_without_any_credential_is_401(hub: HubHarness, body: dict[str, str]) -> None:
    r = _enroll(hub, "cam-5", **body)
    assert r.status_code == 401 and "no credentials" in r.json()["detail"]


@pytest.mark.parametrize("field", ["fleet_secret", "enrollment_token"])
def test_credentials_that_are_not_text_a_hub_issued_are_refused_not_a_500(hub: HubHarness, field: str) -> None:
    lone = "\\ud800\\udfff\\ud800"  # JSON escapes Python decodes into lone surrogates
    body = ('{"device_id": "cam-6", "' + field + '": "' + lone + '"}').encode()
    r = hub.client.post("/v1/enroll", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (401, 422) and isinstance(r.json()["detail"], str), r.text


def test_the_devices_api_answers_a_page_at_a_time_with_the_total_and_searches(bare_hub: HubHarness) -> None:
    """GET /v1/devices answered every enrolled device in one message, however large the fleet: now a page of
    ``limit`` (1,000 unless asked) from ``offset``, with ``total`` so a client pages until it has them all, and
    ``q`` finds devices by id or group as the fleet page does."""
    h = bare_hub
    for i in range(25):
        h.enroll(f"cam-{i:02d}", group="North" if i % 5 == 0 else "south")

    def page(**params: Any) -> DeviceList:
        r = h.client.get("/v1/devices", params=params, headers=h.admin)
        assert r.status_code == 200, r.text
        return DeviceList.from_json(r.content)

    everything = page()
    assert everything.total == 25 and [d.device_id for d in everything.devices] == [f"cam-{i:02d}" for i in range(25)]
    seen, offset = [], 0
    while offset < 25:  # as a client pages
        got = page(limit=10, offset=offset)
        assert got.total == 25 and len(got.devices) == min(10, 25 - offset)
        seen += [d.device_id for d in got.devices]
        offset += len(got.devices)
    assert seen == [d.device_id for d in everything.devices]
    past = page(offset=25)
    assert past.total == 25 and past.devices == []
    north = page(q=" NORTH ", limit=3)  # by group, any case, surrounding spaces dropped
    assert north.total == 5 and [d.device_id for d in north.devices] == ["cam-00", "cam-05", "cam-10"]
    assert [d.device_id for d in page(q="m-2").devices] == [f"cam-2{i}" for i in range(5)]  # by id
    assert page(q="%").total == 0  # a character, not a wildcard

    for params, said in (({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"), ({"offset": -1}, "offset"),
                         ({"q": "x" * 65}, "the search may be at most 64 characters; received 65"),
                         ({"q": "cam\x00"}, r"the search may not hold a NUL character; received 'cam\\x00'")):
        r = h.client.get("/v1/devices", params=params, headers=h.admin)
        assert r.status_code in (400, 422) and said in r.text, (params, r.text)
    assert h.client.get("/v1/devices", headers=h.devices["cam-00"]).status_code == 403


def test_a_device_list_refuses_a_total_below_its_devices() -> None:
    with pytest.raises(ProtocolError, match="total must be >= 1; received 0"):
        DeviceList.from_json('{"devices": [{"device_id": "a", "group": "g", "enrolled_at": 1.0}], "total": 0}')
