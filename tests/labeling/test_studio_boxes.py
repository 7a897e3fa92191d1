"""Boxes against the real Label Studio: detect cases from two successive model versions pushed as pre-annotated
RectangleLabels tasks, simulated annotators drawing boxes in the real queue, and every case back exactly once
as boxes (webhooks plus reconciliation); and Label Studio's own annotator view showing the model's boxes.

The hub is the real one with a detector active (tests/labeling/boxhub.py), in-process for the bridge and served
on loopback, so Label Studio posts real webhooks to it and the annotator's browser loads its signed PNGs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fleet.protocol import Box, Detection
from labeling.bots import BotSpec, BotTeam
from labeling.bridge import Bridge
from labeling.config import QUEUE_VERSION, BridgeConfig
from labeling.ledger import Ledger
from labeling.push import queue_scores
from labeling.studio import Studio
from labeling.throttle import Throttle
from tests.labeling.boxhub import CLASSES, DetectHub, detect_hub
from tests.labeling.test_annotator_view import annotator_page, wait_for_labeling_image

pytestmark = pytest.mark.integration

SHOT_COPY = Path("/tmp/ls-boxes.png")


@dataclass
class BoxStack:
    url: str
    hub: DetectHub
    studio: Studio
    bridge: Bridge


@pytest.fixture
def boxes(ls_env: tuple[str, str], ls_project_title: str, tmp_path: Path) -> Iterator[BoxStack]:
    with detect_hub(tmp_path, 6, seed=11, serve=True) as hub:
        studio = Studio(*ls_env)
        client = hub.bridge_client()
        config = BridgeConfig(project_title=ls_project_title, task="detect", overlap=1, overlap_share=0.0,
                              strategy="uncertainty", throttle=Throttle(min_depth=6, max_depth=6, max_batch=6),
                              reconcile_every_s=0.0, webhook_url=f"{hub.public_url}/v1/labeling/webhook",
                              webhook_secret=hub.webhook_secret)
        bridge = Bridge(studio, client, Ledger(tmp_path / "ledger.sqlite"), config)
        yield BoxStack(ls_env[0], hub, studio, bridge)
        client.close()
        studio.close()


def test_two_model_versions_of_boxes_come_back_exactly_once(boxes: BoxStack) -> None:
    hub, bridge, studio = boxes.hub, boxes.bridge, boxes.studio
    assert bridge.sync_once().pushed == 6
    project = studio.get_project(bridge.project_id)
    assert "<RectangleLabels" in project.label_config and project.class_names == CLASSES
    assert project.model_version == QUEUE_VERSION
    first = {t.case_id: t for t in studio.iter_tasks(bridge.project_id)}
    ledger = {row.case_id: row.cluster for row in bridge.ledger.tasks()}
    scores = queue_scores([hub.selected(cid or "") for cid in first], {c: int(k or 0) for c, k in ledger.items()})
    for cid, t in first.items():
        [p] = t.predictions
        assert (p.model_version, p.score) == (QUEUE_VERSION, scores[cid or ""])

    team = BotTeam(boxes.url, studio, bridge.project_id, [BotSpec("boxer", 0.85, 0.0, box_jitter=0.03)],
                   hub.truth_of, CLASSES, seed=5)
    try:
        team.run_until_idle()
        served = team.stats["boxer"].served
        assert sorted(served) == sorted(first)  # every task of the first model, once
        assert scores[served[0]] == min(scores.values())  # most informative first

        hub.next_model("det-2")  # the retrained detector's cases reach the same queue
        second = hub.add_cases(6, seed=12)
        report = bridge.sync_once()
        assert report.pushed == 6 and not report.errors, report
        assert studio.get_project(bridge.project_id).model_version == QUEUE_VERSION
        team.run_until_idle()
        assert sorted(team.stats["boxer"].served[6:]) == sorted(second)
    finally:
        team.close()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        bridge.sync_once()
        if len(hub.labels()) >= 12:
            break
        time.sleep(0.5)
    bridge.sync_once()  # once more: nothing new may be posted
    assert hub.events(), "Label Studio posted no webhook to the hub"
    created = [p["case_id"] for p, action in hub.label_posts() if action == "created"]
    assert sorted(created) == sorted(hub.states()) == sorted([*first, *second])  # every case, exactly once
    assert set(hub.actions()) <= {"created", "unchanged"}, hub.label_posts()
    answers = team.stats["boxer"].answers
    versions = {t.case_id: t.data["model_version"] for t in studio.iter_tasks(bridge.project_id)}
    assert sorted(versions.values()) == ["det-1"] * 6 + ["det-2"] * 6
    for label in hub.labels():
        assert isinstance(label.label, Detection)
        drawn = answers[label.case_id]
        got = np.array([[b.x1, b.y1, b.x2, b.y2, b.label] for b in label.label.boxes]).reshape(-1, 5)
        want = np.array([[b.x1, b.y1, b.x2, b.y2, b.label] for b in drawn.boxes]).reshape(-1, 5)
        np.testing.assert_allclose(got, want, atol=1e-9)  # the boxes the annotator drew, through percent
        assert label.status == "accepted"


def test_an_annotator_sees_the_models_boxes_on_the_image(boxes: BoxStack, tmp_path: Path) -> None:
    hub, bridge = boxes.hub, boxes.bridge
    bridge.sync_once()
    found = {t.case_id: hub.prediction(t.case_id) for t in bridge.ledger.tasks("open")}
    rows = sorted(bridge.ledger.tasks("open"), key=lambda t: (-len(found[t.case_id].boxes), t.score or 0.0))
    task = rows[0]
    prediction = found[task.case_id]
    assert len(prediction.boxes) >= 2
    shot = tmp_path / "annotator_view_boxes.png"
    with annotator_page(boxes.url, boxes.studio) as page:
        page.goto(f"{boxes.url}/projects/{bridge.project_id}/data?task={task.task_id}")
        try:
            wait_for_labeling_image(page)
            for name in CLASSES:  # the RectangleLabels' classes are offered
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # the canvas draws the pre-annotated regions after the image
        except Exception:
            page.screenshot(path=str(shot.with_name("failed-" + shot.name)))
            raise
        page.screenshot(path=str(shot))
        image_box = page.evaluate(
            "() => { const i = [...document.querySelectorAll('img')].find(i => i.width >= 300);"
            " const r = i.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }")
    shutil.copy(shot, SHOT_COPY)
    assert _outlined(shot, image_box, prediction), "the model's boxes are not drawn on the image"
    other = Detection([Box(b.x1, b.y1, b.x2, b.y2, (b.label + 1) % len(CLASSES)) for b in prediction.boxes])
    assert not _outlined(shot, image_box, other)  # the check sees the class's colour, not any edge


def _outlined(shot: Path, image_box: list[float], prediction: Detection) -> bool:
    """Along each predicted box's left edge, in the screenshot, most rows have a pixel in its class's region
    colour (Label Studio strokes a region with its label's ``background``), which the image itself never has
    (pale objects on a dark frame)."""
    from PIL import Image

    from labeling.configs import _BOX_COLOURS

    pixels = np.asarray(Image.open(shot).convert("RGB"), np.int64)
    x0, y0, w, h = image_box
    for b in prediction.boxes:
        want = np.array([int(_BOX_COLOURS[b.label][i:i + 2], 16) for i in (1, 3, 5)])
        col = int(round(x0 + b.x1 * w))
        top, bottom = int(y0 + b.y1 * h), int(y0 + b.y2 * h)
        strip = pixels[top + 2:bottom - 2, max(col - 3, 0):col + 4]
        close = (np.abs(strip - want).max(axis=-1) <= 60).any(axis=1)  # the stroke is anti-aliased
        if close.mean() < 0.6:
            return False
    return True
