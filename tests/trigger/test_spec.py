"""Specs are validated completely at parse time, with messages that say where, what and what was expected."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from trigger import TRIGGERS, Spec, SpecError, parse_spec

EXAMPLE: dict[str, Any] = {
    "format": "flywheel.trigger/1",
    "id": "rare-conditions",
    "version": 3,
    "expires_at": "2026-12-31T00:00:00Z",
    "filters": {"classes": [0, 3], "tags": {"condition": ["night", "fog"]}},
    "rule": {"any_of": [
        {"trigger": "entropy", "target_rate": 0.02},
        {"trigger": "human_disagreement"},
        {"all_of": [{"trigger": "margin", "below": 0.1}, {"trigger": "novelty", "k": 5, "above": 0.3}]},
    ]},
    "dedup": {"max_hamming": 4, "memory": 512},
    "budgets": {"global": {"rate_per_min": 60, "burst": 20},
                "per_trigger": {"entropy": {"rate_per_min": 30, "burst": 10}},
                "per_class": {"3": {"rate_per_min": 5, "burst": 5}}},
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """EXAMPLE with the value at a dotted path replaced (``...=DELETE`` removes it)."""
    doc = copy.deepcopy(EXAMPLE)
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


DELETE = object()


def test_the_documented_example_parses() -> None:
    spec = parse_spec(EXAMPLE)
    assert isinstance(spec, Spec)
    assert (spec.id, spec.version) == ("rare-conditions", 3)
    assert spec.expires_at == datetime(2026, 12, 31, tzinfo=UTC).timestamp()
    assert spec.labels == ("entropy", "human_disagreement", "margin", "novelty")
    assert spec.filters.classes == frozenset({0, 3})
    assert spec.budgets is not None and spec.budgets.global_bucket is not None
    assert spec.budgets.global_bucket.rate_per_s == pytest.approx(1.0)
    assert spec.needs == {"embeddings", "bank"}
    human = spec.leaves[1]
    assert (human.mode, human.threshold) == ("above", 0.0)  # disagreement fires whenever it disagrees


def test_round_trip_through_json() -> None:
    spec = parse_spec(EXAMPLE)
    assert parse_spec(spec.to_json()) == spec
    assert parse_spec(json.dumps(EXAMPLE)) == spec
    assert parse_spec(spec.to_dict()).to_dict() == spec.to_dict()


def test_expiry() -> None:
    spec = parse_spec(EXAMPLE)
    assert spec.expires_at is not None
    assert not spec.is_expired(spec.expires_at - 1) and spec.is_expired(spec.expires_at)
    assert not parse_spec(with_change("expires_at", None)).is_expired(1e12)
    assert parse_spec(with_change("expires_at", 1000)).is_expired(1000.0)
    assert parse_spec(with_change("expires_at", "2026-12-31T01:00:00+01:00")).expires_at == spec.expires_at


def test_every_registered_trigger_parses_with_its_defaults() -> None:
    for name, tdef in TRIGGERS.items():
        leaf: dict[str, Any] = {"trigger": name}
        if tdef.default_threshold is None:
            leaf["target_rate"] = 0.05
        spec = parse_spec({"id": "t", "version": 0, "rule": leaf})
        assert spec.leaves[0].trigger == name


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (with_change("rule.any_of.0.trigger", "entropyy"),
         "rule.any_of[0].trigger: unknown trigger 'entropyy' (did you mean 'entropy'?); valid triggers: bald, "
         "box_ambiguous_count, box_ambiguous_share, box_challenger_disagreement, box_entropy_max, box_entropy_mean, "
         "box_entropy_sum, box_flicker, box_human_disagreement, box_instability, box_least_confidence_max, "
         "box_least_confidence_mean, box_least_confidence_sum, box_low_score_max, box_low_score_mean, "
         "box_low_score_sum, box_margin_max, box_margin_mean, box_margin_sum, challenger_disagreement, energy, "
         "entropy, human_disagreement, learned_box_error, learned_box_error_count, learned_box_error_hist, "
         "learned_error, learned_error_knn, least_confidence, margin, novelty, random, variation_ratio"),
        (with_change("rule.any_of.2.all_of.1.abvoe", 0.3), "unknown key 'abvoe' (did you mean 'above'?)"),
        (with_change("rule.any_of.0", {"trigger": "entropy"}),
         "rule.any_of[0]: trigger 'entropy' needs one of 'above', 'below' or 'target_rate'"),
        (with_change("rule.any_of.0.target_rate", 2), "target_rate: expected a number in [0, 1]; received 2"),
        (with_change("rule.any_of.0.target_rate", 0), "strictly between 0 and 1"),
        (with_change("rule.any_of.0.below", 0.1), "expected one of 'above', 'below', 'target_rate'"),
        (with_change("rule.any_of.2.all_of.1.k", 0), "rule.any_of[2].all_of[1].k: expected an integer in [1, 1000]"),
        (with_change("rule.any_of.2.all_of.1.k", 2.5), "k: expected an integer; received float 2.5"),
        (with_change("rule.any_of", []), "rule.any_of: expected a non-empty list"),
        (with_change("rule", {"any_of": [], "all_of": []}), "expected exactly one of 'trigger', 'any_of', 'all_of'"),
        (with_change("rule.any_of.1.label", "entropy"), "labels must be unique"),
        (with_change("id", "has spaces"), "id: expected 1-128 letters"),
        (with_change("version", "3"), "version: expected an integer; received str \"3\""),
        (with_change("version", -1), "version: expected an integer >= 0"),
        (with_change("version", DELETE), "missing required key 'version'"),
        (with_change("format", "flywheel.trigger/2"), "format: expected 'flywheel.trigger/1'"),
        (with_change("expires_at", "next tuesday"), "expires_at: expected an ISO 8601 time"),
        (with_change("expires_at", "2026-12-31T00:00:00"), "expected a time zone"),
        (with_change("colour", "blue"), "spec: unknown key 'colour'"),
        (with_change("filters.classes", [-1]), "filters.classes[0]: expected an integer >= 0"),
        (with_change("filters.tags.condition", [1]), "filters.tags.condition: expected a string or a non-empty list"),
        (with_change("dedup.max_hamming", 65), "dedup.max_hamming: expected an integer in [0, 64]"),
        (with_change("dedup", {"max_hamming": None}), "dedup: expected 'max_hamming' or 'embedding_threshold'"),
        (with_change("budgets.per_trigger.novelty2", {"rate_per_s": 1}),
         "budgets.per_trigger: unknown trigger label 'novelty2'; labels in this spec: entropy, human_disagreement, "
         "margin, novelty"),
        (with_change("budgets.per_class.three", {"rate_per_s": 1}), "budgets.per_class: expected class indices"),
        (with_change("budgets.global", {"rate_per_min": 1, "rate_per_s": 1}), "expected exactly one of rate_per_s"),
        (with_change("budgets.global.burst", 0), "budgets.global.burst: expected a number in [1, 1000000000]"),
        (with_change("rule.any_of.0.window", 100), None),  # window is fine on a calibrated leaf...
        (with_change("rule.any_of.1.window", 100), "only a 'target_rate' leaf is calibrated"),  # ...not here
        (with_change("rule.any_of.1.weight", 1.5), "weight: expected a number in [0, 1]"),
        (with_change("rule.any_of.1.weighted", "yes"), "weighted: expected true or false"),
        ("{not json", "spec is not valid JSON"),
        ([1, 2], "spec: expected a JSON object; received list"),
    ],
)
def test_bad_specs_are_rejected_with_the_right_message(doc: Any, message: str | None) -> None:
    if message is None:
        parse_spec(doc)
        return
    with pytest.raises(SpecError) as info:
        parse_spec(doc)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_nesting_and_size_are_bounded() -> None:
    rule: dict[str, Any] = {"trigger": "margin", "below": 0.1}
    for _ in range(10):
        rule = {"all_of": [rule]}
    with pytest.raises(SpecError, match="levels of any_of/all_of"):
        parse_spec({"id": "deep", "version": 1, "rule": rule})
    many = [{"trigger": "random", "below": 0.1, "label": f"r{i}"} for i in range(40)]
    with pytest.raises(SpecError, match="at most 32 trigger leaves"):
        parse_spec({"id": "wide", "version": 1, "rule": {"any_of": many}})
