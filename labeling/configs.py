"""Label Studio labeling configs built from a model's class names, and what an annotation's result means.

Kinds are registered by name (``image-classification`` today; one per task of the contract). A kind
knows three things: the XML Label Studio renders, the pre-annotation for a model's prediction, and how
to read an annotator's ``result`` back, refusing anything malformed with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from fleet.errors import InvalidInput

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
    header = f"  <Header value={quoteattr(instructions)}/>\n" if instructions else ""
    # the answers sit above the image, so they stay in view whatever the image's size
    return (
        "<View>\n"
        f"{header}"
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" showInline="true" required="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        f'  <Image name="{TO_NAME}" value="${IMAGE_FIELD}" zoom="true" zoomControl="true" maxWidth="560px"/>\n'
        "</View>\n"
    )


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


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelKind:
    """What one kind of labeling task looks like in Label Studio and what its answers mean."""

    name: str
    config: Callable[..., str]
    parse: Callable[[Any, Sequence[str]], Any]
    control_type: str


KINDS: dict[str, LabelKind] = {
    "image-classification": LabelKind("image-classification", image_classification_config,
                                      parse_classification, "Choices"),
}


def get_kind(name: str) -> LabelKind:
    """Look a labeling kind up by name; an unknown name lists the valid ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidInput(f"unknown labeling kind {name!r}; valid kinds are {sorted(KINDS)}") from None


def config_classes(label_config: str) -> list[str]:
    """The class names a labeling config offers (its Choice or Label values, in order)."""
    try:
        root = ElementTree.fromstring(label_config)
    except ElementTree.ParseError as exc:
        raise InvalidInput(f"label config is not valid XML ({exc})") from None
    return [el.attrib["value"] for el in root.iter() if el.tag in ("Choice", "Label") and "value" in el.attrib]


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
