"""The agent's decide step on a detector's frames: the campaigns' box triggers (flicker on the same stream,
challenger and human box disagreement) keep frames, and their captures carry the boxes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.edge.campaigns import Campaign
from fleet.edge.ota import LoadedModels
from fleet.edge.shadow import decide, infer
from fleet.edge.sources import Frame, ReplaySource
from fleet.errors import InvalidInput
from fleet.protocol import Box, Case, Detection
from tests.edge.test_detector_runtime import BLUE, RED, H, W, detector, scenes
from tests.support.detectors import Square, draw_squares


def live(spec: dict[str, Any]) -> Campaign:
    from trigger import Evaluator

    return Campaign(spec["id"], spec["version"], Evaluator(spec))


def video(layouts: list[list[Square]], stream: str = "cam") -> list[Frame]:
    return [Frame(image=draw_squares(H, W, sq), frame_id=f"{stream}{i}", stream=stream, index=i,
                  stream_time=i / 10) for i, sq in enumerate(layouts)]


def test_flicker_keeps_the_frames_where_an_object_vanishes_or_appears_on_the_same_stream(tmp_path: Path) -> None:
    red, blue = (4, 8, 16, 20, RED), (22, 20, 30, 30, BLUE)  # no shared row or column
    frames = video([[red, blue], [red, blue], [red], [red, blue], [red, blue], [red, blue]])
    models = LoadedModels(detector(tmp_path), None)
    c = live({"id": "flicker", "version": 1, "rule": {"trigger": "box_flicker", "above": 0.2}})
    # two windows: the stream's last frame carries over from the first to the second
    first = decide([infer(frames[:2], models, now=1.0)], [c], device_id="dev", now=1.0)
    second = decide([infer(frames[2:], models, now=2.0)], [c], device_id="dev", now=2.0)
    assert first.captures == []
    kept = second.captures
    assert len(kept) == 2  # the blue square vanishes, then comes back
    assert [k.fields["triggers"][0].name for k in kept] == ["box_flicker"] * 2
    vanished, back = (k.fields["prediction"] for k in kept)
    assert isinstance(vanished, Detection) and [b.label for b in vanished.boxes] == [0]
    assert sorted(b.label for b in back.boxes) == [0, 2]
    assert all(b.probs is not None and len(b.probs) == 3 for b in back.boxes)
    case = Case(image_sha256="0" * 64, image_size=1, **kept[0].fields)
    case.validate()  # what the recorder spools is a valid detect Case
    assert Case.from_json(case.to_json()).prediction == vanished


def test_another_stream_is_not_compared_with_this_one(tmp_path: Path) -> None:
    red = (4, 8, 16, 20, RED)
    frames = [*video([[red]], "a"), *video([[]], "b"), *video([[red]], "a")]
    c = live({"id": "flicker", "version": 1, "rule": {"trigger": "box_flicker", "above": 0.2}})
    result = decide([infer(frames, LoadedModels(detector(tmp_path), None), now=1.0)], [c], device_id="dev")
    assert result.captures == []  # stream b's empty frame has no predecessor; a's frames agree


def test_challenger_and_human_box_disagreement_keep_frames_with_both_box_sets(tmp_path: Path) -> None:
    frames = scenes()  # red, red+blue, green, nothing, blue, blue+blue
    truth = [[(4, 8, 16, 20, 0)], [(4, 8, 16, 20, 0)], [(20, 2, 28, 10, 1)], [(8, 8, 16, 16, 2)], None, []]
    for f, t in zip(frames, truth, strict=True):  # frame 1: the human missed blue; 3: the model missed an object
        if t is not None:
            f.human_boxes = Detection([Box(x1 / W, y1 / H, x2 / W, y2 / H, c) for x1, y1, x2, y2, c in t])
    models = LoadedModels(detector(tmp_path, "d1"), detector(tmp_path, "d3", class_channels=(1, 0, 2)))
    human = live({"id": "human", "version": 1, "rule": {"trigger": "box_human_disagreement"}})
    challenger = live({"id": "ch", "version": 1, "rule": {"trigger": "box_challenger_disagreement"}})
    result = decide([infer(frames, models, now=1.0)], [human, challenger], device_id="dev", now=1.0)
    assert result.human_agrees is not None and result.human_agrees.tolist() == [1, 0, 1, 0, -1, 0]
    assert result.challenger_agrees is not None and result.challenger_agrees.tolist() == [0, 0, 0, 1, 1, 1]
    by_frame = {k.fields["case_id"]: k for k in result.captures}
    assert len(by_frame) == len(result.captures) == 5  # frames 0, 1, 2 (swapped classes), 3 and 5 (human)
    cases = [Case(image_sha256="0" * 64, image_size=1, **k.fields) for k in result.captures]
    for case in cases:
        case.validate()
    missed = next(c for c in cases if c.prediction == Detection([]))  # frame 3: the model found nothing
    assert missed.human_action is not None and len(missed.human_action.boxes) == 1
    assert [h.name for h in missed.triggers] == ["box_human_disagreement"]
    flipped = [c for c in cases if c.campaign_id == "ch"]
    assert flipped and all(c.challenger is not None and isinstance(c.challenger.prediction, Detection)
                           for c in flipped)
    assert {c.challenger.prediction.boxes[0].label for c in flipped if c.challenger} == {0, 1}


def test_a_classifier_campaign_on_a_detector_is_refused_with_the_reason(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    c = live({"id": "clf", "version": 1, "rule": {"trigger": "entropy", "above": 0.1}})
    result = decide([infer(scenes(), LoadedModels(detector(tmp_path), None))], [c], device_id="dev")
    assert result.captures == []
    assert "campaign clf-v1 cannot run on this device's frames" in caplog.text and "entropy" in caplog.text


def test_replay_reads_the_human_boxes_and_refuses_bad_ones(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "replay.jsonl"
    path.write_text(json.dumps({"image": "a.png", "human_boxes": [[0.1, 0.2, 0.5, 0.6, 1]]}) + "\n"
                    + json.dumps({"image": "a.png", "human_boxes": []}) + "\n" + json.dumps({"image": "a.png"}) + "\n")
    got = [f.human_boxes for f in ReplaySource(path)]
    assert got == [Detection([Box(0.1, 0.2, 0.5, 0.6, 1)]), Detection([]), None]
    for bad, says in (([[0.5, 0.2, 0.1, 0.6, 1]], "x1 < x2"), ([[0.1, 0.2]], "[x1, y1, x2, y2, class]"),
                      ([[0.1, 0.2, 0.5, 0.6, -1]], "label")):
        path.write_text(json.dumps({"image": "a.png", "human_boxes": bad}) + "\n")
        with pytest.raises(InvalidInput, match="replay.jsonl:1: 'human_boxes'") as err:
            list(ReplaySource(path))
        assert says in str(err.value)


def test_telemetry_counts_box_agreement_with_the_human_and_the_challenger() -> None:
    from fleet.edge.heartbeat import Telemetry

    t = Telemetry()
    t.record_batch(predicted=np.array([0, -1, 2, 1]), latency_ms=1.0, flagged=0, human=np.full(4, -1),
                   challenger_agrees=np.array([1, 0, -1, 1], np.int8), human_agrees=np.array([0, -1, 1, 0], np.int8))
    snap = t.snapshot()
    assert (snap["human_compared"], snap["human_disagreed"]) == (3, 2)  # -1: the human marked nothing there
    assert (snap["challenger_compared"], snap["challenger_agreed"]) == (3, 2)
