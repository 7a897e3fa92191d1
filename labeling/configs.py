"""Label Studio labeling configs built from a model's class names, and what an annotation's result means.

Kinds are registered by name, one per task of the contract (``image-classification`` for ``classify``,
``image-detection`` for ``detect``). A kind knows three things: the XML Label Studio renders, the
pre-annotation for a model's prediction, and how to read an annotator's ``result`` back, refusing anything
malformed with a reason.

Boxes travel in Label Studio's own units: a rectangle's ``x``, ``y``, ``width`` and ``height`` are percents of
the image's width and height (top-left corner and size), so a normalised ``x1, y1, x2, y2`` box is
``x = 100 * x1``, ``width = 100 * (x2 - x1)`` and so on, whatever the image's pixel size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from fleet.errors import InvalidInput, ProtocolError
from fleet.protocol import Box, Classification, Detection, Prediction

FROM_NAME = "label"
TO_NAME = "image"
IMAGE_FIELD = "image"
_CLASS_RE = re.compile(r"^[^\x00-\x1f]{1,128}$")


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Validate a model's class names: 1..1000 distinct, printable, at most 128 characters each."""
    names = list(class_names) if not isinstance(class_names, str) else [class_names]
    if not names or len(names) > 1000:
        raise InvalidInput(f"class_names must hold 1 to 1000 names; received {len(names)}")
    for name in names:
        if not isinstance(name, str) or not _CLASS_RE.match(name) or name != name.strip():
            raise InvalidInput(f"each class name must be 1-128 printable characters without surrounding spaces; "
                               f"received {name!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidInput(f"class names must be distinct; received duplicates {dupes}")
    return names


# ---------------------------------------------------------------------------------------------
# image classification
# ---------------------------------------------------------------------------------------------


def image_classification_config(class_names: Sequence[str], *, instructions: str | None = None) -> str:
    """One image, one single-choice answer among the class names (hotkeys 1-9 for the first nine)."""
    names = check_class_names(class_names)
    choices = "\n".join(
        f"    <Choice value={quoteattr(n)}" + (f' hotkey="{i + 1}"' if i < 9 else "") + "/>"
        for i, n in enumerate(names)
    )
    return _view("Choices", 'choice="single-radio" showInline="true" required="true"', choices, instructions)


def classification_result(class_name: str) -> list[dict[str, Any]]:
    """The ``result`` of an annotation or pre-annotation that picks ``class_name``."""
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [class_name]}}]


def parse_classification(result: Any, class_names: Sequence[str]) -> int:
    """The class index an annotator picked, or :class:`InvalidInput` saying what is wrong with ``result``.

    Exactly one ``choices`` region from the ``label`` control with exactly one known class is accepted;
    anything else (no answer, two answers, an unknown class, a region for another control) is refused.
    """
    if not isinstance(result, list):
        raise InvalidInput(f"result must be a list of regions; received {type(result).__name__} {_short(result)}")
    regions = [r for r in result if isinstance(r, dict) and r.get("type") == "choices"]
    others = [r for r in result if r not in regions]
    if others:
        raise InvalidInput(f"result holds regions that are not choices: {_short(others)}")
    if len(regions) != 1:
        raise InvalidInput(f"result must hold exactly one choices region; received {len(regions)}: {_short(result)}")
    region = regions[0]
    if region.get("from_name") != FROM_NAME or region.get("to_name") != TO_NAME:
        raise InvalidInput(f"choices region must come from {FROM_NAME!r} to {TO_NAME!r}; received from_name="
                           f"{region.get('from_name')!r} to_name={region.get('to_name')!r}")
    value = region.get("value")
    chosen = value.get("choices") if isinstance(value, dict) else None
    if not isinstance(chosen, list) or len(chosen) != 1 or not isinstance(chosen[0], str):
        raise InvalidInput(f"value.choices must be a list of exactly one class name; received {_short(value)}")
    try:
        return list(class_names).index(chosen[0])
    except ValueError:
        raise InvalidInput(f"class {chosen[0]!r} is not one of the model's classes {list(class_names)}") from None


def classification_prediction(prediction: Prediction, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The pre-annotation of a model's class prediction."""
    if not isinstance(prediction, Classification):
        raise InvalidInput(f"an image-classification task needs a classify prediction; received a "
                           f"{prediction.task!r} one")
    return classification_result(list(class_names)[prediction.label])


def parse_classification_label(result: Any, class_names: Sequence[str]) -> Classification:
    """:func:`parse_classification` as the hub's label type."""
    return Classification(parse_classification(result, class_names))


# ---------------------------------------------------------------------------------------------
# image detection (boxes)
# ---------------------------------------------------------------------------------------------

BOX_TYPE = "rectanglelabels"
# distinct, readable colours for the first classes (Label Studio picks its own for the rest)
_BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                "#469990", "#9a6324")


def image_detection_config(class_names: Sequence[str], *, instructions: str | None = None) -> str:
    """One image, any number of boxes, each with one of the class names (hotkeys 1-9 for the first nine).

    Rotation is off: the contract's boxes are axis-aligned (x1, y1, x2, y2).
    """
    names = check_class_names(class_names)
    labels = "\n".join(
        f"    <Label value={quoteattr(n)}" + (f' hotkey="{i + 1}"' if i < 9 else "")
        + (f' background="{_BOX_COLOURS[i]}"' if i < len(_BOX_COLOURS) else "") + "/>"
        for i, n in enumerate(names)
    )
    return _view("RectangleLabels", 'canRotate="false" showInline="true"', labels, instructions)


def detection_result(detection: Detection, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The ``result`` of a (pre-)annotation holding ``detection``'s boxes, in Label Studio's percent
    coordinates, each with its score when the box has one."""
    names = list(class_names)
    out = []
    for i, b in enumerate(detection.boxes):
        if not 0 <= b.label < len(names):
            raise InvalidInput(f"box {i} has class {b.label}; the model has {len(names)} classes {names}")
        region: dict[str, Any] = {
            "id": f"box{i}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": BOX_TYPE,
            "value": {"x": 100.0 * b.x1, "y": 100.0 * b.y1, "width": 100.0 * (b.x2 - b.x1),
                      "height": 100.0 * (b.y2 - b.y1), "rotation": 0, BOX_TYPE: [names[b.label]]},
        }
        if b.score is not None:
            region["score"] = float(b.score)
        out.append(region)
    return out


def detection_prediction(prediction: Prediction, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The pre-annotation of a model's boxes."""
    if not isinstance(prediction, Detection):
        raise InvalidInput(f"an image-detection task needs a detect prediction; received a {prediction.task!r} one")
    return detection_result(prediction, class_names)


def parse_detection(result: Any, class_names: Sequence[str]) -> Detection:
    """The boxes an annotator drew (a human's: no scores), or :class:`InvalidInput` saying what is wrong.

    Every region must be a ``rectanglelabels`` region from the ``label`` control on the ``image`` with exactly
    one known class and a finite, unrotated rectangle; corners are clipped to the image (an annotator may
    drag a box past its edge), and a box with no area inside the image is refused. No region at all is a
    valid answer: nothing to find in this image.
    """
    if not isinstance(result, list):
        raise InvalidInput(f"result must be a list of regions; received {type(result).__name__} {_short(result)}")
    names = list(class_names)
    boxes = []
    for i, region in enumerate(result):
        if not isinstance(region, dict) or region.get("type") != BOX_TYPE:
            raise InvalidInput(f"region {i} is not a {BOX_TYPE} region: {_short(region)}")
        if region.get("from_name") != FROM_NAME or region.get("to_name") != TO_NAME:
            raise InvalidInput(f"region {i} must come from {FROM_NAME!r} to {TO_NAME!r}; received from_name="
                               f"{region.get('from_name')!r} to_name={region.get('to_name')!r}")
        value = region.get("value")
        if not isinstance(value, dict):
            raise InvalidInput(f"region {i} has no value object; received {_short(region)}")
        chosen = value.get(BOX_TYPE)
        if not isinstance(chosen, list) or len(chosen) != 1 or not isinstance(chosen[0], str):
            raise InvalidInput(f"region {i}: value.{BOX_TYPE} must be a list of exactly one class name; received "
                               f"{_short(chosen)}")
        if chosen[0] not in names:
            raise InvalidInput(f"region {i}: class {chosen[0]!r} is not one of the model's classes {names}")
        try:
            x, y, w, h = (_number(value.get(k), k) for k in ("x", "y", "width", "height"))
            rotation = _number(value.get("rotation", 0), "rotation")
        except InvalidInput as exc:
            raise InvalidInput(f"region {i}: {exc}; received value {_short(value)}") from None
        if abs(rotation) % 360 > 1e-6:
            raise InvalidInput(f"region {i}: a rotated box ({rotation} degrees) cannot be an axis-aligned box; "
                               f"received value {_short(value)}")
        x1, x2 = min(max(x / 100.0, 0.0), 1.0), min(max((x + w) / 100.0, 0.0), 1.0)
        y1, y2 = min(max(y / 100.0, 0.0), 1.0), min(max((y + h) / 100.0, 0.0), 1.0)
        if not (x1 < x2 and y1 < y2):
            raise InvalidInput(f"region {i}: the box has no area inside the image (x={x}, y={y}, width={w}, "
                               f"height={h} in percent); received value {_short(value)}")
        boxes.append(Box(x1, y1, x2, y2, names.index(chosen[0])))
    try:
        detection = Detection(boxes)
        detection.validate()
    except ProtocolError as exc:
        raise InvalidInput(f"the boxes are not a valid detect label: {exc}") from None
    return detection


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelKind:
    """What one kind of labeling task looks like in Label Studio and what its answers mean.

    ``config(class_names, instructions=...)``: the labeling config; ``parse(result, class_names)``: an
    annotation's result as the hub's label type (``InvalidInput`` when malformed); ``prediction(prediction,
    class_names)``: a model's prediction as a pre-annotation result; ``task``: the contract's task.
    """

    name: str
    config: Callable[..., str]
    parse: Callable[[Any, Sequence[str]], Prediction]
    control_type: str
    task: str
    prediction: Callable[[Prediction, Sequence[str]], list[dict[str, Any]]]
    instructions: str = ""


KINDS: dict[str, LabelKind] = {
    "image-classification": LabelKind("image-classification", image_classification_config,
                                      parse_classification_label, "Choices", "classify", classification_prediction,
                                      "Pick the class that best describes the image. Skip it if you cannot tell."),
    "image-detection": LabelKind("image-detection", image_detection_config, parse_detection, "RectangleLabels",
                                 "detect", detection_prediction,
                                 "Draw a box around every object and pick its class; correct or delete the "
                                 "model's boxes. Submit with no box if there is nothing to find."),
}


def get_kind(name: str) -> LabelKind:
    """Look a labeling kind up by name; an unknown name lists the valid ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidInput(f"unknown labeling kind {name!r}; valid kinds are {sorted(KINDS)}") from None


def kind_for_task(task: str) -> LabelKind:
    """The labeling kind of a contract task (``classify``, ``detect``); an unknown task lists the valid ones."""
    for kind in KINDS.values():
        if kind.task == task:
            return kind
    raise InvalidInput(f"no labeling kind for task {task!r}; valid tasks are {sorted(k.task for k in KINDS.values())}")


def config_classes(label_config: str) -> list[str]:
    """The class names a labeling config offers (its Choice or Label values, in order)."""
    try:
        root = ElementTree.fromstring(label_config)
    except ElementTree.ParseError as exc:
        raise InvalidInput(f"label config is not valid XML ({exc})") from None
    return [el.attrib["value"] for el in root.iter() if el.tag in ("Choice", "Label") and "value" in el.attrib]


def _view(control: str, attributes: str, items: str, instructions: str | None) -> str:
    """A labeling config: optional instructions, the ``label`` control with its items, then the image. The
    control sits above the image, so it stays in view whatever the image's size."""
    header = f"  <Header value={quoteattr(instructions)}/>\n" if instructions else ""
    return (
        "<View>\n"
        f"{header}"
        f'  <{control} name="{FROM_NAME}" toName="{TO_NAME}" {attributes}>\n'
        f"{items}\n"
        f"  </{control}>\n"
        f'  <Image name="{TO_NAME}" value="${IMAGE_FIELD}" zoom="true" zoomControl="true" maxWidth="560px"/>\n'
        "</View>\n"
    )


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number; received {value!r}")
    return float(value)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
