"""The parsed trigger spec: frozen types with their canonical JSON (``to_dict``).

The document format, and :func:`trigger.spec.parse_spec` that builds these types from it, are in
:mod:`trigger.spec`; the types are defined here so that the parser and the evaluator can both
stand on them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Union

from trigger.triggers import TRIGGERS, TriggerDef

__all__ = [
    "FORMAT", "AllOf", "AnyOf", "BucketSpec", "BudgetSpec", "DedupSpec", "Filters", "Leaf", "Node", "Spec",
    "SpecError", "leaves_of",
]

FORMAT = "flywheel.trigger/1"


class SpecError(ValueError):
    """A trigger spec that cannot be used; the message says where, what was received and what was expected."""


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
    """The campaign's upload budgets: ``global``, ``per_trigger`` and ``per_class`` each device keeps to by itself;
    ``fleet`` caps the campaign's uploads from all its devices together, held by the hub (429 + Retry-After,
    fleet.hub.quota)."""

    global_bucket: BucketSpec | None = None
    per_trigger: Mapping[str, BucketSpec] = field(default_factory=dict)
    per_class: Mapping[int, BucketSpec] = field(default_factory=dict)
    fleet_bucket: BucketSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.global_bucket is not None:
            out["global"] = self.global_bucket.to_dict()
        if self.per_trigger:
            out["per_trigger"] = {k: v.to_dict() for k, v in sorted(self.per_trigger.items())}
        if self.per_class:
            out["per_class"] = {str(k): v.to_dict() for k, v in sorted(self.per_class.items())}
        if self.fleet_bucket is not None:
            out["fleet"] = self.fleet_bucket.to_dict()
        return out


@dataclass(frozen=True)
class Spec:
    """A validated trigger spec. Build with :func:`trigger.spec.parse_spec`; :meth:`to_dict` is its canonical JSON."""

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
        return leaves_of(self.rule)

    @property
    def labels(self) -> tuple[str, ...]:
        """The leaves' labels (the names reported when they fire), in document order."""
        return tuple(leaf.label for leaf in self.leaves)

    @property
    def task(self) -> str | None:
        """The kind of model the spec's triggers read: "classify" (logits), "detect" (boxes), or None (either:
        novelty and random alone). :func:`trigger.spec.parse_spec` refuses a spec that mixes the two."""
        return next((leaf.definition.task for leaf in self.leaves if leaf.definition.task is not None), None)

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


def leaves_of(node: Node) -> tuple[Leaf, ...]:
    """Every trigger leaf under ``node``, in document order."""
    if isinstance(node, Leaf):
        return (node,)
    return tuple(leaf for child in node.children for leaf in leaves_of(child))


def _iso(ts: float) -> str:
    text = datetime.fromtimestamp(ts, tz=UTC).isoformat()
    return text.replace("+00:00", "Z")
