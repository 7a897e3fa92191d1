"""The wire contract: round trips, and every malformed field refused with a message naming it."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from fleet.errors import ProtocolError
from fleet.protocol import (
    MAX_BOXES,
    OUTPUTS,
    SCHEMA_VERSION,
    Assignment,
    Box,
    CampaignRef,
    Case,
    ChallengerOutput,
    Classification,
    Detection,
    DetectorSpec,
    Heartbeat,
    InputSpec,
    LabelPost,
    ModelManifest,
    ModelRef,
    OtaReport,
    SelectedCase,
    SnapshotEntry,
    SnapshotHeader,
    TriggerHit,
    decode_embedding,
    decode_manifest,
    encode_embedding,
    encode_manifest,
    parse_prediction,
)

SHA = hashlib.sha256(b"png").hexdigest()


def make_case(**over: object) -> Case:
    base: dict[str, object] = dict(
        case_id="c-1", device_id="dev-1", captured_at=1700000000.0, model_version="v1",
        prediction=Classification(1, [0.2, 0.7, 0.1]), image_sha256=SHA, image_size=100, priority=0.5,
        scores={"entropy": 0.8}, triggers=[TriggerHit("entropy", 0.8, 0.5)], human_action=Classification(2),
        challenger=ChallengerOutput("v0", Classification(0, [0.6, 0.3, 0.1])),
        tags={"condition": "night"}, embedding=encode_embedding(np.arange(4, dtype=np.float32)),
    )
    base.update(over)
    return Case(**base)  # type: ignore[arg-type]


def test_case_round_trip_keeps_every_field() -> None:
    case = make_case()
    back = Case.from_json(case.to_json())
    assert back == case
    assert isinstance(back.triggers[0], TriggerHit) and isinstance(back.prediction, Classification)
    assert back.challenger is not None and back.challenger.prediction.label == 0 and back.task == "classify"
    np.testing.assert_array_equal(decode_embedding(back.embedding or ""), [0, 1, 2, 3])


def test_embedding_is_compact_float16() -> None:
    vec = np.linspace(-1, 1, 128).astype(np.float32)
    text = encode_embedding(vec)
    assert len(text) <= math.ceil(128 * 2 / 3) * 4  # base64 of 256 bytes
    np.testing.assert_allclose(decode_embedding(text), vec, atol=1e-3)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("case_id", "../etc/passwd", "case_id"),
        ("prediction", {"task": "classify", "label": 1, "probs": [0.5, 0.6]}, "summing to 1"),
        ("prediction", {"task": "classify", "label": 1, "probs": [float("nan"), 1.0]}, "finite"),
        ("prediction", {"task": "classify", "label": 7, "probs": [0.2, 0.7, 0.1]}, "out of range"),
        ("prediction", {"label": 1}, "prediction.task must be one of"),
        ("prediction", {"task": "segment", "label": 1}, "prediction.task must be one of"),
        ("prediction", 1, "prediction must be an object"),
        ("image_sha256", "abc", "sha256"),
        ("priority", 1.5, "priority"),
        ("scores", {"entropy": float("inf")}, "finite"),
        ("human_action", {"task": "classify", "label": "cat"}, "integer"),
        ("challenger", {"version": "../v", "prediction": {"task": "classify", "label": 0}}, "challenger.version"),
        ("tags", {"condition": 3}, "tags['condition']"),
    ],
)
def test_case_rejects_bad_fields_with_a_message(field: str, value: object, message: str) -> None:
    data = json.loads(make_case().to_json())
    data[field] = value
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Case.from_dict(data)


def test_unknown_field_and_wrong_schema_are_refused() -> None:
    data = json.loads(make_case().to_json())
    with pytest.raises(ProtocolError, match="unknown field"):
        Case.from_dict({**data, "surprise": 1})
    with pytest.raises(ProtocolError, match="schema 99 is not spoken here .*speaks schema 2"):
        Case.from_dict({**data, "schema": 99})
    with pytest.raises(ProtocolError, match="schema 1 is not spoken here"):  # a peer from before tasks
        Case.from_dict({**data, "schema": 1})
    with pytest.raises(ProtocolError, match="not valid JSON"):
        Case.from_json("{nope")
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        Case.from_json("[1, 2]")


def test_to_json_refuses_nan() -> None:
    case = make_case()
    case.priority = float("nan")
    with pytest.raises(ProtocolError, match="NaN"):
        case.to_json()


def test_manifest_round_trip_and_validation() -> None:
    m = ModelManifest(
        version="v2", parent_version="v1", onnx_sha256=SHA, onnx_size=10,
        input=InputSpec(height=28, width=28, channels=1, mean=[0.5], std=[0.25]),
        class_names=["a", "b"], embedding_dim=8,
    )
    back = ModelManifest.from_json(m.to_json())
    assert back == m and back.canonical_bytes() == m.canonical_bytes()
    bad = json.loads(m.to_json())
    bad["input"]["channels"] = 2
    with pytest.raises(ProtocolError, match="channels must be 1 or 3"):
        ModelManifest.from_dict(bad)
    bad = json.loads(m.to_json())
    bad["input"]["mean"] = [0.1, 0.2, 0.3]
    with pytest.raises(ProtocolError, match="must list 1 numbers"):
        ModelManifest.from_dict(bad)


def test_detector_manifest_names_its_layout_and_post_processing() -> None:
    base = dict(version="d1", onnx_sha256=SHA, onnx_size=10, class_names=["car", "person"], embedding_dim=8,
                input=InputSpec(height=128, width=128, channels=3, mean=[0.0] * 3, std=[1.0] * 3))
    m = ModelManifest(**base, task="detect", outputs=list(OUTPUTS["detect"]),  # type: ignore[arg-type]
                      detector=DetectorSpec(score_threshold=0.1, operating_threshold=0.4))
    back = ModelManifest.from_json(m.to_json())
    assert back == m and isinstance(back.detector, DetectorSpec) and back.outputs == ["boxes", "scores", "embedding"]
    for change, message in [
        ({"detector": None}, "a 'detect' model needs 'detector' post-processing settings"),
        ({"outputs": ["logits", "embedding"]}, r"a 'detect' model's outputs must be \['boxes', 'scores',"),
        ({"detector": {"nms_iou": 1.5}}, r"detector.nms_iou must be in \[0, 1\]; received 1.5"),
        ({"detector": {"max_detections": 10_000}}, "detector.max_detections"),
        ({"detector": {"score_threshold": 0.6}}, "operating_threshold .* must not be under"),
        ({"task": "segment"}, "task must be one of"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            ModelManifest.from_dict({**json.loads(m.to_json()), **change})
    with pytest.raises(ProtocolError, match="a 'classify' model takes no 'detector'"):
        ModelManifest.from_dict({**json.loads(m.to_json()), "task": "classify", "outputs": ["logits", "embedding"]})


def test_assignment_round_trip_and_malformed() -> None:
    a = Assignment(
        device_id="dev-1", active=ModelRef("v1", SHA), challenger=ModelRef("v2", SHA),
        campaigns=[CampaignRef("camp", 3, {"format": "flywheel.trigger/1"}, expires_at=2e9)],
        issued_at=1.0,
    )
    assert Assignment.from_json(a.to_json()) == a
    idle = Assignment(device_id="dev-1", active=None)  # no model yet: a required field that may be null
    assert Assignment.from_json(idle.to_json()) == idle
    with pytest.raises(ProtocolError, match="missing 1 required positional argument: 'active'"):
        Assignment.from_dict({"device_id": "dev-1"})
    bad = json.loads(a.to_json())
    bad["active"]["onnx_sha256"] = "zz"
    with pytest.raises(ProtocolError, match="onnx_sha256"):
        Assignment.from_dict(bad)
    bad = json.loads(a.to_json())
    bad["campaigns"] = "all"
    with pytest.raises(ProtocolError, match="campaigns must be a list"):
        Assignment.from_dict(bad)


def test_heartbeat_counters_are_checked() -> None:
    hb = Heartbeat(device_id="d", sent_at=1.0, boot_id="b1", model_version="v1",
                   counters={"frames_seen": 10, "flagged": 2}, human_compared=5, human_disagreed=1)
    assert Heartbeat.from_json(hb.to_json()) == hb
    with pytest.raises(ProtocolError, match="unknown counter 'bogus'"):
        Heartbeat.from_dict({**json.loads(hb.to_json()), "counters": {"bogus": 1}})
    with pytest.raises(ProtocolError, match="cannot exceed"):
        Heartbeat.from_dict({**json.loads(hb.to_json()), "human_disagreed": 9})


def test_ota_report_outcome_is_checked() -> None:
    r = OtaReport(device_id="d", version="v2", outcome="refused", reason="signature")
    assert OtaReport.from_json(r.to_json()) == r
    with pytest.raises(ProtocolError, match="outcome must be one of"):
        OtaReport.from_dict({**json.loads(r.to_json()), "outcome": "maybe"})


def test_predictions_labels_and_human_actions_share_one_shape_by_task() -> None:
    pred = parse_prediction({"task": "classify", "label": 2, "probs": [0.1, 0.2, 0.7]}, "p")
    assert pred == Classification(2, [0.1, 0.2, 0.7]) and pred.as_label() == Classification(2)
    with pytest.raises(ProtocolError, match="probs has 3 classes; the model has 5"):
        pred.check_classes(5, "p")
    with pytest.raises(ProtocolError, match="out of range for a model with 2 classes"):
        Classification(2).check_classes(2, "label")
    with pytest.raises(ProtocolError, match="human_action is a 'detect' payload; the case's prediction is 'classify'"):
        Case.from_dict({**json.loads(make_case().to_json()), "human_action": {"task": "detect", "boxes": []}})
    with pytest.raises(ProtocolError, match=r"p\.task must be one of \['classify', 'detect'\]; received 'segment'"):
        parse_prediction({"task": "segment"}, "p")


def test_detection_round_trips_and_refuses_bad_boxes() -> None:
    det = Detection([Box(0.1, 0.2, 0.5, 0.6, 1, score=0.9, probs=[0.05, 0.9, 0.05]), Box(0.0, 0.0, 1.0, 1.0, 0)])
    case = make_case(prediction=det, human_action=Detection([]), challenger=None)
    back = Case.from_json(case.to_json())
    assert back == case and back.task == "detect" and isinstance(back.prediction.boxes[0], Box)
    assert det.as_label() == Detection([Box(0.1, 0.2, 0.5, 0.6, 1), Box(0.0, 0.0, 1.0, 1.0, 0)])
    assert parse_prediction({"task": "detect", "boxes": []}, "p") == Detection([])  # nothing found is a prediction
    with pytest.raises(ProtocolError, match="box 0 has class 1, out of range for a model with 1 classes"):
        det.check_classes(1, "p")
    for bad, message in [
        ({"x1": 0.5, "y1": 0.2, "x2": 0.4, "y2": 0.6, "label": 0}, r"x1 < x2 .* received \(0.5, 0.2, 0.4, 0.6\)"),
        ({"x1": 0.1, "y1": 0.2, "x2": 1.4, "y2": 0.6, "label": 0}, "must lie inside the image"),
        ({"x1": 0.1, "y1": 0.2, "x2": 0.4, "y2": 0.6, "label": -1}, "box label"),
        ({"x1": 0.1, "y1": 0.2, "x2": 0.4, "y2": 0.6, "label": 0, "score": 1.5}, r"score must be in \[0, 1\]"),
        ({"x1": 0.1, "y1": 0.2, "x2": 0.4, "y2": 0.6, "label": 2, "probs": [0.5, 0.5]}, "out of range for 2"),
        ({"x1": "a", "y1": 0.2, "x2": 0.4, "y2": 0.6, "label": 0}, "box x1"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            parse_prediction({"task": "detect", "boxes": [bad]}, "p")
    with pytest.raises(ProtocolError, match=f"at most {MAX_BOXES}"):
        parse_prediction({"task": "detect", "boxes": [{"x1": 0, "y1": 0, "x2": 1, "y2": 1, "label": 0}] * 301}, "p")


def test_labeling_and_dataset_messages_round_trip() -> None:
    case = make_case()
    sel = SelectedCase(case=case, image_url="https://hub/x.png", class_names=["a", "b", "c"], state="queued",
                       score=0.3, uncertainty=0.7, received_at=1.0, cluster=2)
    back = SelectedCase.from_json(sel.to_json())
    assert back == sel and back.predicted_name == "b" and back.case_id == "c-1"
    with pytest.raises(ProtocolError, match="out of range for a model with 1 classes"):
        SelectedCase.from_dict({**json.loads(sel.to_json()), "class_names": ["a"]})
    post = LabelPost(case_id="c-1", label=Classification(1), annotator="a@x", task_id=3, annotation_id=4,
                     created_at=1.0, overlap=2, gold_label=Classification(1))
    assert LabelPost.from_json(post.to_json()) == post
    with pytest.raises(ProtocolError, match="unknown field"):  # nobody posts a status: the hub decides it
        LabelPost.from_dict({**json.loads(post.to_json()), "status": "accepted"})
    header = SnapshotHeader(snapshot_id="snap-1", version=1, task="classify", class_names=["a", "b", "c"],
                            n_entries=1, created_at=2.0)
    raw = encode_manifest(header, [SnapshotEntry(case=case, label=Classification(2), status="gold")])
    h, entries = decode_manifest(raw)
    assert h == header and entries[0].case == case and entries[0].label.label == 2
    bad = raw.replace(b'"label":2', b'"label":9')
    with pytest.raises(ProtocolError, match="line 2: case c-1: class 9 is out of range"):
        decode_manifest(bad)
    assert SCHEMA_VERSION == 2
