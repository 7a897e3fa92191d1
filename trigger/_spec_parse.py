"""Parsing a trigger spec's sections (rule, filters, dedup, budgets, expiry) for :func:`trigger.spec.parse_spec`.

Each function validates one part of the document and builds its :mod:`trigger.spec_types` value, or
raises :class:`~trigger.spec_types.SpecError` naming the path in the document, what was received and
what was expected.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from trigger.spec_types import (
    AllOf,
    AnyOf,
    BucketSpec,
    BudgetSpec,
    DedupSpec,
    Filters,
    Leaf,
    Node,
    SpecError,
    leaves_of,
)
from trigger.triggers import TRIGGERS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RATE_UNITS = {"rate_per_s": 1.0, "rate_per_min": 60.0, "rate_per_hour": 3600.0, "rate_per_day": 86400.0}
_MAX_DEPTH = 8
_MAX_LEAVES = 32
_LEAF_KEYS = ("trigger", "label", "above", "below", "target_rate", "weight", "window")


def parse_rule(doc: Any, path: str = "rule") -> Node:
    """The rule tree: nested ``any_of``/``all_of`` over trigger leaves whose labels are unique."""
    rule = _node(doc, path, 0, {"leaves": 0})
    by_task: dict[str, list[str]] = {}
    for leaf in leaves_of(rule):
        if leaf.definition.task is not None:
            by_task.setdefault(leaf.definition.task, []).append(leaf.trigger)
    if len(by_task) > 1:
        raise SpecError(
            f"{path}: mixes classifier triggers ({', '.join(by_task['classify'])}) and detector triggers "
            f"({', '.join(by_task['detect'])}); a campaign runs on one kind of model, so write one spec for each"
        )
    labels = [leaf.label for leaf in leaves_of(rule)]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SpecError(
            f"{path}: labels must be unique so a firing can be told apart; received {dupes} more than once "
            f"(give the leaves distinct 'label's)"
        )
    return rule


def parse_filters(doc: Any) -> Filters:
    if doc is None:
        return Filters()
    if not isinstance(doc, Mapping):
        raise SpecError(f"filters: expected an object; received {what(doc)}")
    check_keys(doc, "filters", ("classes", "tags"))
    classes = None
    if doc.get("classes") is not None:
        raw = doc["classes"]
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"filters.classes: expected a non-empty list of class indices; received {what(raw)}")
        classes = frozenset(integer(c, f"filters.classes[{i}]", low=0) for i, c in enumerate(raw))
    tags: dict[str, frozenset[str]] = {}
    raw_tags = doc.get("tags") or {}
    if not isinstance(raw_tags, Mapping):
        raise SpecError(
            f"filters.tags: expected an object of tag -> value or list of values; "
            f"received {what(raw_tags)}"
        )
    for key, values in raw_tags.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise SpecError(
                f"filters.tags.{key}: expected a string or a non-empty list of strings; "
                f"received {what(values)}"
            )
        tags[str(key)] = frozenset(values)
    return Filters(classes=classes, tags=tags)


def parse_dedup(doc: Any) -> DedupSpec | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise SpecError(f"dedup: expected an object; received {what(doc)}")
    check_keys(doc, "dedup", ("max_hamming", "embedding_threshold", "memory", "hash_bits"))
    hash_bits = integer(doc.get("hash_bits", 64), "dedup.hash_bits", low=4, high=64)
    if math.isqrt(hash_bits) ** 2 != hash_bits:
        raise SpecError(f"dedup.hash_bits: expected a square from 4 to 64 (4, 9, ..., 64); received {hash_bits}")
    default_hamming = None if "embedding_threshold" in doc else 4
    max_hamming = doc.get("max_hamming", default_hamming)
    if max_hamming is not None:
        max_hamming = integer(max_hamming, "dedup.max_hamming", low=0, high=hash_bits)
    threshold = doc.get("embedding_threshold")
    if threshold is not None:
        threshold = number(threshold, "dedup.embedding_threshold", low=0.0, high=2.0)
    if max_hamming is None and threshold is None:
        raise SpecError("dedup: expected 'max_hamming' or 'embedding_threshold' (or both); received neither")
    memory = integer(doc.get("memory", 512), "dedup.memory", low=1, high=100_000)
    return DedupSpec(max_hamming=max_hamming, embedding_threshold=threshold, memory=memory, hash_bits=hash_bits)


def parse_budgets(doc: Any, labels: list[str]) -> BudgetSpec | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise SpecError(f"budgets: expected an object; received {what(doc)}")
    check_keys(doc, "budgets", ("global", "per_trigger", "per_class", "fleet"))
    glob = None if doc.get("global") is None else _bucket(doc["global"], "budgets.global")
    fleet = None if doc.get("fleet") is None else _bucket(doc["fleet"], "budgets.fleet")
    per_trigger: dict[str, BucketSpec] = {}
    raw = doc.get("per_trigger") or {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"budgets.per_trigger: expected an object of label -> bucket; received {what(raw)}")
    for label, sub in raw.items():
        if label not in labels:
            raise SpecError(
                f"budgets.per_trigger: unknown trigger label {label!r}; labels in this spec: {', '.join(labels)}"
            )
        per_trigger[label] = _bucket(sub, f"budgets.per_trigger.{label}")
    per_class: dict[int, BucketSpec] = {}
    raw = doc.get("per_class") or {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"budgets.per_class: expected an object of class index -> bucket; received {what(raw)}")
    for key, sub in raw.items():
        try:
            cls = int(key)
        except (TypeError, ValueError):
            cls = -1
        if cls < 0 or str(cls) != str(key).strip():
            raise SpecError(f"budgets.per_class: expected class indices such as \"3\" as keys; received {key!r}")
        per_class[cls] = _bucket(sub, f"budgets.per_class.{key}")
    return BudgetSpec(global_bucket=glob, per_trigger=per_trigger, per_class=per_class, fleet_bucket=fleet)


def parse_expiry(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError as exc:
            raise SpecError(
                f"expires_at: expected an ISO 8601 time such as '2026-12-31T00:00:00Z'; "
                f"received {value!r}"
            ) from exc
        if when.tzinfo is None:
            raise SpecError(f"expires_at: expected a time zone (e.g. a trailing 'Z' for UTC); received {value!r}")
        return when.timestamp()
    return number(value, "expires_at", low=0.0)



def check_keys(doc: Mapping[str, Any], path: str, allowed: tuple[str, ...], *, required: tuple[str, ...] = (),
          what: str = "keys") -> None:
    for key in doc:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{path}: unknown key {key!r}{hint}; valid {what}: {', '.join(allowed)}")
    for key in required:
        if key not in doc:
            raise SpecError(f"{path}: missing required key {key!r}")


def number(value: Any, path: str, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{path}: expected a number; received {what(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise SpecError(f"{path}: expected a finite number; received {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise SpecError(f"{path}: expected a number {_range(low, high)}; received {value!r}")
    return v


def integer(value: Any, path: str, *, low: float | None = None, high: float | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}: expected an integer; received {what(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SpecError(f"{path}: expected an integer {_range(low, high)}; received {value!r}")
    return value


def what(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _node(doc: Any, path: str, depth: int, counter: dict[str, int]) -> Node:
    if depth > _MAX_DEPTH:
        raise SpecError(f"{path}: expected at most {_MAX_DEPTH} levels of any_of/all_of; received deeper nesting")
    if not isinstance(doc, Mapping):
        raise SpecError(f"{path}: expected an object (a trigger leaf, any_of or all_of); received {what(doc)}")
    kinds = [k for k in ("trigger", "any_of", "all_of") if k in doc]
    if len(kinds) != 1:
        raise SpecError(
            f"{path}: expected exactly one of 'trigger', 'any_of', 'all_of'; received keys {sorted(doc)}"
        )
    if kinds[0] == "trigger":
        counter["leaves"] += 1
        if counter["leaves"] > _MAX_LEAVES:
            raise SpecError(f"{path}: expected at most {_MAX_LEAVES} trigger leaves in a spec; received more")
        return _leaf(doc, path)
    kind = kinds[0]
    check_keys(doc, path, (kind,))
    children = doc[kind]
    if not isinstance(children, list) or not children:
        raise SpecError(f"{path}.{kind}: expected a non-empty list of rules; received {what(children)}")
    nodes = tuple(_node(c, f"{path}.{kind}[{i}]", depth + 1, counter) for i, c in enumerate(children))
    return AnyOf(nodes) if kind == "any_of" else AllOf(nodes)


def _leaf(doc: Mapping[str, Any], path: str) -> Leaf:
    name = doc["trigger"]
    if not isinstance(name, str) or name not in TRIGGERS:
        close = difflib.get_close_matches(str(name), TRIGGERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(
            f"{path}.trigger: unknown trigger {name!r}{hint}; valid triggers: {', '.join(sorted(TRIGGERS))}"
        )
    tdef = TRIGGERS[name]
    allowed = _LEAF_KEYS + tuple(p.name for p in tdef.params)
    check_keys(doc, path, allowed, what=f"keys for trigger {name!r}")
    modes = [m for m in ("above", "below", "target_rate") if m in doc]
    if len(modes) > 1:
        raise SpecError(f"{path}: expected one of 'above', 'below', 'target_rate'; received {modes}")
    if modes:
        mode = modes[0]
        if mode == "target_rate":
            threshold = number(doc[mode], f"{path}.target_rate", low=0.0, high=1.0)
            if not 0.0 < threshold < 1.0:
                raise SpecError(
                    f"{path}.target_rate: expected a fraction strictly between 0 and 1; "
                    f"received {threshold!r}"
                )
        else:
            threshold = number(doc[mode], f"{path}.{mode}")
    elif tdef.default_threshold is not None:
        mode, threshold = tdef.direction, tdef.default_threshold
    else:
        raise SpecError(
            f"{path}: trigger {name!r} needs one of 'above', 'below' or 'target_rate' (it fires on "
            f"{tdef.direction!r}); received none"
        )
    label = doc.get("label", name)
    if not isinstance(label, str) or not NAME_RE.match(label) or len(label) > 64:
        raise SpecError(f"{path}.label: expected 1-64 letters, digits, '.', '_' or '-'; received {label!r}")
    weight = number(doc.get("weight", tdef.weight), f"{path}.weight", low=0.0, high=1.0)
    window = None
    if "window" in doc:
        if mode != "target_rate":
            raise SpecError(
                f"{path}.window: only a 'target_rate' leaf is calibrated over a window; this one is {mode!r}"
            )
        window = integer(doc["window"], f"{path}.window", low=8, high=1_000_000)
    params: dict[str, Any] = {}
    for p in tdef.params:
        if p.name not in doc:
            if p.default is not None:
                params[p.name] = p.default
            continue
        value = doc[p.name]
        where = f"{path}.{p.name}"
        if value is None and p.optional:
            continue
        if p.kind is bool:
            if not isinstance(value, bool):
                raise SpecError(f"{where}: expected true or false; received {what(value)}")
            params[p.name] = value
        elif p.kind is int:
            params[p.name] = integer(value, where, low=p.low, high=p.high)
        else:
            params[p.name] = number(value, where, low=p.low, high=p.high)
    return Leaf(trigger=name, label=label, mode=mode, threshold=threshold, params=params, weight=weight, window=window)


def _bucket(doc: Any, path: str) -> BucketSpec:
    if not isinstance(doc, Mapping):
        example = '{"rate_per_min": 60, "burst": 20}'
        raise SpecError(f"{path}: expected an object such as {example}; received {what(doc)}")
    check_keys(doc, path, (*_RATE_UNITS, "burst"))
    rates = [k for k in _RATE_UNITS if k in doc]
    if len(rates) != 1:
        raise SpecError(f"{path}: expected exactly one of {', '.join(_RATE_UNITS)}; received {rates or 'none'}")
    rate = number(doc[rates[0]], f"{path}.{rates[0]}", low=0.0) / _RATE_UNITS[rates[0]]
    burst = number(doc.get("burst", 1), f"{path}.burst", low=1.0, high=1e9)
    return BucketSpec(rate_per_s=rate, burst=burst)


def _range(low: float | None, high: float | None) -> str:
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if low is not None and high is not None:
        return f"in [{fmt(low)}, {fmt(high)}]"
    if low is not None:
        return f">= {fmt(low)}"
    return f"<= {fmt(high)}" if high is not None else ""
