"""Predictions, labels and human actions, by task: one payload type per task, looked up by name.

A model's prediction and a person's answer share a shape (a label is a prediction without the model's
scores), so the same type serves the device's prediction, the human's action at the device, the
challenger's prediction and the label an annotator gives. A new task adds a payload type here and its
name to :data:`TASK_TYPES`, not a new seam.

- ``classify``: :class:`Classification`, a class index and (for a model) the class distribution;
- ``detect``: :class:`Detection`, a list of :class:`Box` (normalised x1 < x2, y1 < y2 in [0, 1], a class,
  and for a model its score and optionally the box's whole class distribution). A frame where the
  model finds nothing is an empty list, not a missing prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import Message, check_finite, check_int, check_one_of, check_probs

MAX_CLASSES = 100_000
MAX_BOXES = 300  # boxes in one prediction or label


@dataclass
class Classification(Message):
    """``task: classify``: a class index (``label``) and, for a model's output, its class distribution."""

    VERSIONED: ClassVar[bool] = False

    label: int
    probs: list[float] | None = None
    task: str = "classify"

    def validate(self) -> None:
        check_one_of(self.task, ("classify",), "task")
        check_int(self.label, "label", lo=0, hi=MAX_CLASSES - 1)
        if self.probs is not None:
            check_probs(self.probs, "probs")
            if self.label >= len(self.probs):
                raise ProtocolError(f"label {self.label} is out of range for {len(self.probs)} classes")

    def check_classes(self, n: int, what: str) -> None:
        """Refuse a payload that does not fit a model with ``n`` classes."""
        if self.label >= n:
            raise ProtocolError(f"{what}: class {self.label} is out of range for a model with {n} classes")
        if self.probs is not None and len(self.probs) != n:
            raise ProtocolError(f"{what}: probs has {len(self.probs)} classes; the model has {n}")

    def as_label(self) -> Classification:
        """The same answer without the model's scores."""
        return Classification(self.label)


class TaskMessage(Message):
    """A message with fields holding a prediction, label or human action (``TASK_FIELDS``), each parsed by the
    payload type its ``task`` names."""

    TASK_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _parse_extra(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {name: parse_prediction(data[name], name) for name in cls.TASK_FIELDS if data.get(name) is not None}


@dataclass
class Box(Message):
    """One object: normalised corners (``0 <= x1 < x2 <= 1``, ``0 <= y1 < y2 <= 1``) and its class; a model's
    box also has its ``score`` and may have its whole class distribution (``probs``)."""

    VERSIONED: ClassVar[bool] = False

    x1: float
    y1: float
    x2: float
    y2: float
    label: int
    score: float | None = None
    probs: list[float] | None = None

    def validate(self) -> None:
        x1, y1, x2, y2 = (check_finite(v, f"box {n}") for n, v in
                          (("x1", self.x1), ("y1", self.y1), ("x2", self.x2), ("y2", self.y2)))
        if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
            raise ProtocolError(f"a box must lie inside the image with x1 < x2 and y1 < y2 (normalised to [0, 1]); "
                                f"received ({x1}, {y1}, {x2}, {y2})")
        check_int(self.label, "box label", lo=0, hi=MAX_CLASSES - 1)
        if self.score is not None and not 0.0 <= check_finite(self.score, "box score") <= 1.0:
            raise ProtocolError(f"box score must be in [0, 1]; received {self.score}")
        if self.probs is not None:
            check_probs(self.probs, "box probs")
            if self.label >= len(self.probs):
                raise ProtocolError(f"box label {self.label} is out of range for {len(self.probs)} classes")


@dataclass
class Detection(Message):
    """``task: detect``: the objects in the frame (none is an empty list)."""

    VERSIONED: ClassVar[bool] = False
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"boxes": (Box, MAX_BOXES)}

    boxes: list[Box]
    task: str = "detect"

    def validate(self) -> None:
        check_one_of(self.task, ("detect",), "task")
        if not isinstance(self.boxes, list) or len(self.boxes) > MAX_BOXES:
            raise ProtocolError(f"boxes must be a list of at most {MAX_BOXES}; received {self.boxes!r:.80}")
        for b in self.boxes:
            b.validate()

    def check_classes(self, n: int, what: str) -> None:
        """Refuse a box whose class (or class distribution) does not fit a model with ``n`` classes."""
        for i, b in enumerate(self.boxes):
            if b.label >= n:
                raise ProtocolError(f"{what}: box {i} has class {b.label}, out of range for a model with {n} classes")
            if b.probs is not None and len(b.probs) != n:
                raise ProtocolError(f"{what}: box {i} has probs over {len(b.probs)} classes; the model has {n}")

    def as_label(self) -> Detection:
        """The same boxes without the model's scores."""
        return Detection([Box(b.x1, b.y1, b.x2, b.y2, b.label) for b in self.boxes])


Prediction = Classification | Detection  # the union of every task's payload type
TASK_TYPES: dict[str, type[Message]] = {"classify": Classification, "detect": Detection}
TASKS = tuple(TASK_TYPES)


def parse_prediction(value: Any, what: str) -> Prediction:
    """A prediction, label or human action: an object whose ``task`` names its payload type."""
    if isinstance(value, Message):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be an object with a 'task'; received {type(value).__name__}")
    task = value.get("task")
    kind = TASK_TYPES.get(task) if isinstance(task, str) else None
    if kind is None:
        raise ProtocolError(f"{what}.task must be one of {list(TASKS)}; received {task!r:.40}")
    try:
        return kind.from_dict(value)  # type: ignore[return-value]
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
