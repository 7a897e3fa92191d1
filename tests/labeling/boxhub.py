"""The real hub (fleet.hub, in-process and optionally on loopback) with a detector active and ``detect`` cases, for
the labeling bridge's box tests.

The detector is a real signed ONNX model (tests/support/detectors.py) registered and promoted through the API
with the tests' classes; each case is uploaded through ``POST /v1/cases`` as a device would, with the boxes the
model found (the true boxes, jittered, some missed) and a real PNG with a pale object at each true box on a
dark frame, so Label Studio's annotator view shows the model's boxes on something real. The true boxes are
kept in :attr:`DetectHub.boxes` for the simulated annotators.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.protocol import Box, Detection
from fleet.signing import load_private_key
from tests.labeling.realhub import DEVICE, LabelingHub, keypair
from tests.support.asgi import free_port
from tests.support.cases import make_detect_case
from tests.support.detectors import make_detector_files
from tests.support.inproc import inproc_hub

CLASSES = ["car", "person", "bike"]
FIRST_DETECTOR = "det-1"
# pale object colours on a dark frame, far from the label colours Label Studio strokes the regions with
COLOURS = [(245, 235, 160), (235, 235, 235), (250, 200, 150)]


@dataclass
class DetectHub(LabelingHub):
    """The real hub with a detector of :data:`CLASSES` active; :attr:`boxes`: case id -> its true boxes."""

    class_names: list[str] = field(default_factory=lambda: list(CLASSES))
    model_version: str = FIRST_DETECTOR
    boxes: dict[str, Detection] = field(default_factory=dict)

    def next_model(self, version: str) -> None:
        """A new detector version with the same classes, uploaded by the trainer and made active at once."""
        files = make_detector_files(self.data_dir.parent / "models", version, class_names=list(self.class_names),
                                    parent=self.model_version if self.models() else None,
                                    private_key=load_private_key(self.keypair.private_pem))
        self.publish(version, files=files)
        self.model_version = version

    def add_cases(self, n: int, *, seed: int = 0, model_version: str | None = None,
                  prefix: str = "d") -> list[str]:
        """Upload ``n`` frames from ``dev-1`` with one to three objects each; the model found them with jittered
        corners and missed some (its box scores, so the hub's uncertainty, vary). Case ids, in the order sent."""
        rng = np.random.default_rng(seed)
        ids = []
        for _ in range(n):
            truth = _scene(rng, len(self.class_names))
            found = [Box(*_jitter(rng, b), b.label, score=round(float(rng.uniform(0.3, 0.95)), 3))
                     for b in truth.boxes if rng.random() < 0.8]
            image = _png(truth, rng)
            case = make_detect_case(case_id=f"{prefix}-{uuid.uuid4().hex[:12]}", device_id=DEVICE,
                                    model_version=model_version or self.model_version, boxes=found, image=image,
                                    embedding=rng.normal(size=16).astype(np.float32))
            r = self.post_case(case, image)
            assert r.status_code == 201, r.text
            self.boxes[case.case_id] = truth
            ids.append(case.case_id)
        return ids

    def truth_of(self, case_id: str) -> Detection | None:
        """The true boxes of a case (what the simulated annotators draw)."""
        return self.boxes.get(case_id)

    def prediction(self, case_id: str) -> Detection:
        """The boxes the model found on a case, as the hub returns them."""
        prediction = self.selected(case_id).case.prediction
        assert isinstance(prediction, Detection), prediction
        return prediction


@contextmanager
def detect_hub(tmp: Path, n_cases: int = 0, *, seed: int = 0, serve: bool = False,
               **settings: Any) -> Iterator[DetectHub]:
    """The real hub with detector det-1 (car, person, bike) active, a labeler token and ``n_cases`` detect cases
    from ``dev-1``; with ``serve``, also on loopback at its ``public_url`` (Label Studio's webhooks, browsers)."""
    public_url = f"http://127.0.0.1:{free_port()}" if serve else None
    with inproc_hub(tmp, keypair(), kind=DetectHub, public_url=public_url, **settings) as hub:
        hub.enroll(DEVICE)
        hub.next_model(FIRST_DETECTOR)
        hub.token("labeler")
        hub.add_cases(n_cases, seed=seed)
        if not serve:
            yield hub
            return
        with hub.serve():
            yield hub


def _scene(rng: np.random.Generator, k: int) -> Detection:
    """One to three objects of random classes, well inside the frame and apart from each other."""
    boxes: list[Box] = []
    for _ in range(int(rng.integers(1, 4))):
        for _ in range(20):
            w, h = rng.uniform(0.18, 0.35, 2)
            x, y = rng.uniform(0.03, 0.97 - w), rng.uniform(0.03, 0.97 - h)
            cand = Box(round(float(x), 4), round(float(y), 4), round(float(x + w), 4), round(float(y + h), 4),
                       int(rng.integers(k)))
            if all(cand.x2 < b.x1 or b.x2 < cand.x1 or cand.y2 < b.y1 or b.y2 < cand.y1 for b in boxes):
                boxes.append(cand)
                break
    return Detection(boxes)


def _jitter(rng: np.random.Generator, b: Box) -> tuple[float, float, float, float]:
    w, h = b.x2 - b.x1, b.y2 - b.y1
    x1, y1, x2, y2 = np.clip(np.array([b.x1, b.y1, b.x2, b.y2]) + rng.normal(0, 0.04, 4) * [w, h, w, h], 0, 1)
    return float(x1), float(y1), float(max(x2, x1 + 0.01)), float(max(y2, y1 + 0.01))


def _png(truth: Detection, rng: np.random.Generator, size: int = 192) -> bytes:
    """A dark, speckled frame with a filled, outlined rectangle of its class's colour at each true box."""
    from PIL import Image, ImageDraw

    pixels = (rng.normal(70, 10, (size, size, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for b in truth.boxes:
        colour = COLOURS[b.label % len(COLOURS)]
        draw.rectangle([b.x1 * size, b.y1 * size, b.x2 * size - 1, b.y2 * size - 1], fill=colour,
                       outline=(20, 20, 20), width=2)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
