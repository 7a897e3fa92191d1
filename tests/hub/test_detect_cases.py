"""A detector's cases at the hub: ingested and checked against the model that made them, ranked by their boxes'
uncertainty and disagreement, returned with their boxes, and shown as a PNG with the boxes drawn."""

from __future__ import annotations

import hashlib
import io
import uuid
from typing import Any

import numpy as np
import pytest
from sqlmodel import Session

from fleet.hub.models import CaseRow
from fleet.hub.preview import class_colour
from fleet.protocol import Box, Case, ChallengerOutput, Detection, SelectedCase, TriggerHit, encode_embedding
from fleet.signing import load_private_key
from tests.hub.conftest import HubHarness
from tests.support.detectors import draw_squares, make_detector_files

RED_BOX = Box(0.125, 0.25, 0.5, 0.625, 0, 0.9, [0.9, 0.05, 0.05])
BLUE_BOX = Box(0.6875, 0.625, 0.9375, 0.9375, 2, 0.55, [0.3, 0.15, 0.55])


def register_detector(hub: HubHarness, version: str = "det1") -> None:
    files = make_detector_files(hub.tmp / "models", version, private_key=load_private_key(hub.keypair.private_pem),
                                class_names=["red", "green", "blue"])
    r = hub.client.post("/v1/models", headers=hub.trainer,
                        files={"onnx": ("model.onnx", files.onnx_path.read_bytes(), "application/octet-stream")},
                        data={"manifest": files.signed.to_json()})
    assert r.status_code == 201, r.text


def frame_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(draw_squares(32, 32, [(4, 8, 16, 20, (255, 0, 0)), (22, 20, 30, 30, (0, 0, 255))])).save(
        out, format="PNG")
    return out.getvalue()


def detect_case(hub: HubHarness, boxes: list[Box], **kw: Any) -> tuple[Case, bytes]:
    image = frame_png()
    case = Case(case_id=f"c-{uuid.uuid4().hex[:12]}", device_id="d1", captured_at=hub.clock(), model_version="det1",
                prediction=Detection(boxes), image_sha256=hashlib.sha256(image).hexdigest(), image_size=len(image),
                triggers=[TriggerHit("box_flicker", 1.0, 0.2)], embedding=encode_embedding(np.ones(16, np.float32)),
                **kw)
    return case, image


@pytest.fixture
def det_hub(hub: HubHarness) -> HubHarness:
    register_detector(hub)
    return hub


def stored(hub: HubHarness, case_id: str) -> CaseRow:
    with Session(hub.hub.engine) as s:
        row = s.get(CaseRow, case_id)
    assert row is not None
    return row


def test_a_detect_case_is_stored_and_returned_with_its_boxes(det_hub: HubHarness) -> None:
    human = Detection([Box(RED_BOX.x1, RED_BOX.y1, RED_BOX.x2, RED_BOX.y2, 0)])
    case, image = detect_case(det_hub, [RED_BOX, BLUE_BOX], human_action=human,
                              challenger=ChallengerOutput("det1", Detection([RED_BOX])))
    r = det_hub.post_case(case, image)
    assert r.status_code == 201, r.text
    row = stored(det_hub, case.case_id)
    assert (row.task, row.predicted_class) == ("detect", None)
    assert 0.9 <= row.uncertainty <= 1.0  # the human marked one object where the model found two
    r = det_hub.client.get(f"/v1/cases/{case.case_id}", headers=det_hub.labeler)
    assert r.status_code == 200, r.text
    got = SelectedCase.from_json(r.content)
    assert got.case.prediction == Detection([RED_BOX, BLUE_BOX]) and got.case.human_action == human
    assert got.class_names == ["red", "green", "blue"]
    pool = det_hub.client.get("/v1/pool", headers=det_hub.labeler).json()
    assert [c["case"]["case_id"] for c in pool["cases"]] == [case.case_id]


def test_box_uncertainty_and_disagreement_rank_detect_cases(det_hub: HubHarness) -> None:
    sure = Box(0.1, 0.1, 0.4, 0.4, 0, 0.95, [0.98, 0.01, 0.01])
    unsure = Box(0.1, 0.1, 0.4, 0.4, 0, 0.6, [0.7, 0.2, 0.1])  # least confidence 0.3 / (2 / 3) = 0.45
    cases = {
        "sure": detect_case(det_hub, [sure]),
        "unsure": detect_case(det_hub, [sure, unsure]),
        "nothing": detect_case(det_hub, []),
        "challenger": detect_case(det_hub, [sure], challenger=ChallengerOutput("det1", Detection([]))),
    }
    for case, image in cases.values():
        assert det_hub.post_case(case, image).status_code == 201
    u = {name: stored(det_hub, case.case_id).uncertainty for name, (case, _) in cases.items()}
    assert u["nothing"] == 0.0 and u["sure"] < 0.05 < u["unsure"] < 0.5 <= u["challenger"]


@pytest.mark.parametrize(("boxes", "kw", "says"), [
    ([Box(0.1, 0.1, 0.4, 0.4, 3, 0.9)], {}, "box 0 has class 3, out of range for a model with 3 classes"),
    ([Box(0.1, 0.1, 0.4, 0.4, 0, 0.9, [0.5, 0.5])], {}, "probs over 2 classes; the model has 3"),
    ([RED_BOX], {"human_action": Detection([Box(0.1, 0.1, 0.4, 0.4, 7)])}, "human_action: box 0 has class 7"),
])
def test_a_detect_case_that_does_not_fit_its_model_is_refused(det_hub: HubHarness, boxes: list[Box],
                                                              kw: dict[str, Any], says: str) -> None:
    case, image = detect_case(det_hub, boxes, **kw)
    r = det_hub.post_case(case, image)
    assert r.status_code == 422 and says in r.text, r.text


def test_a_detect_prediction_from_a_classifier_is_refused(det_hub: HubHarness) -> None:
    case, image = detect_case(det_hub, [RED_BOX])
    case.model_version = "m1"
    r = det_hub.post_case(case, image)
    assert r.status_code == 422 and "a 'detect' prediction from model 'm1', a 'classify' model" in r.text


def test_the_preview_draws_the_models_boxes_on_the_frame(det_hub: HubHarness) -> None:
    from PIL import Image

    case, image = detect_case(det_hub, [RED_BOX, BLUE_BOX])
    assert det_hub.post_case(case, image).status_code == 201
    r = det_hub.client.get(f"/v1/cases/{case.case_id}/preview", headers=det_hub.labeler)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert shown.shape == (256, 256, 3)  # a 32x32 frame scaled 8x
    # the blue box's bottom edge, in class 2's colour, where the frame itself is black
    edge = shown[int(BLUE_BOX.y2 * 256) - 1, int((BLUE_BOX.x1 + BLUE_BOX.x2) / 2 * 256)]
    assert tuple(edge) == class_colour(2)
    inside = shown[int(0.8 * 256), int(0.8 * 256)]  # the square's pixels themselves are left as they were
    assert tuple(inside) == (0, 0, 255)
    assert det_hub.client.get("/v1/cases/nope/preview", headers=det_hub.labeler).status_code == 404
    assert det_hub.client.get(f"/v1/cases/{case.case_id}/preview").status_code == 401


def test_a_classifier_case_has_a_preview_too(hub: HubHarness) -> None:
    from PIL import Image

    case_id = hub.send_case("d1")
    r = hub.client.get(f"/v1/cases/{case_id}/preview", headers=hub.labeler)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (256, 256)


def box_label(det_hub: HubHarness, case_id: str, boxes: list[list[float]], **kw: Any) -> Any:
    """Post one annotator's boxes ``[x1, y1, x2, y2, class]`` on ``case_id``."""
    det_hub._seq += 1
    body = {"case_id": case_id, "annotator": "a@example.com", "source": "label-studio", "task_id": det_hub._seq,
            "annotation_id": det_hub._seq, "created_at": det_hub.clock(), **kw,
            "label": {"task": "detect", "boxes": [{"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "label": int(b[4])}
                                                  for b in boxes]}}
    return det_hub.client.post("/v1/labels", json=body, headers=det_hub.labeler)


def test_box_labels_agree_by_iou_reach_consensus_and_go_into_a_snapshot(det_hub: HubHarness) -> None:
    from fleet.protocol import decode_manifest

    case, image = detect_case(det_hub, [RED_BOX, BLUE_BOX])
    assert det_hub.post_case(case, image).status_code == 201
    red = [0.125, 0.25, 0.5, 0.625, 0]
    nudged = [0.14, 0.26, 0.5, 0.625, 0]  # IoU 0.93 with red: the same object
    first = box_label(det_hub, case.case_id, [red], overlap=3, annotator="a@x")
    assert first.status_code == 200, first.text
    box_label(det_hub, case.case_id, [nudged], overlap=3, annotator="b@x")
    last = box_label(det_hub, case.case_id, [red, [0.6, 0.6, 0.9, 0.9, 2]], overlap=3, annotator="c@x").json()
    # the consensus is the box all three drew (blue: one of three); agreement: the mean box F1 against it
    assert sorted((v["status"], round(v["agreement"], 3)) for v in last["verdicts"]) == [
        ("accepted", 0.889), ("accepted", 0.889), ("held", 0.889)]
    got = SelectedCase.from_json(det_hub.client.get(f"/v1/cases/{case.case_id}", headers=det_hub.labeler).content)
    assert got.label_status == "accepted" and isinstance(got.label, Detection) and len(got.label.boxes) == 1
    assert got.label.boxes[0].x1 == pytest.approx((0.125 + 0.14) / 2)  # the mean of the two accepted drawings
    snap = det_hub.client.post("/v1/snapshots", headers=det_hub.trainer)
    assert snap.status_code == 201, snap.text
    m = det_hub.client.get(f"/v1/snapshots/{snap.json()['snapshot_id']}/manifest", headers=det_hub.trainer)
    header, entries = decode_manifest(m.content)
    assert (header.task, header.class_names) == ("detect", ["red", "green", "blue"])
    assert [e.case.case_id for e in entries] == [case.case_id] and entries[0].label == got.label


def test_a_gold_box_answer_scores_the_crowd_and_bad_boxes_are_refused(det_hub: HubHarness) -> None:
    case, image = detect_case(det_hub, [RED_BOX])
    assert det_hub.post_case(case, image).status_code == 201
    box_label(det_hub, case.case_id, [], annotator="crowd@x")  # saw nothing: wrong
    receipt = box_label(det_hub, case.case_id, [[0.125, 0.25, 0.5, 0.625, 0]], ground_truth=True,
                        annotator="reviewer@x").json()
    assert {v["reason"] for v in receipt["verdicts"]} == {"ground truth of a gold task",
                                                          "box F1 0.00 against the gold boxes is below 0.80"}
    r = box_label(det_hub, case.case_id, [[0.1, 0.1, 0.4, 0.4, 5]], annotator="x@x")
    assert r.status_code == 400 and "box 0 has class 5" in r.text and "['red', 'green', 'blue']" in r.text, r.text
    r = det_hub.label(case.case_id, 0)  # a class for a box case
    assert r.status_code == 400 and "a 'classify' label for a 'detect' case" in r.text
