"""Boxes in Label Studio: the RectangleLabels config, the model's boxes as percent pre-annotations, annotations
back to a :class:`Detection` (round trip, clipping, refusals), a detect bridge through the in-memory Label
Studio to the real hub with a detector active, and bots that draw boxes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from xml.etree import ElementTree

import pytest

from fleet.errors import InvalidInput
from fleet.protocol import Box, Case, Classification, Detection, LabelPost, SelectedCase
from labeling.bots import Bot, BotSpec, BotTeam
from labeling.bridge import Bridge
from labeling.config import BridgeConfig
from labeling.configs import (
    classification_result,
    config_classes,
    detection_result,
    get_kind,
    image_detection_config,
    kind_for_task,
    parse_detection,
)
from labeling.ledger import Ledger
from labeling.push import push_gold, task_json
from labeling.records import TaskRecord
from labeling.status import collect
from labeling.throttle import Throttle
from tests.labeling.boxhub import CLASSES, DetectHub, detect_hub
from tests.labeling.conftest import FAST_RETRY
from tests.labeling.fakestudio import FakeStudio


def rect(x: float, y: float, w: float, h: float, name: str = "car", **value: object) -> dict[str, object]:
    return {"from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [name], **value}}


def selected(prediction: Detection | Classification, *, score: float = 0.25) -> SelectedCase:
    case = Case(case_id="c-1", device_id="dev-1", captured_at=1.0, model_version="det-1", prediction=prediction,
                image_sha256="0" * 64, image_size=10)
    return SelectedCase(case=case, image_url="http://hub.test/v1/cases/c-1/image?exp=1", class_names=list(CLASSES),
                        state="queued", score=score, uncertainty=1 - score, received_at=1.0, cluster=2)


# ---------------------------------------------------------------------------------------------
# config and conversion
# ---------------------------------------------------------------------------------------------


def test_the_detection_config_offers_the_classes_as_rectangle_labels() -> None:
    xml = image_detection_config(CLASSES, instructions="Box every object")
    root = ElementTree.fromstring(xml)
    [control] = list(root.iter("RectangleLabels"))
    assert control.attrib["name"] == "label" and control.attrib["toName"] == "image"
    assert control.attrib["canRotate"] == "false"  # the contract's boxes are axis-aligned
    assert [el.attrib["value"] for el in control.iter("Label")] == CLASSES
    assert [el.attrib["hotkey"] for el in control.iter("Label")] == ["1", "2", "3"]
    assert list(root.iter("Image"))[0].attrib["value"] == "$image"
    assert config_classes(xml) == CLASSES
    assert kind_for_task("detect") is get_kind("image-detection")
    assert get_kind("image-detection").control_type == "RectangleLabels"
    with pytest.raises(InvalidInput, match=r"valid tasks are \['classify', 'detect'\]"):
        kind_for_task("segment")


def test_boxes_become_label_studio_percent_rectangles_by_hand() -> None:
    d = Detection([Box(0.1, 0.2, 0.4, 0.6, 1, score=0.7), Box(0.5, 0.5, 1.0, 1.0, 2)])
    [first, second] = detection_result(d, CLASSES)
    assert first["type"] == "rectanglelabels" and first["score"] == 0.7
    value = dict(first["value"])
    assert value.pop("rectanglelabels") == ["person"]
    assert value == pytest.approx({"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0})
    assert second["value"]["rectanglelabels"] == ["bike"] and "score" not in second
    assert first["id"] != second["id"]


def test_rectangles_come_back_as_the_same_boxes() -> None:
    d = Detection([Box(0.1, 0.2, 0.4, 0.6, 1, score=0.7), Box(0.0, 0.55, 1.0, 1.0, 0), Box(0.3, 0.3, 0.35, 0.31, 2)])
    back = parse_detection(detection_result(d, CLASSES), CLASSES)
    assert [b.label for b in back.boxes] == [1, 0, 2]
    for got, want in zip(back.boxes, d.boxes, strict=True):
        assert (got.x1, got.y1, got.x2, got.y2) == pytest.approx((want.x1, want.y1, want.x2, want.y2), abs=1e-12)
        assert got.score is None  # a person's box has no score
    assert parse_detection([], CLASSES) == Detection([])  # nothing to find is an answer


def test_a_box_dragged_past_the_edge_is_clipped_to_the_image() -> None:
    [b] = parse_detection([rect(-5.0, 90.0, 20.0, 30.0)], CLASSES).boxes
    assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx((0.0, 0.9, 0.15, 1.0))


@pytest.mark.parametrize(("result", "message"), [
    ([rect(10, 10, 20, 20, "truck")], r"region 0: class 'truck' is not one of the model's classes"),
    ([rect(10, 10, 0, 20)], r"region 0: the box has no area inside the image \(x=10.0, y=10.0, width=0.0"),
    ([rect(120, 10, 20, 20)], r"no area inside the image"),
    ([rect(10, 10, 20, 20), rect(10, 10, 20, 20, rotation=30)], r"region 1: a rotated box \(30.0 degrees\)"),
    ([rect(10, 10, "wide", 20)], r"region 0: width must be a finite number; received 'wide'"),
    ([rect(10, 10, 20, float("nan"))], r"height must be a finite number; received nan"),
    ([{**rect(10, 10, 20, 20), "value": {"x": 1, "y": 1, "width": 2, "height": 2, "rectanglelabels": []}}],
     r"exactly one class name; received \[\]"),
    ([{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["car"]}}],
     r"region 0 is not a rectanglelabels region: .*choices"),
    ([{**rect(10, 10, 20, 20), "from_name": "other"}], r"from_name='other'"),
    ({"x": 1}, r"result must be a list of regions; received dict"),
])
def test_malformed_regions_are_refused_saying_what_was_received(result: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_detection(result, CLASSES)


def test_a_detect_task_carries_the_models_boxes_and_the_image_level_score() -> None:
    pred = Detection([Box(0.1, 0.2, 0.4, 0.6, 1, score=0.7), Box(0.5, 0.5, 0.9, 0.8, 1, score=0.4)])
    task = task_json(selected(pred, score=0.25), queue_version="flywheel", cluster=7)
    [p] = task["predictions"]
    assert (p["model_version"], p["score"]) == ("flywheel", 0.25)  # the queue's version and order
    assert [r["score"] for r in p["result"]] == [0.7, 0.4]  # each box's own score
    assert p["result"][0]["value"]["x"] == pytest.approx(10.0)
    assert task["data"]["predicted"] == "person x2" and task["data"]["cluster"] == 7
    empty = task_json(selected(Detection([])), queue_version="flywheel")
    assert empty["predictions"][0]["result"] == [] and empty["data"]["predicted"] == "no boxes"


def test_the_project_kind_follows_the_task() -> None:
    assert BridgeConfig(task="detect").label_kind.name == "image-detection"
    assert BridgeConfig().label_kind.name == "image-classification"
    assert "box" in (BridgeConfig(task="detect").label_instructions or "")
    assert BridgeConfig(task="detect", instructions=None).label_instructions is None
    with pytest.raises(InvalidInput, match="labels 'classify' cases; the project's task is 'detect'"):
        BridgeConfig(task="detect", kind="image-classification")


# ---------------------------------------------------------------------------------------------
# a detect bridge, end to end through the in-memory Label Studio
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def box_hub(tmp_path: Path) -> Iterator[DetectHub]:
    """The real hub, in-process, with a detector active and six detect cases."""
    with detect_hub(tmp_path, 6, seed=3) as hub:
        yield hub


def detect_bridge(hub: DetectHub, studio: FakeStudio) -> Bridge:
    config = BridgeConfig(project_title="boxes", task="detect", overlap=1, overlap_share=0.0,
                          throttle=Throttle(min_depth=6, max_depth=6), in_doubt_grace_s=0.0, reconcile_every_s=0.0)
    return Bridge(studio, hub.bridge_client(retry=FAST_RETRY, sleep=lambda _: None), Ledger(":memory:"), config)


def test_rectangle_annotations_reach_the_hub_once_as_boxes(box_hub: DetectHub) -> None:
    studio = FakeStudio()
    bridge = detect_bridge(box_hub, studio)
    assert bridge.sync_once().pushed == 6
    project = studio.get_project(bridge.project_id)
    assert "<RectangleLabels" in project.label_config and project.class_names == CLASSES
    tasks = sorted(studio.tasks.values(), key=lambda t: t["id"])
    pre = tasks[0]["predictions"][0]["result"]
    case_id = tasks[0]["data"]["case_id"]
    prediction, truth = box_hub.prediction(case_id), box_hub.boxes[case_id]
    assert len(pre) == len(prediction.boxes) and all(r["type"] == "rectanglelabels" for r in pre)

    drawn = detection_result(truth, CLASSES)
    ann = studio.annotate(tasks[0]["id"], 7, None, result=drawn)
    bad = studio.annotate(tasks[1]["id"], 8, None, result=[rect(10, 10, 0, 0)])
    bridge.sync_once()
    bridge.sync_once()  # a second pass finds nothing new
    created = [LabelPost.from_dict(p) for p, action in box_hub.label_posts() if action == "created"]
    assert [p.case_id for p in created] == [case_id]
    label = created[0].label
    assert isinstance(label, Detection) and label.as_label() == label
    for got, want in zip(label.boxes, truth.boxes, strict=True):
        assert (got.x1, got.y1, got.x2, got.y2, got.label) == pytest.approx((want.x1, want.y1, want.x2, want.y2,
                                                                             want.label))
    assert box_hub.state(case_id) == "labeled"
    [stored] = box_hub.labels(case_id)
    assert stored.label == label and stored.status == "accepted"
    refused = bridge.ledger.annotation(bad["id"])
    assert refused is not None and not refused.valid
    assert f"annotation {bad['id']} on task {tasks[1]['id']}" in (refused.refused or "")
    assert "no area inside the image" in (refused.refused or "")

    # the annotator moves a box: the hub's label is updated, never duplicated
    moved = [{**drawn[0], "value": {**drawn[0]["value"], "x": drawn[0]["value"]["x"] + 1.0}}] + drawn[1:]
    studio.change(ann["id"], result=moved)
    bridge.sync_once()
    actions = [action for p, action in box_hub.label_posts() if p["annotation_id"] == ann["id"]]
    assert actions == ["created", "updated"]
    [stored] = box_hub.labels(case_id)
    assert isinstance(stored.label, Detection)
    assert stored.label.boxes[0].x1 == pytest.approx(truth.boxes[0].x1 + 0.01)


def test_gold_box_tasks_carry_the_known_boxes_to_the_hub(box_hub: DetectHub) -> None:
    studio = FakeStudio()
    bridge = detect_bridge(box_hub, studio)
    cases = bridge.hub.iter_pool("unlabeled")[:2]
    truth = [box_hub.boxes[c.case_id] for c in cases]
    assert push_gold(bridge, list(zip(cases, truth, strict=True))) == 2
    first, second = (studio.task_of_case(c.case_id) for c in cases)
    studio.annotate(first["id"], 7, None, result=detection_result(truth[0], CLASSES))
    studio.annotate(second["id"], 7, None, result=[])  # missed every box
    bridge.sync_once()
    posts = {p["case_id"]: LabelPost.from_dict(p) for p, _ in box_hub.label_posts()}
    assert posts[cases[0].case_id].gold_label == truth[0].as_label()
    assert posts[cases[1].case_id].gold_label == truth[1].as_label()
    statuses = {lb.case_id: lb.status for lb in box_hub.labels()}
    assert statuses == {cases[0].case_id: "gold", cases[1].case_id: "held"}
    # the bridge's own status page scores the annotator the same way: box F1 1.0 and 0.0 on two gold tasks
    [who] = collect(bridge.ledger)["annotators"].values()
    assert (who["correct"], who["total"]) == (pytest.approx(1.0), 2)
    with pytest.raises(InvalidInput, match="box 0 has class 9"):
        push_gold(bridge, [(cases[0], Detection([Box(0.1, 0.1, 0.2, 0.2, 9)]))])


# ---------------------------------------------------------------------------------------------
# bots that draw boxes
# ---------------------------------------------------------------------------------------------


def bot(spec: BotSpec, truth: Detection, seed: int = 0) -> Bot:
    return Bot(spec, None, 1, lambda _: truth, CLASSES, seed=seed)  # type: ignore[arg-type]


def test_bots_draw_the_true_boxes_with_small_errors() -> None:
    truth = Detection([Box(0.1, 0.1, 0.3, 0.4, 0), Box(0.5, 0.5, 0.9, 0.8, 2), Box(0.6, 0.1, 0.7, 0.3, 1)])
    result, cancelled, malformed, label = bot(BotSpec("exact", 1.0, 0.0, box_jitter=0.0), truth).answer("c")
    assert not cancelled and not malformed and label == truth
    assert parse_detection(result, CLASSES) == truth
    answers = [bot(BotSpec("careless", 0.7, 0.0, box_jitter=0.05), truth, seed=s).answer("c")[3] for s in range(40)]
    assert all(isinstance(a, Detection) for a in answers)
    counts = [len(a.boxes) for a in answers if isinstance(a, Detection)]
    assert min(counts) < 3 and max(counts) == 3  # some boxes missed, not all
    moved = [a for a in answers if isinstance(a, Detection) and a.boxes and a.boxes[0] != truth.boxes[0]]
    assert moved  # jittered corners
    result, _, malformed, _ = bot(BotSpec("sloppy", 1.0, 0.0, malformed_rate=1.0), truth).answer("c")
    assert malformed
    with pytest.raises(InvalidInput, match="no area inside the image"):
        parse_detection(result, CLASSES)


class ServedQueue:
    """Label Studio's queue as a team meets it: each ``next_task`` serves the next of ``order`` to whichever bot
    asks; every answer is kept by case, in the order given."""

    def __init__(self, order: list[str]) -> None:
        self.order = list(order)
        self.answers: dict[str, list[object]] = {}
        self.by_task: dict[int, str] = {}

    def studio(self) -> object:
        queue = self

        class Served:
            def next_task(self, project_id: int) -> TaskRecord | None:
                if not queue.order:
                    return None
                case = queue.order.pop(0)
                tid = len(queue.by_task) + 1
                queue.by_task[tid] = case
                return TaskRecord(id=tid, project_id=project_id, data={"case_id": case}, overlap=1)

            def create_annotation(self, task_id: int, result: object, **_: object) -> SimpleNamespace:
                queue.answers.setdefault(queue.by_task[task_id], []).append(result)
                return SimpleNamespace(id=task_id)

            def close(self) -> None:
                pass

        return Served()


def team_answers(monkeypatch: pytest.MonkeyPatch, specs: list[BotSpec], frames: list[str],
                 truth: dict[str, object], seed: int, upload: str = "u1",
                 keyed: bool = True) -> dict[str, list[object]]:
    """What a team answers to tasks showing ``frames`` (served in that order), by frame. Each upload makes its
    own case ids (``upload`` names them), as devices do; the frame is the team's stable key for a case (with
    ``keyed``; else the team keys its draws by case id)."""
    queue = ServedQueue([f"{upload}-{f}" for f in frames])
    monkeypatch.setattr("labeling.bots.enroll", lambda url, admin, specs, **_: {s.name: "t" for s in specs})
    monkeypatch.setattr("labeling.bots.Studio", lambda url, token, **_: queue.studio())
    frame_of = lambda case: case.split("-", 1)[1]  # noqa: E731
    team = BotTeam("http://ls", None, 1, specs, lambda case: truth[frame_of(case)], CLASSES,  # type: ignore[arg-type]
                   seed=seed, draw_key=frame_of if keyed else None)
    team.run_until_idle()
    return {frame_of(case): answers for case, answers in queue.answers.items()}


def test_a_seeded_team_answers_each_task_alike_whichever_bot_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Label Studio serves each annotator a random one of its top tasks, so which bot takes which task changes
    from run to run, and every run's uploads have new case ids. A seeded team's answer to a frame does not change:
    here three bots in one order and two in another (so every task goes to another bot), over other case ids, give
    every frame the same boxes, misses and classes; a second answer to a task (overlap 2) draws apart from the
    first; another seed answers otherwise; keyed by case id alone, the answers follow the upload."""
    boxes = Detection([Box(0.1, 0.1, 0.3, 0.4, 0), Box(0.5, 0.5, 0.9, 0.8, 2), Box(0.6, 0.1, 0.7, 0.3, 1)])
    truth: dict[str, object] = {f"d{i}": boxes for i in range(12)} | {f"c{i}": i % len(CLASSES) for i in range(12)}
    frames = sorted(truth)
    sloppy = [BotSpec(f"b{i}", 0.6, 0.0, box_jitter=0.05) for i in range(3)]
    first = team_answers(monkeypatch, sloppy, frames, truth, seed=7)
    again = team_answers(monkeypatch, sloppy[:2], frames[::-1], truth, seed=7, upload="u2")
    assert again == first
    assert len({json.dumps(first[f]) for f in frames if f.startswith("d")}) > 1  # the draws differ by task
    assert any(a != [classification_result(CLASSES[truth[f]])] for f, a in first.items() if f.startswith("c"))
    twice = team_answers(monkeypatch, sloppy, [f for f in frames for _ in range(2)], truth, seed=7)
    assert all(twice[f][0] == first[f][0] for f in frames)  # the first answer is the one a lone annotator gives
    assert any(twice[f][1] != twice[f][0] for f in frames if f.startswith("d"))
    assert team_answers(monkeypatch, sloppy, frames, truth, seed=8) != first
    assert team_answers(monkeypatch, sloppy, frames, truth, seed=7, upload="u3", keyed=False) != first


def test_the_cli_reads_class_and_box_answers_from_jsonl(tmp_path: Path) -> None:
    import typer

    from labeling.cli import _read_jsonl

    path = tmp_path / "gold.jsonl"
    boxes = Detection([Box(0.1, 0.2, 0.3, 0.4, 2)])
    path.write_text(json.dumps({"case_id": "a", "label": 1}) + "\n"
                    + json.dumps({"case_id": "b", "label": boxes.to_dict()}) + "\n"
                    + json.dumps({"case_id": "c", "label": {"task": "classify", "label": 2}}) + "\n")
    assert [r["label"] for r in _read_jsonl(path)] == [1, boxes, 2]
    path.write_text(json.dumps({"case_id": "d", "label": {"task": "detect", "boxes": [{"x1": 0.5, "y1": 0.1,
                                                                                        "x2": 0.2, "y2": 0.3,
                                                                                        "label": 0}]}}) + "\n")
    with pytest.raises(typer.BadParameter, match=r"x1 < x2"):
        _read_jsonl(path)
    path.write_text(json.dumps({"case_id": "e", "label": "car"}) + "\n")
    with pytest.raises(typer.BadParameter, match="must be .* received"):
        _read_jsonl(path)
