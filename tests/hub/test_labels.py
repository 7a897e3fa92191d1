"""Labels are idempotent per annotation and drive the case's state; the webhook inbox stores once."""

from __future__ import annotations

import json
from typing import Any

from fleet.protocol import LabelReceipt
from tests.hub.conftest import HubHarness


def _state(hub: HubHarness, case_id: str) -> dict[str, object]:
    r = hub.client.get(f"/v1/cases/{case_id}", headers=hub.labeler)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _post(hub: HubHarness, body: dict[str, object]) -> dict[str, object]:
    r = hub.client.post("/v1/labels", json=body, headers=hub.labeler)
    assert r.status_code == 200, r.text
    return LabelReceipt.from_json(r.content).to_dict()


def test_label_create_unchanged_update_delete(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    r = hub.label(cid, 2, annotation_id=501)
    assert r.status_code == 200 and r.json()["action"] == "created", r.text
    label_id = r.json()["label_id"]
    assert _state(hub, cid)["state"] == "labeled" and _state(hub, cid)["label"] == {"task": "classify", "label": 2,
                                                                                      "probs": None}
    body = {"case_id": cid, "label": {"task": "classify", "label": 2}, "annotator": "bob@example.com",
            "source": "label-studio", "task_id": 9, "annotation_id": 502, "created_at": 5.0}
    assert _post(hub, body)["action"] == "created"
    assert _post(hub, body)["action"] == "unchanged"
    changed = _post(hub, {**body, "label": {"task": "classify", "label": 1}})
    assert changed["action"] == "updated"
    # the two answers now disagree (2 and 1): a tie is held for review, the hub says so on both
    assert {v["status"] for v in changed["verdicts"]} == {"held"}  # type: ignore[union-attr]
    assert all(v["reason"] == "annotators are tied" for v in changed["verdicts"])  # type: ignore[union-attr]
    assert _state(hub, cid)["state"] == "held" and _state(hub, cid)["label"] is None
    gone = _post(hub, {**body, "deleted": True})
    assert gone["action"] == "deleted"
    assert _state(hub, cid)["state"] == "labeled" and _state(hub, cid)["label"]["label"] == 2  # type: ignore[index]
    assert _post(hub, {**body, "deleted": True})["action"] == "unchanged"
    labels = hub.client.get("/v1/labels", params={"case_id": cid}, headers=hub.labeler).json()["labels"]
    assert [(lb["id"], lb["status"]) for lb in labels] == [(label_id, "accepted")]


def test_the_hub_decides_gold_and_holds_wrong_gold_answers(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    wrong = hub.label(cid, 1, gold=2).json()
    assert [v["status"] for v in wrong["verdicts"]] == ["held"]
    assert _state(hub, cid)["state"] == "held" and _state(hub, cid)["label"] is None
    right = hub.label(cid, 2, gold=2, annotator="carol@example.com").json()
    assert sorted(v["status"] for v in right["verdicts"]) == ["gold", "held"]
    st = _state(hub, cid)
    assert st["state"] == "labeled" and st["label"]["label"] == 2 and st["label_status"] == "gold"  # type: ignore[index]


def test_a_reviewers_ground_truth_answer_makes_the_case_gold(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    hub.label(cid, 0, annotator="crowd@example.com")
    receipt = hub.label(cid, 1, ground_truth=True, annotator="reviewer@example.com").json()
    assert {v["reason"] for v in receipt["verdicts"]} == {"ground truth of a gold task", "differs from the gold answer"}
    assert _state(hub, cid)["label_status"] == "gold" and _state(hub, cid)["label"]["label"] == 1  # type: ignore[index]


def test_an_overlap_task_waits_for_its_annotators_then_takes_the_majority(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    first = hub.label(cid, 2, overlap=3, annotator="a@x").json()
    assert first["verdicts"][0]["reason"] == "waiting for 2 more annotator(s) of 3"
    assert _state(hub, cid)["state"] == "held"
    hub.label(cid, 2, overlap=3, annotator="b@x")
    last = hub.label(cid, 0, overlap=3, annotator="c@x").json()
    by = {v["annotation_id"]: (v["status"], v["agreement"]) for v in last["verdicts"]}
    assert sorted(by.values()) == [("accepted", 2 / 3), ("accepted", 2 / 3), ("held", 2 / 3)]
    assert _state(hub, cid)["label"]["label"] == 2  # type: ignore[index]


def test_an_annotator_whose_gold_record_falls_is_held_everywhere(hub_factory: Any) -> None:
    """Consensus in one place: when an annotator's gold record crosses the bar, the hub re-decides every case
    they labeled, not just the one being posted."""
    hub = hub_factory(consensus_min_gold_answers=2, consensus_min_annotator_accuracy=0.5)
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    plain = hub.send_case("d1")
    hub.label(plain, 1, annotator="sloppy@x")
    assert _state(hub, plain)["label_status"] == "accepted"
    for _ in range(3):  # wrong gold answers: after two, accuracy (0 + 1) / (2 + 2) = 0.25 < 0.5
        gold_case = hub.send_case("d1")
        hub.label(gold_case, 0, gold=1, annotator="sloppy@x")
    assert _state(hub, plain)["state"] == "held"
    labels = hub.client.get("/v1/labels", params={"case_id": plain}, headers=hub.labeler).json()["labels"]
    assert "gold accuracy 0.25 is below 0.50" in labels[0]["reason"]  # decided when the record crossed the bar


def test_deleting_the_last_label_returns_a_queued_case_to_the_queue(hub: HubHarness) -> None:
    cid = hub.send_case("d1", probs=[0.34, 0.33, 0.33])
    sel = hub.client.post("/v1/selections", json={"budget": 1, "strategy": "uncertainty"}, headers=hub.labeler)
    assert [c["case"]["case_id"] for c in sel.json()["cases"]] == [cid]
    hub.label(cid, 0, annotation_id=77)
    assert _state(hub, cid)["state"] == "labeled"
    hub.label(cid, 0, annotation_id=77, deleted=True)
    assert _state(hub, cid)["state"] == "queued"


def test_bad_labels_are_refused(hub: HubHarness) -> None:
    cid = hub.send_case("d1")
    base = {"case_id": cid, "label": {"task": "classify", "label": 1}, "annotator": "a", "source": "label-studio",
            "task_id": 1, "annotation_id": 1, "created_at": 1.0}
    for change, status in [({"label": {"task": "classify", "label": 9}}, 400), ({"label": 1}, 422),
                           ({"label": {"task": "classify", "label": -1}}, 422),
                           ({"label": {"task": "segment", "label": 1}}, 422), ({"case_id": "nope"}, 404),
                           ({"case_id": "../x"}, 422), ({"status": "accepted"}, 422), ({"overlap": 0}, 422),
                           ({"created_at": None}, 422), ({"schema": 1}, 422)]:
        r = hub.client.post("/v1/labels", json={**base, **change}, headers=hub.labeler)
        assert r.status_code == status, (change, r.text)
        assert isinstance(r.json()["detail"], str)
    r = hub.client.post("/v1/labels", content=b'{"case_id": ', headers={**hub.labeler,
                                                                        "Content-Type": "application/json"})
    assert r.status_code in (400, 422) and "not valid JSON" in r.json()["detail"]
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


def test_listing_labels_refuses_a_case_id_that_is_not_a_name(hub: HubHarness) -> None:
    """Found by the OpenAPI fuzzing on PostgreSQL: a NUL in ``case_id`` was a 500 (text cannot hold it there)."""
    for bad in ("a\x00b", "\u0091,\u00d9", "x" * 200):
        r = hub.client.get("/v1/labels", params={"case_id": bad}, headers=hub.trainer)
        assert r.status_code == 422 and "case_id must be" in r.text, (bad, r.text)
    r = hub.client.get("/v1/labels", params={"case_id": "c-1", "offset": 2**63 - 1, "limit": 986}, headers=hub.trainer)
    assert r.status_code == 200 and r.json()["labels"] == []
