"""Cases for tests, in the wire contract's shape (fleet.protocol.Case): a classification with its class
distribution, and optionally the human's action and a challenger's prediction; or a detector's boxes."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from fleet.protocol import (
    Box,
    Case,
    ChallengerOutput,
    Classification,
    Detection,
    LabelPost,
    TriggerHit,
    encode_embedding,
)


def make_case(*, case_id: str, device_id: str, model_version: str, probs: list[float], image: bytes,
              captured_at: float | None = None, human: int | None = None, challenger: str | None = None,
              challenger_probs: list[float] | None = None, embedding: np.ndarray | None = None,
              triggers: list[TriggerHit] | None = None, tags: dict[str, str] | None = None, **extra: Any) -> Case:
    """A case whose model predicted ``argmax(probs)``; ``challenger``/``challenger_probs`` add a shadow model's
    prediction, ``human`` the person's action."""
    ch = None
    if challenger is not None:
        cp = challenger_probs or probs
        ch = ChallengerOutput(challenger, Classification(int(np.argmax(cp)), [float(p) for p in cp]))
    return Case(
        case_id=case_id, device_id=device_id, captured_at=time.time() if captured_at is None else captured_at,
        model_version=model_version, prediction=Classification(int(np.argmax(probs)), [float(p) for p in probs]),
        image_sha256=hashlib.sha256(image).hexdigest(), image_size=len(image),
        triggers=[TriggerHit("entropy", 0.9, 0.5)] if triggers is None else triggers,
        tags={"condition": "night"} if tags is None else tags,
        human_action=None if human is None else Classification(human), challenger=ch,
        embedding=None if embedding is None else encode_embedding(embedding), **extra,
    )


def make_detect_case(*, case_id: str, device_id: str, model_version: str, boxes: list[Box] | Detection,
                     image: bytes, captured_at: float | None = None, embedding: np.ndarray | None = None,
                     triggers: list[TriggerHit] | None = None, tags: dict[str, str] | None = None,
                     **extra: Any) -> Case:
    """A case whose detector found ``boxes`` on ``image`` (``extra``: human_action, challenger, ...)."""
    return Case(
        case_id=case_id, device_id=device_id, captured_at=time.time() if captured_at is None else captured_at,
        model_version=model_version, prediction=boxes if isinstance(boxes, Detection) else Detection(list(boxes)),
        image_sha256=hashlib.sha256(image).hexdigest(), image_size=len(image),
        triggers=[TriggerHit("box_flicker", 1.0, 0.2)] if triggers is None else triggers,
        tags={"condition": "day"} if tags is None else tags,
        embedding=None if embedding is None else encode_embedding(embedding), **extra,
    )


def label_post(case_id: str, label: int, *, annotation_id: int, annotator: str = "a@example.com",
               source: str = "label-studio", **extra: Any) -> dict[str, Any]:
    """One annotator's answer as the hub takes it (a fleet.protocol.LabelPost), as JSON."""
    return LabelPost(case_id=case_id, label=Classification(label), annotator=annotator, source=source,
                     task_id=annotation_id, annotation_id=annotation_id, created_at=time.time(), **extra).to_dict()
