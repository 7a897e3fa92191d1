"""Trigger specs (campaigns): a versioned, expiring JSON document saying which frames to keep.

:func:`parse_spec` validates a document completely, once, and returns a frozen :class:`Spec`;
every refusal is a :class:`SpecError` whose message gives the path in the document, what was
received and what was expected (an unknown trigger lists the valid ones). Evaluating a spec on
frames is :class:`trigger.evaluate.Evaluator`'s job.

Document (``format`` may be omitted; every other key not listed here is refused)::

    {"format": "flywheel.trigger/1", "id": "rare-conditions", "version": 3,
     "expires_at": "2026-12-31T00:00:00Z",            # ISO 8601 with a zone, unix seconds, or null
     "description": "...", "temperature": 1.0,        # softmax temperature for probabilities
     "filters": {"classes": [0, 3], "tags": {"condition": ["night", "fog"]}},
     "rule": {"any_of": [
        {"trigger": "entropy", "target_rate": 0.02},
        {"trigger": "human_disagreement"},
        {"all_of": [{"trigger": "margin", "below": 0.1}, {"trigger": "novelty", "k": 5, "above": 0.3}]}]},
     "dedup": {"max_hamming": 4, "memory": 512},
     "budgets": {"global": {"rate_per_min": 60, "burst": 20},
                 "per_trigger": {"entropy": {"rate_per_min": 30, "burst": 10}},
                 "per_class": {"3": {"rate_per_min": 5, "burst": 5}}}}

A leaf is ``{"trigger": name, <one of "above" | "below" | "target_rate">, <trigger parameters>,
"label": unique name (default: the trigger's), "weight": priority weight in [0, 1],
"window": calibration window}``; ``human_disagreement`` and ``challenger_disagreement`` default to
``"above": 0`` (fire whenever they disagree). ``target_rate`` fires on the trigger's interesting
side (see :data:`trigger.triggers.TRIGGERS`). Budgets give exactly one of ``rate_per_s``,
``rate_per_min``, ``rate_per_hour``, ``rate_per_day`` (0 = a lifetime cap of ``burst``) and a
``burst`` (default 1).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Union

from trigger.triggers import TRIGGERS, TriggerDef

__all__ = [
    "FORMAT", "AllOf", "AnyOf", "BucketSpec", "BudgetSpec", "DedupSpec", "Filters", "Leaf", "Node",
    "Spec", "SpecError", "parse_spec",
]

FORMAT = "flywheel.trigger/1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RATE_UNITS = {"rate_per_s": 1.0, "rate_per_min": 60.0, "rate_per_hour": 3600.0, "rate_per_day": 86400.0}
_MAX_DEPTH = 8
_MAX_LEAVES = 32


class SpecError(ValueError):
    """A trigger spec that cannot be used; the message says where, what was received and what was expected."""


# ---------------------------------------------------------------------------------------------
# the parsed spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """One trigger with its firing rule: ``mode`` is "above", "below" or "target_rate"."""

    trigger: str
    label: str
    mode: str
    threshold: float  # the fixed threshold, or the target rate for "target_rate"
    params: Mapping[str, Any]
    weight: float
    window: int | None = None

    @property
    def definition(self) -> TriggerDef:
        return TRIGGERS[self.trigger]

    @property
    def direction(self) -> str:
        """The side that fires: the fixed mode, or the trigger's interesting side when calibrated."""
        return self.definition.direction if self.mode == "target_rate" else self.mode

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trigger": self.trigger}
        if self.label != self.trigger:
            out["label"] = self.label
        out[self.mode] = self.threshold
        out.update(self.params)
        if self.weight != self.definition.weight:
            out["weight"] = self.weight
        if self.window is not None:
            out["window"] = self.window
        return out


@dataclass(frozen=True)
class AnyOf:
    """Fires when any child fires."""

    children: tuple[Node, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"any_of": [c.to_dict() for c in self.children]}


@dataclass(frozen=True)
class AllOf:
    """Fires when every child fires."""

    children: tuple[Node, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"all_of": [c.to_dict() for c in self.children]}


Node = Union[Leaf, AnyOf, AllOf]  # noqa: UP007 - a runtime alias, used in isinstance-free code


@dataclass(frozen=True)
class Filters:
    """Frames outside the filters are never kept (and do not feed calibration)."""

    classes: frozenset[int] | None = None  # predicted classes
    tags: Mapping[str, frozenset[str]] = field(default_factory=dict)  # every key must match one value

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.classes is not None:
            out["classes"] = sorted(self.classes)
        if self.tags:
            out["tags"] = {k: sorted(v) for k, v in sorted(self.tags.items())}
        return out


@dataclass(frozen=True)
class DedupSpec:
    """Near-duplicate suppression settings (see :class:`trigger.dedup.NearDuplicateFilter`)."""

    max_hamming: int | None = 4
    embedding_threshold: float | None = None
    memory: int = 512
    hash_bits: int = 64

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_hamming": self.max_hamming, "embedding_threshold": self.embedding_threshold,
            "memory": self.memory, "hash_bits": self.hash_bits,
        }


@dataclass(frozen=True)
class BucketSpec:
    """A token bucket: ``rate_per_s`` refill, ``burst`` capacity."""

    rate_per_s: float
    burst: float

    def to_dict(self) -> dict[str, Any]:
        return {"rate_per_s": self.rate_per_s, "burst": self.burst}


@dataclass(frozen=True)
class BudgetSpec:
    """The campaign's upload budgets."""

    global_bucket: BucketSpec | None = None
    per_trigger: Mapping[str, BucketSpec] = field(default_factory=dict)
    per_class: Mapping[int, BucketSpec] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.global_bucket is not None:
            out["global"] = self.global_bucket.to_dict()
        if self.per_trigger:
            out["per_trigger"] = {k: v.to_dict() for k, v in sorted(self.per_trigger.items())}
        if self.per_class:
            out["per_class"] = {str(k): v.to_dict() for k, v in sorted(self.per_class.items())}
        return out


@dataclass(frozen=True)
class Spec:
    """A validated trigger spec. Build with :func:`parse_spec`; :meth:`to_dict` gives its canonical JSON."""

    id: str
    version: int
    rule: Node
    expires_at: float | None = None  # unix seconds
    description: str = ""
    temperature: float = 1.0
    filters: Filters = field(default_factory=Filters)
    dedup: DedupSpec | None = None
    budgets: BudgetSpec | None = None

    def is_expired(self, now: float) -> bool:
        """Whether the campaign is over at ``now`` (unix seconds)."""
        return self.expires_at is not None and now >= self.expires_at

    @property
    def leaves(self) -> tuple[Leaf, ...]:
        """Every trigger leaf, in document order."""
        return tuple(_leaves(self.rule))

    @property
    def labels(self) -> tuple[str, ...]:
        """The leaves' labels (the names reported when they fire), in document order."""
        return tuple(leaf.label for leaf in self.leaves)

    @property
    def needs(self) -> frozenset[str]:
        """FrameBatch fields (and "bank") the spec cannot run without."""
        out = {need for leaf in self.leaves for need in leaf.definition.needs}
        if self.dedup is not None and self.dedup.embedding_threshold is not None and self.dedup.max_hamming is None:
            out.add("embeddings")
        return frozenset(out)

    def to_dict(self) -> dict[str, Any]:
        """The canonical document: ``parse_spec(spec.to_dict()) == spec``."""
        out: dict[str, Any] = {"format": FORMAT, "id": self.id, "version": self.version}
        out["expires_at"] = None if self.expires_at is None else _iso(self.expires_at)
        if self.description:
            out["description"] = self.description
        if self.temperature != 1.0:
            out["temperature"] = self.temperature
        filters = self.filters.to_dict()
        if filters:
            out["filters"] = filters
        out["rule"] = self.rule.to_dict()
        if self.dedup is not None:
            out["dedup"] = self.dedup.to_dict()
        if self.budgets is not None:
            out["budgets"] = self.budgets.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

_TOP_KEYS = (
    "format", "id", "version", "expires_at", "description", "temperature", "filters", "rule", "dedup", "budgets",
)
_LEAF_KEYS = ("trigger", "label", "above", "below", "target_rate", "weight", "window")


def parse_spec(doc: Mapping[str, Any] | str | bytes) -> Spec:
    """Validate a spec document (a mapping, or JSON text) and return the :class:`Spec`.

    Raises :class:`SpecError` on the first problem found, naming its path in the document.
    """
    if isinstance(doc, (str, bytes, bytearray)):
        try:
            doc = json.loads(doc)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise SpecError(f"spec: expected a JSON object; received {_what(doc)}")
    _keys(doc, "spec", _TOP_KEYS, required=("id", "version", "rule"))
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        raise SpecError(f"format: expected {FORMAT!r}; received {fmt!r}")
    spec_id = doc["id"]
    if not isinstance(spec_id, str) or not NAME_RE.match(spec_id):
        raise SpecError(
            f"id: expected 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit; received {spec_id!r}"
        )
    version = _int(doc["version"], "version", low=0)
    description = doc.get("description", "")
    if not isinstance(description, str) or len(description) > 2000:
        raise SpecError(f"description: expected a string of at most 2000 characters; received {_what(description)}")
    temperature = _num(doc.get("temperature", 1.0), "temperature", low=1e-6, high=1e6)
    counter: dict[str, int] = {"leaves": 0}
    rule = _node(doc["rule"], "rule", 0, counter)
    labels = [leaf.label for leaf in _leaves(rule)]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SpecError(
            f"rule: labels must be unique so a firing can be told apart; received {dupes} more than once "
            f"(give the leaves distinct 'label's)"
        )
    return Spec(
        id=spec_id,
        version=version,
        rule=rule,
        expires_at=_expiry(doc.get("expires_at")),
        description=description,
        temperature=temperature,
        filters=_filters(doc.get("filters")),
        dedup=_dedup(doc.get("dedup")),
        budgets=_budgets(doc.get("budgets"), labels),
    )


def _node(doc: Any, path: str, depth: int, counter: dict[str, int]) -> Node:
    if depth > _MAX_DEPTH:
        raise SpecError(f"{path}: expected at most {_MAX_DEPTH} levels of any_of/all_of; received deeper nesting")
    if not isinstance(doc, Mapping):
        raise SpecError(f"{path}: expected an object (a trigger leaf, any_of or all_of); received {_what(doc)}")
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
    _keys(doc, path, (kind,))
    children = doc[kind]
    if not isinstance(children, list) or not children:
        raise SpecError(f"{path}.{kind}: expected a non-empty list of rules; received {_what(children)}")
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
    _keys(doc, path, allowed, what=f"keys for trigger {name!r}")
    modes = [m for m in ("above", "below", "target_rate") if m in doc]
    if len(modes) > 1:
        raise SpecError(f"{path}: expected one of 'above', 'below', 'target_rate'; received {modes}")
    if modes:
        mode = modes[0]
        if mode == "target_rate":
            threshold = _num(doc[mode], f"{path}.target_rate", low=0.0, high=1.0)
            if not 0.0 < threshold < 1.0:
                raise SpecError(
                    f"{path}.target_rate: expected a fraction strictly between 0 and 1; "
                    f"received {threshold!r}"
                )
        else:
            threshold = _num(doc[mode], f"{path}.{mode}")
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
    weight = _num(doc.get("weight", tdef.weight), f"{path}.weight", low=0.0, high=1.0)
    window = None
    if "window" in doc:
        if mode != "target_rate":
            raise SpecError(
                f"{path}.window: only a 'target_rate' leaf is calibrated over a window; this one is {mode!r}"
            )
        window = _int(doc["window"], f"{path}.window", low=8, high=1_000_000)
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
                raise SpecError(f"{where}: expected true or false; received {_what(value)}")
            params[p.name] = value
        elif p.kind is int:
            params[p.name] = _int(value, where, low=p.low, high=p.high)
        else:
            params[p.name] = _num(value, where, low=p.low, high=p.high)
    return Leaf(trigger=name, label=label, mode=mode, threshold=threshold, params=params, weight=weight, window=window)


def _filters(doc: Any) -> Filters:
    if doc is None:
        return Filters()
    if not isinstance(doc, Mapping):
        raise SpecError(f"filters: expected an object; received {_what(doc)}")
    _keys(doc, "filters", ("classes", "tags"))
    classes = None
    if doc.get("classes") is not None:
        raw = doc["classes"]
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"filters.classes: expected a non-empty list of class indices; received {_what(raw)}")
        classes = frozenset(_int(c, f"filters.classes[{i}]", low=0) for i, c in enumerate(raw))
    tags: dict[str, frozenset[str]] = {}
    raw_tags = doc.get("tags") or {}
    if not isinstance(raw_tags, Mapping):
        raise SpecError(
            f"filters.tags: expected an object of tag -> value or list of values; "
            f"received {_what(raw_tags)}"
        )
    for key, values in raw_tags.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise SpecError(
                f"filters.tags.{key}: expected a string or a non-empty list of strings; "
                f"received {_what(values)}"
            )
        tags[str(key)] = frozenset(values)
    return Filters(classes=classes, tags=tags)


def _dedup(doc: Any) -> DedupSpec | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise SpecError(f"dedup: expected an object; received {_what(doc)}")
    _keys(doc, "dedup", ("max_hamming", "embedding_threshold", "memory", "hash_bits"))
    hash_bits = _int(doc.get("hash_bits", 64), "dedup.hash_bits", low=4, high=64)
    if math.isqrt(hash_bits) ** 2 != hash_bits:
        raise SpecError(f"dedup.hash_bits: expected a square from 4 to 64 (4, 9, ..., 64); received {hash_bits}")
    default_hamming = None if "embedding_threshold" in doc else 4
    max_hamming = doc.get("max_hamming", default_hamming)
    if max_hamming is not None:
        max_hamming = _int(max_hamming, "dedup.max_hamming", low=0, high=hash_bits)
    threshold = doc.get("embedding_threshold")
    if threshold is not None:
        threshold = _num(threshold, "dedup.embedding_threshold", low=0.0, high=2.0)
    if max_hamming is None and threshold is None:
        raise SpecError("dedup: expected 'max_hamming' or 'embedding_threshold' (or both); received neither")
    memory = _int(doc.get("memory", 512), "dedup.memory", low=1, high=100_000)
    return DedupSpec(max_hamming=max_hamming, embedding_threshold=threshold, memory=memory, hash_bits=hash_bits)


def _budgets(doc: Any, labels: list[str]) -> BudgetSpec | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise SpecError(f"budgets: expected an object; received {_what(doc)}")
    _keys(doc, "budgets", ("global", "per_trigger", "per_class"))
    glob = None if doc.get("global") is None else _bucket(doc["global"], "budgets.global")
    per_trigger: dict[str, BucketSpec] = {}
    raw = doc.get("per_trigger") or {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"budgets.per_trigger: expected an object of label -> bucket; received {_what(raw)}")
    for label, sub in raw.items():
        if label not in labels:
            raise SpecError(
                f"budgets.per_trigger: unknown trigger label {label!r}; labels in this spec: {', '.join(labels)}"
            )
        per_trigger[label] = _bucket(sub, f"budgets.per_trigger.{label}")
    per_class: dict[int, BucketSpec] = {}
    raw = doc.get("per_class") or {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"budgets.per_class: expected an object of class index -> bucket; received {_what(raw)}")
    for key, sub in raw.items():
        try:
            cls = int(key)
        except (TypeError, ValueError):
            cls = -1
        if cls < 0 or str(cls) != str(key).strip():
            raise SpecError(f"budgets.per_class: expected class indices such as \"3\" as keys; received {key!r}")
        per_class[cls] = _bucket(sub, f"budgets.per_class.{key}")
    return BudgetSpec(global_bucket=glob, per_trigger=per_trigger, per_class=per_class)


def _bucket(doc: Any, path: str) -> BucketSpec:
    if not isinstance(doc, Mapping):
        example = '{"rate_per_min": 60, "burst": 20}'
        raise SpecError(f"{path}: expected an object such as {example}; received {_what(doc)}")
    _keys(doc, path, (*_RATE_UNITS, "burst"))
    rates = [k for k in _RATE_UNITS if k in doc]
    if len(rates) != 1:
        raise SpecError(f"{path}: expected exactly one of {', '.join(_RATE_UNITS)}; received {rates or 'none'}")
    rate = _num(doc[rates[0]], f"{path}.{rates[0]}", low=0.0) / _RATE_UNITS[rates[0]]
    burst = _num(doc.get("burst", 1), f"{path}.burst", low=1.0, high=1e9)
    return BucketSpec(rate_per_s=rate, burst=burst)


def _expiry(value: Any) -> float | None:
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
    return _num(value, "expires_at", low=0.0)


def _iso(ts: float) -> str:
    text = datetime.fromtimestamp(ts, tz=UTC).isoformat()
    return text.replace("+00:00", "Z")


def _keys(doc: Mapping[str, Any], path: str, allowed: tuple[str, ...], *, required: tuple[str, ...] = (),
          what: str = "keys") -> None:
    for key in doc:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{path}: unknown key {key!r}{hint}; valid {what}: {', '.join(allowed)}")
    for key in required:
        if key not in doc:
            raise SpecError(f"{path}: missing required key {key!r}")


def _num(value: Any, path: str, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{path}: expected a number; received {_what(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise SpecError(f"{path}: expected a finite number; received {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise SpecError(f"{path}: expected a number {_range(low, high)}; received {value!r}")
    return v


def _int(value: Any, path: str, *, low: float | None = None, high: float | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}: expected an integer; received {_what(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SpecError(f"{path}: expected an integer {_range(low, high)}; received {value!r}")
    return value


def _range(low: float | None, high: float | None) -> str:
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if low is not None and high is not None:
        return f"in [{fmt(low)}, {fmt(high)}]"
    if low is not None:
        return f">= {fmt(low)}"
    return f"<= {fmt(high)}" if high is not None else ""


def _what(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _leaves(node: Node) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    return [leaf for child in node.children for leaf in _leaves(child)]
