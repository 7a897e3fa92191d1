"""Trigger specs (campaigns): a versioned, expiring JSON document saying which frames to keep.

:func:`parse_spec` validates a document completely, once, and returns a frozen :class:`Spec`;
every refusal is a :class:`SpecError` whose message gives the path in the document, what was
received and what was expected (an unknown trigger lists the valid ones). Evaluating a spec on
frames is :class:`trigger.evaluate.Evaluator`'s job. The parsed types are defined in
:mod:`trigger.spec_types` and re-exported here; the section parsers are in ``trigger._spec_parse``.

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
     "budgets": {"global": {"rate_per_min": 60, "burst": 20},        # each device's
                 "fleet": {"rate_per_min": 600, "burst": 100},       # all devices together, held by the hub
                 "per_trigger": {"entropy": {"rate_per_min": 30, "burst": 10}},
                 "per_class": {"3": {"rate_per_min": 5, "burst": 5}}}}

A leaf is ``{"trigger": name, <one of "above" | "below" | "target_rate">, <trigger parameters>,
"label": unique name (default: the trigger's), "weight": priority weight in [0, 1],
"window": calibration window}``; ``human_disagreement``, ``challenger_disagreement`` and their
``box_`` counterparts default to ``"above": 0`` (fire whenever they disagree). A spec is for one kind
of model: classifier triggers (entropy, margin...) read logits, detector triggers (``box_*``, e.g.
``{"trigger": "box_flicker", "iou": 0.5, "above": 0.4}``) read boxes, and a spec mixing them is
refused; novelty and random work for both. ``target_rate`` fires on the trigger's interesting
side (see :data:`trigger.triggers.TRIGGERS`). Budgets give exactly one of ``rate_per_s``,
``rate_per_min``, ``rate_per_hour``, ``rate_per_day`` (0 = a lifetime cap of ``burst``) and a
``burst`` (default 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from trigger._spec_parse import (
    NAME_RE,
    check_keys,
    integer,
    number,
    parse_budgets,
    parse_dedup,
    parse_expiry,
    parse_filters,
    parse_rule,
    what,
)
from trigger.spec_types import (
    FORMAT,
    AllOf,
    AnyOf,
    BucketSpec,
    BudgetSpec,
    DedupSpec,
    Filters,
    Leaf,
    Node,
    Spec,
    SpecError,
    leaves_of,
)

__all__ = [
    "FORMAT", "AllOf", "AnyOf", "BucketSpec", "BudgetSpec", "DedupSpec", "Filters", "Leaf", "Node",
    "Spec", "SpecError", "parse_spec",
]

_TOP_KEYS = (
    "format", "id", "version", "expires_at", "description", "temperature", "filters", "rule", "dedup", "budgets",
)


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
        raise SpecError(f"spec: expected a JSON object; received {what(doc)}")
    check_keys(doc, "spec", _TOP_KEYS, required=("id", "version", "rule"))
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        raise SpecError(f"format: expected {FORMAT!r}; received {fmt!r}")
    spec_id = doc["id"]
    if not isinstance(spec_id, str) or not NAME_RE.match(spec_id):
        raise SpecError(
            f"id: expected 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit; received {spec_id!r}"
        )
    version = integer(doc["version"], "version", low=0)
    description = doc.get("description", "")
    if not isinstance(description, str) or len(description) > 2000:
        raise SpecError(f"description: expected a string of at most 2000 characters; received {what(description)}")
    temperature = number(doc.get("temperature", 1.0), "temperature", low=1e-6, high=1e6)
    rule = parse_rule(doc["rule"])
    return Spec(
        id=spec_id,
        version=version,
        rule=rule,
        expires_at=parse_expiry(doc.get("expires_at")),
        description=description,
        temperature=temperature,
        filters=parse_filters(doc.get("filters")),
        dedup=parse_dedup(doc.get("dedup")),
        budgets=parse_budgets(doc.get("budgets"), [leaf.label for leaf in leaves_of(rule)]),
    )
