"""Predictions, labels and human actions, by task: one payload type per task, looked up by name.

A model's prediction and a person's answer share a shape (a label is a prediction without the model's
scores), so the same type serves the device's prediction, the human's action at the device, the
challenger's prediction and the label an annotator gives. ``classify`` is the first task; a new task
adds a payload type here and its name to :data:`TASKS`, not a new seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fleet.errors import ProtocolError
from fleet.protocol.base import Message, check_int, check_one_of, check_probs

MAX_CLASSES = 100_000


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


Prediction = Classification  # the union of every task's payload type
TASK_TYPES: dict[str, type[Message]] = {"classify": Classification}
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
