"""Prometheus metrics and the JSON summary per model version, with queue depths."""

from __future__ import annotations

import pytest

from tests.hub.conftest import HubHarness


def test_summary_per_version_and_queues(hub: HubHarness) -> None:
    ids = [hub.send_case("d1", probs=[0.6, 0.3, 0.1]) for _ in range(4)]  # predicted class 0
    hub.label(ids[0], 0)
    hub.label(ids[1], 2)
    hub.label(ids[2], 1, gold=2)  # a wrong answer to a gold task: held
    hb = {"device_id": "d1", "sent_at": 1.0, "boot_id": "b1", "model_version": "m1",
          "counters": {"frames_seen": 200, "flagged": 10}, "human_compared": 50, "human_disagreed": 5}
    assert hub.client.post("/v1/heartbeats", json=hb, headers=hub.devices["d1"]).status_code == 204
    s = hub.client.get("/v1/summary", headers=hub.trainer).json()
    m1 = s["models"]["m1"]
    assert m1["status"] == "active" and m1["cases"] == 4 and m1["labels"] == 2
    assert m1["accuracy"] == pytest.approx(0.5)
    assert m1["field_disagreement"] == pytest.approx(0.1) and m1["trigger_rate"] == pytest.approx(0.05)
    assert s["queues"]["unlabeled"] == 1 and s["queues"]["labeled"] == 2 and s["queues"]["held"] == 1
    assert s["active_model"] == "m1" and s["devices"] == 1


def test_metrics_are_prometheus_text(hub: HubHarness) -> None:
    hub.send_case("d1")
    r = hub.client.get("/metrics", headers=hub.admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'flywheel_cases{state="unlabeled"} 1' in text
    assert 'flywheel_model_info{version="m1",status="active"} 1' in text
    assert 'flywheel_http_requests_total{method="POST",route="/v1/cases",status="201"} 1' in text
    assert "flywheel_http_request_seconds_bucket" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
    assert hub.client.get("/metrics", headers=hub.devices["d1"]).status_code == 403


def test_healthz_needs_no_token(hub: HubHarness) -> None:
    r = hub.client.get("/healthz")
    assert r.status_code == 200 and r.json()["ok"] is True
