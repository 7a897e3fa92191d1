"""The field-disagreement rollback's statistical test (fleet.hub.evidence): a one-sided two-proportion z-test,
checked against scipy's own computation and against hand-worked numbers, and the verdict it gates."""

from __future__ import annotations

import math

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# rule 5: Pearson's chi-square test of homogeneity, cross-checked against SciPy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 20, 99])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999])
def test_chi_square_tail_matches_scipy(df: int, q: float) -> None:
    from scipy import stats

    from fleet.hub.evidence import chi_square_sf

    x = float(stats.chi2.ppf(q, df))
    assert chi_square_sf(x, df) == pytest.approx(1.0 - q, abs=2e-3, rel=0.15)


def test_chi_square_homogeneity_matches_scipy_on_the_same_table() -> None:
    from scipy import stats

    from fleet.hub.evidence import chi_square_homogeneity

    rng = np.random.default_rng(3)
    for _ in range(20):
        k = int(rng.integers(2, 12))
        a = rng.integers(0, 60, k)
        b = rng.integers(0, 60, k)
        a[0] += 1
        b[0] += 1
        keep = (a + b) > 0
        chi2, p, df, _ = stats.chi2_contingency(np.stack([a[keep], b[keep]]), correction=False)
        ours = chi_square_homogeneity({str(i): int(v) for i, v in enumerate(a)}, {str(i): int(v) for i, v in
                                                                                   enumerate(b)})
        assert ours[0] == pytest.approx(chi2, rel=1e-9) and ours[1] == df
        assert ours[2] == pytest.approx(p, abs=2e-3, rel=0.15)


def test_shift_verdict_needs_size_distance_significance_and_devices() -> None:
    from fleet.hub.evidence import Predictions, shift_verdict

    cfg = HubSettings(dev=True, rollback_min_compared=50, rollback_min_device_compared=20)
    even = {"0": 100, "1": 100, "2": 100}
    far = {"d1": {"0": 50, "1": 5, "2": 5}, "d2": {"0": 48, "1": 6, "2": 6}}
    assert shift_verdict(cfg, Predictions(far, even), needed=2) is not None
    assert shift_verdict(cfg, Predictions({"d1": {"0": 40, "1": 4, "2": 4}}, even), needed=1) is None  # < 50
    near = {"d1": {"0": 30, "1": 25, "2": 25}, "d2": {"0": 30, "1": 25, "2": 25}}
    assert shift_verdict(cfg, Predictions(near, even), needed=2) is None  # total variation under 0.25
    one = {"d1": {"0": 90, "1": 5, "2": 5}, "d2": {"0": 10, "1": 10, "2": 10}}
    assert shift_verdict(cfg, Predictions(one, even), needed=2) is None  # one device alone shifted
