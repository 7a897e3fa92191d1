"""The rollback rules: what evidence, from how many devices, rolls a candidate back. Pure functions of plain data.

A rollout keeps, per device, what it heard about the candidate (``rollout_device_metrics``): health
failures (NaN outputs, refused or rolled-back installs), OTA failures alone, and human-compared and
-disagreed frames. Only devices that were assigned the candidate are ever counted (see
:mod:`fleet.hub.heartbeats`), so ``needed = min(rollback_min_devices, canary size)`` devices must
agree; a canary of one device is all the evidence there can be. The candidate rolls back when

1. **health**: its health failures reach ``rollback_health_failures`` and come from at least
   ``needed`` devices; or
2. **every device refused it**: every device in the canary reported a refused or rolled-back
   install (so a promotion every device refuses is undone, however small the fleet); or
3. **field disagreement**: with at least ``rollback_min_compared`` human-compared frames on each side
   (a fixed-n design: nothing is tested on fewer), its disagreement is higher than the incumbent's by
   a one-sided two-proportion z-test (pooled variance; Agresti, *Categorical Data Analysis*, 3rd ed.,
   section 1.4 and 2.1.3) at significance ``rollback_alpha``, the gap exceeds ``rollback_margin`` (the
   smallest difference worth a rollback), and each of at least ``needed`` devices on its own
   (with ``rollback_min_device_compared`` frames) disagrees more than the incumbent plus the margin.
   The test is run once a heartbeat, so over a rollout it is looked at repeatedly; ``rollback_alpha``
   (0.01 by default) is set low to keep the false-rollback rate of those repeated looks small.

4. **shadow disagreement, with no human**: canary devices run the candidate with the incumbent in
   shadow, so every frame is a comparison of the two. Both are right where they agree, so on the data
   they were tested on they disagree on at most ``bound`` = the candidate's test error + the incumbent's
   (Boole's inequality over their error events; ``rollback_shadow_bound`` when the manifests carry no test
   accuracy). The candidate rolls back when, over at least ``rollback_min_compared`` shadow comparisons,
   its disagreement exceeds ``bound + rollback_shadow_margin`` by a one-sided one-proportion z-test
   (H0: rate <= bound + margin; Agresti, section 1.3.2) at ``rollback_alpha``, and so does each of at
   least ``needed`` devices with ``rollback_min_device_compared`` comparisons: the two models behave in the
   field as neither does on its test set, which no retrain that held the gate should do.

5. **prediction shift, with no human**: heartbeats carry each device's histogram of the model's predictions
   (frames per top-1 class, and frames with none). With at least ``rollback_min_compared`` predictions on each
   side, the candidate rolls back when its histogram differs from the incumbent's over the same rollout by a total
   variation distance above ``rollback_shift_margin`` (the smallest shift worth a rollback: a better model moves
   some predictions, not most), Pearson's chi-square test of homogeneity on the 2 x k table rejects equal
   distributions at ``rollback_alpha`` (Agresti, section 3.2.1; its p-value by the Wilson-Hilferty normal
   approximation of the chi-square tail, Johnson, Kotz & Balakrishnan, *Continuous Univariate Distributions* 1,
   eq. 18.24, within 1e-3 of the exact tail where it matters, tested against SciPy), and at least ``needed``
   devices with ``rollback_min_device_compared`` predictions each shift that far on their own.

The reason names the test, its figures and the devices the evidence came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fleet.hub.settings import HubSettings

SHOWN_DEVICES = 10


@dataclass(frozen=True)
class Pooled:
    """Human-compared frames and disagreements: summed for a version, or one device's (below)."""

    human_compared: int = 0
    human_disagreed: int = 0

    @property
    def disagreement(self) -> float:
        return self.human_disagreed / self.human_compared if self.human_compared else 0.0


@dataclass(frozen=True)
class DeviceEvidence(Pooled):
    """What one device reported about the candidate during the rollout."""

    device_id: str = ""
    health_failures: int = 0
    ota_failures: int = 0
    challenger_compared: int = 0  # frames compared with the incumbent in shadow
    challenger_agreed: int = 0

    @property
    def shadow(self) -> Pooled:
        """Shadow comparisons with the incumbent, a disagreement where the two differ."""
        return Pooled(self.challenger_compared, self.challenger_compared - self.challenger_agreed)


@dataclass(frozen=True)
class ShadowBound:
    """The most shadow disagreement the candidate and incumbent can show on data like their test sets, and
    where the figure comes from (for the reason)."""

    rate: float
    source: str


@dataclass(frozen=True)
class Predictions:
    """Rule 5's evidence: the candidate's prediction histogram per device in the rollout (label -> frames), and
    the incumbent's, summed over the same rollout."""

    candidate: dict[str, dict[str, int]]
    incumbent: dict[str, int]


def verdict(cfg: HubSettings, devices: list[DeviceEvidence], *, canary_size: int, candidate: Pooled,
            incumbent: Pooled | None, shadow: ShadowBound | None = None,
            predictions: Predictions | None = None) -> str | None:
    """Why the candidate must roll back (naming the devices), or None if the evidence does not say so."""
    needed = max(1, min(cfg.rollback_min_devices, canary_size))
    why = _human_verdict(cfg, devices, needed, canary_size=canary_size, candidate=candidate, incumbent=incumbent)
    if why is None and shadow is not None:
        why = shadow_verdict(cfg, devices, needed, shadow)
    if why is None and predictions is not None:
        why = shift_verdict(cfg, predictions, needed)
    return why


def shift_verdict(cfg: HubSettings, evidence: Predictions, needed: int) -> str | None:
    """Rule 5: the candidate's predictions are distributed unlike the incumbent's, by far and significantly."""
    pooled: dict[str, int] = {}
    for hist in evidence.candidate.values():
        for k, v in hist.items():
            pooled[k] = pooled.get(k, 0) + v
    n_cand, n_inc = sum(pooled.values()), sum(evidence.incumbent.values())
    if n_cand < cfg.rollback_min_compared or n_inc < cfg.rollback_min_compared:
        return None
    tvd = total_variation(pooled, evidence.incumbent)
    if tvd <= cfg.rollback_shift_margin:
        return None
    chi2, df, p = chi_square_homogeneity(pooled, evidence.incumbent)
    if p >= cfg.rollback_alpha:
        return None
    shifted = sorted(((dev, round(total_variation(h, evidence.incumbent), 3)) for dev, h in evidence.candidate.items()
                      if sum(h.values()) >= cfg.rollback_min_device_compared
                      and total_variation(h, evidence.incumbent) > cfg.rollback_shift_margin),
                     key=lambda x: (-x[1], x[0]))
    if len(shifted) < needed:
        return None
    top = sorted(pooled, key=lambda k: -pooled[k])[:3]
    shown = ", ".join(f"{k}: {pooled[k] / n_cand:.2f} vs {evidence.incumbent.get(k, 0) / n_inc:.2f}" for k in top)
    return (f"prediction distribution shifted from the incumbent's: total variation {tvd:.3f} > margin "
            f"{cfg.rollback_shift_margin} over {n_cand} vs {n_inc} predictions ({shown}; Pearson chi-square test of "
            f"homogeneity: chi2 = {chi2:.1f}, df = {df}, p = {p:.2g} < alpha {cfg.rollback_alpha}; no human needed), "
            f"and so does each of {len(shifted)} devices (evidence needed from {needed}): {_shown(shifted)}")


def total_variation(a: dict[str, int], b: dict[str, int]) -> float:
    """Half the L1 distance between the two histograms' distributions (0 = the same, 1 = disjoint)."""
    na, nb = sum(a.values()), sum(b.values())
    if na <= 0 or nb <= 0:
        return 0.0
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def chi_square_homogeneity(a: dict[str, int], b: dict[str, int]) -> tuple[float, int, float]:
    """``(chi2, df, p)`` of Pearson's test that two histograms come from one distribution: the 2 x k table of
    their counts (labels neither side saw dropped), df = k - 1, p the upper tail by Wilson-Hilferty."""
    labels = sorted(k for k in set(a) | set(b) if a.get(k, 0) + b.get(k, 0) > 0)
    na, nb = sum(a.get(k, 0) for k in labels), sum(b.get(k, 0) for k in labels)
    if na <= 0 or nb <= 0:
        raise ValueError(f"both histograms need counts; received {na} and {nb}")
    n = na + nb
    chi2 = 0.0
    for k in labels:
        col = a.get(k, 0) + b.get(k, 0)
        for observed, row in ((a.get(k, 0), na), (b.get(k, 0), nb)):
            expected = row * col / n
            chi2 += (observed - expected) ** 2 / expected
    df = len(labels) - 1
    return chi2, df, chi_square_sf(chi2, df)


def chi_square_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): exact for df 1 and 2, else the Wilson-Hilferty cube-root normal
    approximation."""
    if df <= 0:
        return 1.0
    if x <= 0:
        return 1.0
    if df == 1:
        return math.erfc(math.sqrt(x / 2.0))
    if df == 2:
        return math.exp(-x / 2.0)
    h = 2.0 / (9.0 * df)
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def shadow_verdict(cfg: HubSettings, devices: list[DeviceEvidence], needed: int, bound: ShadowBound) -> str | None:
    """Rule 4: the candidate disagrees with the incumbent in shadow more than both models' test errors allow."""
    pooled = Pooled(sum(d.challenger_compared for d in devices),
                    sum(d.challenger_compared - d.challenger_agreed for d in devices))
    limit = bound.rate + cfg.rollback_shadow_margin
    if pooled.human_compared < cfg.rollback_min_compared or not 0.0 < limit < 1.0 or pooled.disagreement <= limit:
        return None
    z, p = one_proportion_z(pooled, limit)
    if p >= cfg.rollback_alpha:
        return None
    dissent = _dissenting(devices, lambda d: d.shadow, min_compared=cfg.rollback_min_device_compared, above=limit)
    if len(dissent) < needed:
        return None
    return (f"shadow disagreement with the incumbent {pooled.disagreement:.3f} over {pooled.human_compared} frames "
            f"exceeds {limit:.3f}, the most {bound.source} allow ({bound.rate:.3f}) + margin "
            f"{cfg.rollback_shadow_margin} (one-sided one-proportion z-test: z = {z:.2f}, p = {p:.2g} < alpha "
            f"{cfg.rollback_alpha}; no human needed), and so does each of {len(dissent)} devices (evidence needed "
            f"from {needed}): {_shown(dissent)}")


def _dissenting(devices: list[DeviceEvidence], side: Callable[[DeviceEvidence], Pooled], *, min_compared: int,
                above: float) -> list[tuple[str, object]]:
    """(device, its rate) of each device whose ``side`` holds ``min_compared`` frames at a rate above ``above``,
    most frames first."""
    hits = sorted(((d.device_id, side(d)) for d in devices), key=lambda x: (-x[1].human_compared, x[0]))
    return [(dev, round(p.disagreement, 3)) for dev, p in hits
            if p.human_compared >= min_compared and p.disagreement > above]


def one_proportion_z(a: Pooled, p0: float) -> tuple[float, float]:
    """``(z, p)`` of the one-sided test that ``a``'s rate is higher than ``p0``: z = (rate - p0) / sqrt(p0 (1 -
    p0) / n) and its upper-tail normal p-value."""
    if a.human_compared <= 0:
        raise ValueError(f"the test needs compared frames; received {a.human_compared}")
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"the rate under test must be in (0, 1); received {p0}")
    z = (a.disagreement - p0) / math.sqrt(p0 * (1.0 - p0) / a.human_compared)
    return z, 0.5 * math.erfc(z / math.sqrt(2.0))


def _human_verdict(cfg: HubSettings, devices: list[DeviceEvidence], needed: int, *, canary_size: int,
                   candidate: Pooled, incumbent: Pooled | None) -> str | None:
    """Rules 1-3."""
    failing = sorted((d for d in devices if d.health_failures > 0), key=lambda d: (-d.health_failures, d.device_id))
    total = sum(d.health_failures for d in failing)
    if total >= cfg.rollback_health_failures and len(failing) >= needed:
        return (f"health failures {total} from {len(failing)} devices reached the threshold "
                f"{cfg.rollback_health_failures} (evidence needed from {needed} devices): "
                f"{_shown([(d.device_id, d.health_failures) for d in failing])}")
    refused = sorted(d.device_id for d in devices if d.ota_failures > 0)
    if canary_size > 0 and len(refused) >= canary_size:
        return (f"every device in the canary ({canary_size}) refused or rolled back the install: "
                f"{_shown([(d, 1) for d in refused], counts=False)}")
    if incumbent is None or candidate.human_compared < cfg.rollback_min_compared:
        return None
    if incumbent.human_compared < cfg.rollback_min_compared:
        return None
    gap = candidate.disagreement - incumbent.disagreement
    if gap <= cfg.rollback_margin:
        return None
    z, p = two_proportion_z(candidate, incumbent)
    if p >= cfg.rollback_alpha:
        return None
    bar = incumbent.disagreement + cfg.rollback_margin
    dissent = _dissenting(devices, lambda d: d, min_compared=cfg.rollback_min_device_compared, above=bar)
    if len(dissent) < needed:
        return None
    return (f"field disagreement {candidate.disagreement:.3f} over {candidate.human_compared} frames exceeds the "
            f"incumbent's {incumbent.disagreement:.3f} over {incumbent.human_compared} by {gap:.3f} > margin "
            f"{cfg.rollback_margin} (one-sided two-proportion z-test: z = {z:.2f}, p = {p:.2g} < alpha "
            f"{cfg.rollback_alpha}), and so does each of {len(dissent)} devices (evidence needed from {needed}): "
            f"{_shown(dissent)}")


def two_proportion_z(a: Pooled, b: Pooled) -> tuple[float, float]:
    """``(z, p)`` of the one-sided test that ``a``'s disagreement rate is higher than ``b``'s: pooled
    two-proportion z statistic and its upper-tail normal p-value. Both need compared frames."""
    if a.human_compared <= 0 or b.human_compared <= 0:
        raise ValueError(f"both sides need compared frames; received {a.human_compared} and {b.human_compared}")
    pooled = (a.human_disagreed + b.human_disagreed) / (a.human_compared + b.human_compared)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / a.human_compared + 1.0 / b.human_compared))
    gap = a.disagreement - b.disagreement
    if se == 0.0:  # both sides all agree or all disagree: no variance, the gap is certain
        return (math.inf if gap > 0 else 0.0), (0.0 if gap > 0 else 1.0)
    z = gap / se
    return z, 0.5 * math.erfc(z / math.sqrt(2.0))


def _shown(items: list[tuple[str, object]], *, counts: bool = True) -> str:
    parts = [f"{name} ({value})" if counts else name for name, value in items[:SHOWN_DEVICES]]
    more = len(items) - SHOWN_DEVICES
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def rate_violation(deltas: dict[str, int], *, elapsed_s: float, max_rate_per_s: float, grace_s: float) -> str | None:
    """Why these heartbeat deltas cannot be real (a counter rose faster than a device counts), or None."""
    allowed = max_rate_per_s * (max(0.0, elapsed_s) + grace_s)
    over = {k: v for k, v in deltas.items() if v > allowed}
    if not over:
        return None
    shown = ", ".join(f"{k} rose by {v}" for k, v in sorted(over.items()))
    return (f"heartbeat counters rose faster than a device can count: {shown} in {elapsed_s:.1f} s since this "
            f"device's last heartbeat; at most {max_rate_per_s:g} per second plus {grace_s:g} s of slack "
            f"({allowed:.0f}) is plausible. Nothing was recorded")
