"""Labels are idempotent per annotation and drive the case's state; the webhook inbox stores once."""

from __future__ import annotations

import json

from tests.hub.conftest import HubHarness


def _state(hub: HubHarness, case_id: str) -> dict[str, object]:
    r = hub.client.get(f"/v1/cases/{case_id}", headers=hub.labeler)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_label_create_unchanged_update_delete(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    r = hub.label(cid, 2, annotation_id=501, agreement=0.8, n_annotators=3)
    assert r.status_code == 200 and r.json()["action"] == "created", r.text
    label_id = r.json()["label_id"]
    assert _state(hub, cid)["state"] == "labeled" and _state(hub, cid)["label"] == 2

    body = {"case_id": cid, "label": 2, "annotator": "ann@example.com", "source": "label-studio", "task_id": 9,
            "annotation_id": 502, "created_at": 5.0}
    assert hub.client.post("/v1/labels", json=body, headers=hub.labeler).json()["action"] == "created"
    again = hub.client.post("/v1/labels", json=body, headers=hub.labeler).json()
    assert again["action"] == "unchanged"
    changed = hub.client.post("/v1/labels", json={**body, "label": 1}, headers=hub.labeler).json()
    assert changed["action"] == "updated"
    # two accepted labels now disagree (2 and 1): the most recent wins the tie
    assert _state(hub, cid)["label"] == 1
    gone = hub.client.post("/v1/labels", json={**body, "deleted": True}, headers=hub.labeler).json()
    assert gone["action"] == "deleted"
    assert _state(hub, cid)["label"] == 2
    r = hub.client.post("/v1/labels", json={**body, "deleted": True}, headers=hub.labeler)
    assert r.json()["action"] == "unchanged"
    labels = hub.client.get("/v1/labels", params={"case_id": cid}, headers=hub.labeler).json()["labels"]
    assert [lb["id"] for lb in labels] == [label_id]


def test_gold_wins_and_held_holds(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    hub.label(cid, 1, status="held")
    assert _state(hub, cid)["state"] == "held" and _state(hub, cid)["label"] is None
    hub.label(cid, 0)
    hub.label(cid, 2, status="gold")
    st = _state(hub, cid)
    assert st["state"] == "labeled" and st["label"] == 2 and st["label_status"] == "gold"


def test_deleting_the_last_label_returns_a_queued_case_to_the_queue(hub: HubHarness) -> None:
    cid = hub.send_case("d1", probs=[0.34, 0.33, 0.33])
    sel = hub.client.post("/v1/selections", json={"budget": 1, "strategy": "uncertainty"}, headers=hub.labeler)
    assert [c["case_id"] for c in sel.json()["cases"]] == [cid]
    hub.label(cid, 0, annotation_id=77)
    assert _state(hub, cid)["state"] == "labeled"
    hub.label(cid, 0, annotation_id=77, deleted=True)
    assert _state(hub, cid)["state"] == "queued"


def test_bad_labels_are_refused(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    base = {"case_id": cid, "label": 1, "annotator": "a", "source": "label-studio", "task_id": 1,
            "annotation_id": 1, "created_at": 1.0}
    for change, status in [({"label": 9}, 422), ({"label": "1"}, 422), ({"label": -1}, 422),
                           ({"case_id": "nope"}, 404), ({"case_id": "../x"}, 422), ({"status": "maybe"}, 422),
                           ({"agreement": 1.5}, 422), ({"created_at": None}, 422)]:
        r = hub.client.post("/v1/labels", json={**base, **change}, headers=hub.labeler)
        assert r.status_code == status, (change, r.text)
        assert isinstance(r.json()["detail"], str)
    r = hub.client.post("/v1/labels", content=b'{"case_id": ', headers={**hub.labeler,
                                                                        "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = hub.client.post("/v1/labels", content=b'{"case_id": "x", "label": NaN}',
                        headers={**hub.labeler, "Content-Type": "application/json"})
    assert r.status_code in (400, 422)
    assert _state(hub, cid)["state"] == "unlabeled"


def test_annotation_cannot_move_to_another_case(hub: HubHarness) -> None:
    a, b = hub.send_case("d1"), hub.send_case("d1")
    assert hub.label(a, 1, annotation_id=9).status_code == 200
    r = hub.label(b, 1, annotation_id=9)
    assert r.status_code == 409


def test_webhook_inbox_is_idempotent_and_acknowledged(hub: HubHarness) -> None:
    body = json.dumps({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}).encode()
    secret = {"X-Flywheel-Webhook-Secret": "dev-webhook-secret", "Content-Type": "application/json"}
    assert hub.client.post("/v1/labeling/webhook", content=body, headers=secret).status_code == 204
    assert hub.client.post("/v1/labeling/webhook", content=body, headers=secret).status_code == 204
    body2 = json.dumps({"action": "ANNOTATION_UPDATED", "annotation": {"id": 1}}).encode()
    assert hub.client.post("/v1/labeling/webhook", content=body2, headers=secret).status_code == 204
    events = hub.client.get("/v1/labeling/events", headers=hub.labeler).json()["events"]
    assert [e["body"]["action"] for e in events] == ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
    r = hub.client.post("/v1/labeling/events/ack", json={"up_to": events[0]["id"]}, headers=hub.labeler)
    assert r.status_code == 204
    rest = hub.client.get("/v1/labeling/events", headers=hub.labeler).json()["events"]
    assert [e["id"] for e in rest] == [events[1]["id"]]
    all_ = hub.client.get("/v1/labeling/events", params={"after": 0}, headers=hub.labeler).json()["events"]
    assert len(all_) == 2


def test_webhook_needs_its_secret_and_json(hub: HubHarness) -> None:
    r = hub.client.post("/v1/labeling/webhook", content=b"{}", headers={"X-Flywheel-Webhook-Secret": "wrong"})
    assert r.status_code == 401
    r = hub.client.post("/v1/labeling/webhook", content=b"<xml/>",
                        headers={"X-Flywheel-Webhook-Secret": "dev-webhook-secret"})
    assert r.status_code == 400
    assert hub.client.get("/v1/labeling/events", params={"after": 0}, headers=hub.labeler).json()["events"] == []
