"""Labeling configs from class names, and reading annotation results back (malformed ones refused)."""

from __future__ import annotations

from xml.etree import ElementTree

import pytest

from fleet.errors import InvalidInput
from labeling.configs import (
    check_class_names,
    classification_result,
    config_classes,
    get_kind,
    image_classification_config,
    parse_classification,
)

CLASSES = ["cat", "dog", "bird"]


def test_classification_config_offers_every_class_in_order() -> None:
    xml = image_classification_config(CLASSES)
    root = ElementTree.fromstring(xml)
    assert root.find("Image").attrib["value"] == "$image"  # type: ignore[union-attr]
    choices = root.find("Choices")
    assert choices is not None and choices.attrib["toName"] == "image" and choices.attrib["name"] == "label"
    assert config_classes(xml) == CLASSES
    assert [c.attrib["hotkey"] for c in choices] == ["1", "2", "3"]


def test_class_names_with_markup_are_escaped() -> None:
    names = ['a "quoted" & <odd>', "plain"]
    assert config_classes(image_classification_config(names)) == names


@pytest.mark.parametrize("bad", [[], ["a", "a"], [""], [" padded"], ["x" * 129], ["tab\there"]])
def test_bad_class_names_are_refused_with_the_value(bad: list[str]) -> None:
    with pytest.raises(InvalidInput):
        check_class_names(bad)


def test_a_result_round_trips_to_its_class_index() -> None:
    for i, name in enumerate(CLASSES):
        assert parse_classification(classification_result(name), CLASSES) == i


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ("cat", "must be a list"),
        ([], "exactly one choices region"),
        (classification_result("cat") + classification_result("dog"), "exactly one choices region"),
        ([{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat", "dog"]}}],
         "exactly one class"),
        ([{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": []}}],
         "exactly one class"),
        ([{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["horse"]}}],
         "not one of the model's classes"),
        ([{"from_name": "other", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}],
         "must come from"),
        ([{"from_name": "label", "to_name": "image", "type": "choices", "value": "cat"}], "exactly one class"),
        ([{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": {}}], "not choices"),
        ([None], "not choices"),
    ],
)
def test_malformed_results_are_refused_with_a_reason(result: object, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        parse_classification(result, CLASSES)


def test_kinds_are_looked_up_by_name_and_an_unknown_one_lists_the_valid_ones() -> None:
    assert get_kind("image-classification").control_type == "Choices"
    with pytest.raises(InvalidInput, match=r"\['image-classification', 'image-detection'\]"):
        get_kind("segmentation")
