"""The field-disagreement rollback's statistical test (fleet.hub.evidence): a one-sided two-proportion z-test,
checked against scipy's own computation and against hand-worked numbers, and the verdict it gates."""

from __future__ import annotations

import math

import pytest

from fleet.hub.evidence import DeviceEvidence, Pooled, two_proportion_z, verdict
from fleet.hub.settings import HubSettings


def test_the_z_test_matches_a_hand_computation_and_scipy() -> None:
    # 60 of 200 vs 40 of 200: pooled 0.25, se = sqrt(0.25 * 0.75 * (2 / 200)) = 0.0433, z = 0.10 / 0.0433 = 2.309
    z, p = two_proportion_z(Pooled(200, 60), Pooled(200, 40))
    assert z == pytest.approx(0.1 / math.sqrt(0.25 * 0.75 * 0.01), rel=1e-12) == pytest.approx(2.3094, abs=1e-4)
    assert p == pytest.approx(0.010461, abs=1e-5)  # the upper tail of the standard normal at 2.3094
    scipy_stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(float(scipy_stats.norm.sf(z)), rel=1e-9)
    # scipy's own two-sample test of proportions agrees: the chi-square test without continuity correction
    # is the square of the pooled z, and its p-value is twice the one-sided one
    chi2, p2, _, _ = scipy_stats.chi2_contingency([[60, 140], [40, 160]], correction=False)
    assert chi2 == pytest.approx(z * z, rel=1e-9) and p2 == pytest.approx(2 * p, rel=1e-9)
    assert two_proportion_z(Pooled(10, 0), Pooled(10, 0)) == (0.0, 1.0)  # no variance, no gap
    assert two_proportion_z(Pooled(10, 10), Pooled(10, 0))[1] < 1e-3
    with pytest.raises(ValueError, match="both sides need compared frames"):
        two_proportion_z(Pooled(0, 0), Pooled(10, 1))


def devices(n: int, compared: int, disagreed: int) -> list[DeviceEvidence]:
    return [DeviceEvidence(compared, disagreed, device_id=f"d{i}") for i in range(n)]


def test_a_gap_over_the_margin_rolls_back_only_when_it_is_significant() -> None:
    cfg = HubSettings(rollback_min_compared=200, rollback_margin=0.05, rollback_alpha=0.01)
    incumbent = Pooled(200, 40)  # 20%
    # 28.5% vs 20% on 200 frames each: a gap of 0.085 > margin, but z = 2.0, p = 0.023, not below 0.01
    weak = verdict(cfg, devices(4, 50, 15), canary_size=4, candidate=Pooled(200, 57), incumbent=incumbent)
    assert weak is None
    # 31% vs 20% on 200 frames each: z = 2.5, p = 0.006 < 0.01
    strong = verdict(cfg, devices(4, 50, 16), canary_size=4, candidate=Pooled(200, 62), incumbent=incumbent)
    assert strong is not None and "one-sided two-proportion z-test: z = 2.5" in strong
    assert "p = 0.0058" in strong and "< alpha 0.01" in strong and "over 200 by 0.110" in strong
    # the same rates on 4x the frames are significant at once; below the minimum nothing is tested
    assert verdict(cfg, devices(4, 200, 57), canary_size=4, candidate=Pooled(800, 228), incumbent=Pooled(800, 160))
    assert verdict(cfg, devices(4, 50, 40), canary_size=4, candidate=Pooled(199, 150), incumbent=incumbent) is None
    # a looser alpha lets the weaker evidence through
    loose = HubSettings(rollback_min_compared=200, rollback_margin=0.05, rollback_alpha=0.05)
    assert verdict(loose, devices(4, 50, 15), canary_size=4, candidate=Pooled(200, 57), incumbent=incumbent)


def test_the_one_proportion_z_test_matches_a_hand_computation_and_scipy() -> None:
    from fleet.hub.evidence import one_proportion_z

    # 90 of 200 against 0.35: se = sqrt(0.35 * 0.65 / 200) = 0.033727, z = (0.45 - 0.35) / 0.033727 = 2.9650
    z, p = one_proportion_z(Pooled(200, 90), 0.35)
    assert z == pytest.approx(0.10 / math.sqrt(0.35 * 0.65 / 200), rel=1e-12) == pytest.approx(2.9650, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(float(scipy_stats.norm.sf(z)), rel=1e-9) == pytest.approx(0.001513, abs=1e-5)
    # the exact binomial test agrees in size on this sample (the normal approximation is fair here)
    exact = scipy_stats.binomtest(90, 200, 0.35, alternative="greater").pvalue
    assert 0.5 * exact < p < 2 * exact
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            one_proportion_z(Pooled(10, 1), bad)
    with pytest.raises(ValueError, match="needs compared frames"):
        one_proportion_z(Pooled(0, 0), 0.3)


def shadow_devices(n: int, compared: int, agreed: int) -> list[DeviceEvidence]:
    return [DeviceEvidence(device_id=f"d{i}", challenger_compared=compared, challenger_agreed=agreed) for i in range(n)]


def test_shadow_disagreement_rolls_back_without_humans_only_beyond_what_the_test_errors_allow() -> None:
    from fleet.hub.evidence import ShadowBound

    cfg = HubSettings(rollback_min_compared=200, rollback_shadow_margin=0.10, rollback_alpha=0.01)
    bound = ShadowBound(0.25, "the test errors (0.100 + 0.150)")  # so the limit is 0.35
    none = Pooled()
    # 45% of 200 frames against 0.35: z = 2.96, p = 0.0015 < 0.01, every device beyond the limit
    why = verdict(cfg, shadow_devices(4, 50, 27), canary_size=4, candidate=none, incumbent=None, shadow=bound)
    assert why is not None and why.startswith("shadow disagreement with the incumbent 0.460 over 200 frames")
    assert "exceeds 0.350, the most the test errors (0.100 + 0.150) allow (0.250) + margin 0.1" in why
    assert "one-sided one-proportion z-test: z = " in why and "no human needed" in why and "of 4 devices" in why
    # within the limit, or beyond it but not significantly, or on too few frames: nothing
    assert verdict(cfg, shadow_devices(4, 50, 33), canary_size=4, candidate=none, incumbent=None, shadow=bound) is None
    assert verdict(cfg, shadow_devices(4, 50, 30), canary_size=4, candidate=none, incumbent=None, shadow=bound) is None
    assert verdict(cfg, shadow_devices(3, 66, 20), canary_size=3, candidate=none, incumbent=None, shadow=bound) is None
    # one device alone cannot do it when the canary holds more (rollback_min_devices = 2)
    lone = [*shadow_devices(1, 200, 20), *shadow_devices(3, 10, 10)]
    assert verdict(cfg, lone, canary_size=4, candidate=none, incumbent=None, shadow=bound) is None
    # without a bound (no test accuracies, no rollback_shadow_bound) the rule does not apply
    assert verdict(cfg, shadow_devices(4, 50, 0), canary_size=4, candidate=none, incumbent=None) is None
    # a bound so loose that nothing can exceed it: no test
    loose = ShadowBound(0.95, "x")
    assert verdict(cfg, shadow_devices(4, 50, 0), canary_size=4, candidate=none, incumbent=None, shadow=loose) is None
