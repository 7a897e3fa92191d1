"""Budgets that follow yield: a campaign whose ``budgets.per_trigger`` is ``"auto"`` has the hub share its
global upload rate among its triggers by what their uploads turned out to be worth (:mod:`fleet.hub.yields`).

The rule is Thompson sampling's probability matching (Russo et al., "A Tutorial on Thompson Sampling", 2018,
section 3): each trigger's yield (errors found / labeled) has a Beta(1 + errors, 1 + labeled - errors)
posterior; a trigger's share of the budget is the probability, under those posteriors, that it has the highest
yield (estimated with :data:`DRAWS` joint draws), mixed with an exploration floor: share = floor / n +
(1 - floor) * P(best), so no trigger is starved and one with no labels yet keeps being tried. A trigger's
bucket is its share of the global rate and burst, so the shares always sum to the global rate: the total
upload rate is held while it moves between triggers.

:func:`rebalance` publishes new shares as a new campaign version (the spec's ``version`` bumped, the same
groups and bank), which devices pick up with their next assignment, when some share moved by at least
:data:`MIN_MOVE`; otherwise nothing changes. The hub runs it on ``POST /v1/campaigns/{id}/rebalance`` and
``flywheel campaigns rebalance``. The draws use a seed fixed per (campaign, version), so a rebalance is
reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlmodel import Session

from fleet.errors import ProtocolError
from fleet.hub.campaign_versions import latest_live, next_version
from fleet.hub.models import Campaign
from fleet.hub.yields import trigger_yields

AUTO = "auto"
FLOOR = 0.2  # the share of the budget spread evenly over the triggers, whatever their yield
MIN_MOVE = 0.02  # a new version only when some trigger's share moved by this much
DRAWS = 20_000


def thompson_shares(stats: Mapping[str, tuple[int, int]], *, floor: float = FLOOR, draws: int = DRAWS,
                    seed: int = 0) -> dict[str, float]:
    """Each trigger's share of the budget from its ``(labeled, errors)``: ``floor / n + (1 - floor) * P(best)``
    (see the module doc). Shares sum to 1; the order of ``stats`` does not matter."""
    if not stats:
        raise ValueError("thompson_shares needs at least one trigger")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1]; received {floor}")
    names = sorted(stats)
    labeled = np.asarray([stats[n][0] for n in names], np.float64)
    errors = np.asarray([stats[n][1] for n in names], np.float64)
    if (errors < 0).any() or (errors > labeled).any():
        raise ValueError(f"each trigger needs 0 <= errors <= labeled; received {dict(stats)}")
    rng = np.random.default_rng(seed)
    samples = rng.beta(1.0 + errors, 1.0 + labeled - errors, size=(draws, len(names)))
    best = np.bincount(samples.argmax(axis=1), minlength=len(names)) / draws
    shares = floor / len(names) + (1.0 - floor) * best
    return {n: float(s) for n, s in zip(names, shares / shares.sum(), strict=True)}


def resolve_auto(doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A posted spec document with ``budgets.per_trigger: "auto"`` replaced by even shares of the global
    bucket, and whether it was auto. Refused (ProtocolError) without a global bucket to share."""
    budgets = doc.get("budgets")
    if not isinstance(budgets, dict) or budgets.get("per_trigger") != AUTO:
        return doc, False
    if not isinstance(budgets.get("global"), dict):
        raise ProtocolError('budgets.per_trigger "auto" shares the global budget among the triggers; received no '
                            'budgets.global (add one, e.g. {"rate_per_min": 60, "burst": 20})')
    from trigger import SpecError, parse_spec

    even = {**doc, "budgets": {k: v for k, v in budgets.items() if k != "per_trigger"}}
    try:
        spec = parse_spec(even)
    except SpecError as exc:
        raise ProtocolError(f"invalid trigger spec: {exc}") from exc
    labels = spec.labels
    return with_shares(spec.to_dict(), {label: 1.0 / len(labels) for label in labels}), True


def rebalance(s: Session, campaign_id: str, *, now: float) -> tuple[Campaign, bool]:
    """Move an auto campaign's trigger budgets towards yield (module doc). Returns the newest version and
    whether it is new. NotFound for no live campaign; ProtocolError for one whose budgets are not auto."""
    row = latest_live(s, campaign_id)
    if not row.auto_budgets:
        raise ProtocolError(f"campaign {campaign_id!r} v{row.version} has fixed budgets; post it with "
                            f'budgets.per_trigger "auto" to let the hub move them')
    current = shares_of(row.spec)
    found = {y.trigger: (y.labeled, y.errors) for y in trigger_yields(s, campaign_id=campaign_id).yields}
    seed = int.from_bytes(hashlib.sha256(f"{campaign_id}/{row.version}".encode()).digest()[:4], "big")
    shares = thompson_shares({k: found.get(k, (0, 0)) for k in current}, seed=seed)
    if max(abs(shares[k] - current[k]) for k in current) < MIN_MOVE:
        return row, False
    return next_version(s, row, with_shares(row.spec, shares), now=now), True


def shares_of(doc: dict[str, Any]) -> dict[str, float]:
    """Each trigger's share of a spec document's per-trigger rates (even shares when they are all 0)."""
    rates = {k: float(v["rate_per_s"]) for k, v in doc["budgets"]["per_trigger"].items()}
    total = sum(rates.values())
    return {k: (v / total if total else 1.0 / len(rates)) for k, v in rates.items()}


def with_shares(doc: dict[str, Any], shares: Mapping[str, float]) -> dict[str, Any]:
    """``doc`` (a canonical spec document with a global bucket) with per-trigger buckets: each trigger's share
    of the global rate and burst (a burst of at least 1)."""
    glob = doc["budgets"]["global"]
    per = {k: {"rate_per_s": round(float(glob["rate_per_s"]) * v, 9), "burst": max(1.0, float(glob["burst"]) * v)}
           for k, v in sorted(shares.items())}
    return {**doc, "budgets": {**doc["budgets"], "per_trigger": per}}
