"""The error-capture benchmark's metrics on hand-worked examples: capture, random, oracle, AUROC."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from tests.benchmarks import BENCHMARKS, load_bench

bec = load_bench("bench_error_capture")


def test_upload_count_rounds_half_up_and_refuses_bad_budgets() -> None:
    assert bec.upload_count(100, 0.05) == 5
    assert bec.upload_count(4951, 0.01) == 50  # 49.51 -> 50
    assert bec.upload_count(250, 0.01) == 3  # 2.5 -> 3 (half up, not to even)
    assert bec.upload_count(10, 0.0) == 0
    with pytest.raises(ValueError, match="received 1.5"):
        bec.upload_count(10, 1.5)


def test_capture_hand_worked() -> None:
    # 10 frames, 4 errors (frames 0, 3, 5, 9); the score ranks 3, 5, 1, 0, ... first
    errors = np.array([1, 0, 0, 1, 0, 1, 0, 0, 0, 1], bool)
    scores = np.array([0.6, 0.7, 0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.05, 0.4])
    assert bec.capture(scores, errors, 0.1) == pytest.approx(1 / 4)  # uploads frame 3
    assert bec.capture(scores, errors, 0.2) == pytest.approx(2 / 4)  # 3, 5
    assert bec.capture(scores, errors, 0.3) == pytest.approx(2 / 4)  # 3, 5, 1 (a miss)
    assert bec.capture(scores, errors, 0.4) == pytest.approx(3 / 4)  # + frame 0
    assert bec.capture(scores, errors, 1.0) == pytest.approx(1.0)
    assert bec.capture(scores, errors, 0.0) == 0.0
    assert math.isnan(bec.capture(scores, np.zeros(10, bool), 0.5))


def test_capture_ties_go_to_the_earlier_frame_and_nan_ranks_last() -> None:
    errors = np.array([0, 1, 1, 0], bool)
    assert bec.capture([1.0, 1.0, 1.0, 1.0], errors, 0.25) == 0.0  # frame 0 wins the tie
    assert bec.capture([np.nan, 1.0, 1.0, 0.0], np.array([1, 0, 0, 0], bool), 0.75) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        bec.capture([1.0, 2.0], [True], 0.5)


def test_random_and_oracle() -> None:
    assert bec.random_capture(0.05) == 0.05
    assert bec.oracle_capture(0.05, 0.25) == pytest.approx(0.2)  # 5% of frames, all errors: a fifth of them
    assert bec.oracle_capture(0.10, 0.05) == 1.0  # the budget covers every error
    assert bec.oracle_capture(0.01, 0.0) == 1.0
    with pytest.raises(ValueError):
        bec.oracle_capture(-0.1, 0.2)


def test_evaluate_ratio_is_one_for_a_perfect_score_and_the_budget_over_oracle_for_random() -> None:
    rng = np.random.default_rng(0)
    errors = rng.random(1000) < 0.2
    perfect = bec.evaluate("g", "perfect", errors.astype(float), errors, budgets=(0.01, 0.05, 0.1, 0.5))
    assert all(v == pytest.approx(1.0) for v in perfect.ratio.values())
    assert perfect.auroc == 1.0
    # a score that ranks every error last captures nothing until the budget reaches the correct frames' end
    worst = bec.evaluate("g", "worst", (~errors).astype(float), errors, budgets=(0.05,))
    assert worst.ratio[0.05] == 0.0 and worst.auroc == 0.0
    # rounding the number of uploads never lets a score beat the oracle (oracle at the budget spent)
    odd = np.zeros(4951, bool)
    odd[:1146] = True
    r = bec.evaluate("g", "perfect", odd.astype(float), odd, budgets=(0.01,))
    assert r.ratio[0.01] == pytest.approx(1.0)


def test_auroc_hand_worked() -> None:
    # positives at 0.9, 0.4; negatives at 0.8, 0.3, 0.1: pairs won 1 + 1 + 1 + 0 + 1 + 1 = 5 of 6
    s = [0.9, 0.8, 0.4, 0.3, 0.1]
    y = [True, False, True, False, False]
    assert bec.auroc(s, y) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts one half
    assert bec.auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert bec.auroc([0.7, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx((2 + 1.5) / 4)
    assert bec.auroc([0.1, 0.9], [True, False]) == 0.0
    assert math.isnan(bec.auroc([0.1, 0.2], [True, True]))


def test_auroc_matches_sklearn_on_random_scores_with_ties() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.3
    s = np.round(rng.random(500) + 0.5 * y, 1)  # coarse values: many ties
    assert bec.auroc(s, y) == pytest.approx(metrics.roc_auc_score(y, s))


def test_importing_the_benchmark_does_not_import_torch() -> None:
    import subprocess

    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('b', {str(BENCHMARKS / 'bench_error_capture.py')!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m; spec.loader.exec_module(m); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
