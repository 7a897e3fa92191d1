"""Fleet-wide backpressure (fleet.hub.quota): the fleet's and a campaign's upload caps, shared by every worker,
429 with Retry-After, nothing stored for a refused case, retries free."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from fleet.hub.models import CaseRow
from fleet.protocol import BatchReceipt
from tests.hub.conftest import HubHarness
from tests.hub.test_campaigns import spec


def count(hub: HubHarness) -> int:
    with Session(hub.hub.engine) as s:
        return len(s.exec(select(CaseRow.case_id)).all())


def capped(hub_factory: Any, **settings: Any) -> HubHarness:
    hub: HubHarness = hub_factory(**settings)
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    return hub


def post_batch(hub: HubHarness, pairs: list[tuple[Any, bytes]]) -> BatchReceipt:
    files: list[tuple[str, Any]] = []
    for i, (case, image) in enumerate(pairs):
        files += [(f"case_{i}", (None, case.to_json().encode(), "application/json")),
                  (f"image_{i}", (f"image_{i}.png", image, "image/png"))]
    r = hub.client.post("/v1/cases/batch", files=files, headers=hub.devices["d1"])
    assert r.status_code == 200, r.text
    return BatchReceipt.from_json(r.content)


def test_the_fleet_cap_answers_429_with_retry_after_and_stores_nothing(hub_factory: Any) -> None:
    hub = capped(hub_factory, fleet_upload_rate_per_min=60.0, fleet_upload_burst=3.0)
    sent = [hub.make_case("d1") for _ in range(4)]
    for case, image in sent[:3]:
        assert hub.post_case(case, image).status_code == 201
    case, image = sent[3]
    r = hub.post_case(case, image)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert "fleet's upload cap" in r.json()["detail"] and "1 s" in r.json()["detail"]
    assert count(hub) == 3 and not hub.hub.blobs.exists(case.image_sha256)  # nothing half-written
    assert hub.post_case(*sent[0]).status_code == 200  # a retry of a stored case costs no token
    hub.clock.advance(1.0)
    assert hub.post_case(case, image).status_code == 201 and count(hub) == 4
    metrics = hub.client.get("/metrics", headers=hub.admin).text
    assert 'flywheel_upload_bucket_tokens{bucket="fleet"} 0' in metrics


def test_a_campaigns_fleet_budget_caps_its_devices_together_in_a_batch(hub_factory: Any) -> None:
    hub = capped(hub_factory)
    doc = spec("night", 1, budgets={"fleet": {"rate_per_min": 30, "burst": 2}})
    assert hub.client.post("/v1/campaigns", json=doc, headers=hub.admin).status_code == 201
    ours = [hub.make_case("d1", campaign_id="night", campaign_version=1) for _ in range(4)]
    other = hub.make_case("d1")  # no campaign: no campaign cap, no fleet cap set
    out = post_batch(hub, [ours[0], ours[1], other, ours[2], ours[3], ours[3]])
    assert [r.status for r in out.results] == ["created", "created", "created", "rejected", "rejected", "rejected"]
    for r in out.results[3:]:
        assert r.error_status == 429 and r.retry_after == 2.0 and "campaign 'night'" in (r.error or "")
    assert count(hub) == 3
    hub.clock.advance(2.0)  # 30/min: one token every 2 s
    again = post_batch(hub, ours[2:])
    assert [r.status for r in again.results] == ["created", "rejected"] and count(hub) == 4


def test_two_workers_draw_on_one_bucket(hub_factory: Any) -> None:
    """Two hubs on one database (two workers): the cap holds over both together."""
    first = capped(hub_factory, fleet_upload_rate_per_min=6.0, fleet_upload_burst=5.0)
    second = hub_factory(fleet_upload_rate_per_min=6.0, fleet_upload_burst=5.0)
    second.devices = first.devices
    second.clock = first.clock
    second.hub.clock = first.clock
    codes = []
    for i in range(8):
        worker = (first, second)[i % 2]
        case, image = first.make_case("d1")
        codes.append(worker.post_case(case, image, headers=first.devices["d1"]).status_code)
    assert codes.count(201) == 5 and codes.count(429) == 3 and count(first) == 5


def test_a_fleet_budget_in_a_spec_is_checked_like_any_budget(hub: HubHarness) -> None:
    doc = spec("bad", 1, budgets={"fleet": {"rate_per_min": 10, "burst": 0}})
    r = hub.client.post("/v1/campaigns", json=doc, headers=hub.admin)
    assert r.status_code == 422 and "budgets.fleet.burst" in r.text
