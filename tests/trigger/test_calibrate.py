"""Rate calibration: the firing rate holds on drifting streams, and batching does not change decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trigger import RateCalibrator

N = 120_000
T = np.arange(N)
RNG = np.random.default_rng(7)
STREAMS = {
    "stationary": RNG.normal(0, 1, N),
    "linear drift of 10 sd": RNG.normal(0, 1, N) + 10 * T / N,
    "step of 3 sd": RNG.normal(0, 1, N) + 3 * (T >= N // 2),
    "spread x4": RNG.normal(0, 1, N) * (1 + 3 * T / N),
    "skewed and drifting": RNG.gamma(2.0, 1.0, N) * (1 + T / N),
}
# Stated tolerance: after warm-up, the overall firing rate is within 5% (relative) of the target and
# every 10,000-frame block within 25%, on every stream above; the one block in which the scores jump
# by 3 sd at once is held within 50% (the window needs a while to forget the old level).
OVERALL_TOL = 0.05
BLOCK_TOL = 0.25
STEP_BLOCK_TOL = 0.5


@pytest.mark.parametrize("name", list(STREAMS))
@pytest.mark.parametrize("target", [0.02, 0.1])
def test_rate_holds_on_drifting_streams(name: str, target: float) -> None:
    values = STREAMS[name]
    cal = RateCalibrator(target)
    fired = np.concatenate([cal.update(values[i : i + 64]) for i in range(0, N, 64)])
    settled = fired[10_000:]
    assert abs(settled.mean() - target) <= OVERALL_TOL * target, settled.mean()
    blocks = settled[: len(settled) // 10_000 * 10_000].reshape(-1, 10_000).mean(axis=1)
    tol = np.full(len(blocks), BLOCK_TOL)
    if name.startswith("step"):
        tol[(N // 2 - 10_000) // 10_000] = STEP_BLOCK_TOL
    assert np.all(np.abs(blocks - target) <= tol * target), blocks


def test_below_direction_fires_on_low_values() -> None:
    values = STREAMS["linear drift of 10 sd"]
    cal = RateCalibrator(0.05, direction="below")
    fired = cal.update(values)
    assert abs(fired[10_000:].mean() - 0.05) < 0.005
    assert values[10_000:][fired[10_000:]].mean() < values[10_000:].mean()


@pytest.mark.parametrize("sizes", [(1,), (7,), (64,), (1, 3, 250, 2, 1000)])
def test_batch_and_streaming_give_identical_decisions(sizes: tuple[int, ...]) -> None:
    values = STREAMS["skewed and drifting"][:20_000].copy()
    values[::97] = np.nan  # unknown values neither fire nor count
    reference = RateCalibrator(0.03, window=2000).update(values)
    cal = RateCalibrator(0.03, window=2000)
    out, i, j = [], 0, 0
    while i < len(values):
        step = sizes[j % len(sizes)]
        out.append(cal.update(values[i : i + step]))
        i, j = i + step, j + 1
    np.testing.assert_array_equal(np.concatenate(out), reference)
    assert not reference[::97].any()


def test_state_survives_a_restart_exactly() -> None:
    values = STREAMS["step of 3 sd"][:30_000]
    whole = RateCalibrator(0.02).update(values)
    first = RateCalibrator(0.02)
    a = first.update(values[:17_321])
    state = json.loads(json.dumps(first.state_dict()))
    second = RateCalibrator(0.02)
    second.load_state_dict(state)
    b = second.update(values[17_321:])
    np.testing.assert_array_equal(np.concatenate([a, b]), whole)
    first.update(values[17_321:])
    assert second.threshold == first.threshold and second.seen == first.seen


def test_warm_up_uses_the_initial_threshold_or_stays_quiet() -> None:
    quiet = RateCalibrator(0.1, warmup=100)
    assert not quiet.update(np.arange(100.0)).any()
    assert quiet.warm and np.isfinite(quiet.threshold)
    seeded = RateCalibrator(0.1, warmup=100, initial_threshold=89.5)
    assert seeded.update(np.arange(100.0)).sum() == 10


def test_refusals() -> None:
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="target_rate"):
            RateCalibrator(bad)
    with pytest.raises(ValueError, match="direction"):
        RateCalibrator(0.1, direction="sideways")
    with pytest.raises(ValueError, match="1 dimensions"):
        RateCalibrator(0.1).update(np.ones((2, 2)))
    with pytest.raises(ValueError, match="not a RateCalibrator state"):
        RateCalibrator(0.1).load_state_dict({"values": [1.0]})
