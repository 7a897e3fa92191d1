"""The label-efficiency benchmarks (``bench_label_efficiency.py``, ``bench_peer_strategies.py``): the labels-to-reach
measure on hand-worked curves, and every option reaching the demo's settings (the demo itself stands in: it runs for
minutes; tests/sim runs the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.sim.report import ArmResult, TurnResult
from tests.benchmarks import load_bench

eff = load_bench("bench_label_efficiency")
peers = load_bench("bench_peer_strategies")


def test_labels_to_reach_interpolates_between_turns() -> None:
    curve = [(0, 0.40), (20, 0.50), (40, 0.60), (60, 0.55)]
    assert eff.labels_to_reach(curve, 0.55) == pytest.approx(30.0)  # halfway from 0.50 at 20 to 0.60 at 40
    assert eff.labels_to_reach(curve, 0.40) == 0.0
    assert eff.labels_to_reach(curve, 0.60) == pytest.approx(40.0)
    assert eff.labels_to_reach(curve, 0.61) is None  # never reached


@pytest.fixture
def demo_settings(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replaces the demo with one that records its settings and returns a made-up curve per arm."""
    import fleet.sim.demo as demo

    seen: list = []

    def fake_run_demo(settings, *, progress=None, **_):
        seen.append(settings)
        turns = [TurnResult(turn=t, flywheel=ArmResult(0.5 + 0.1 * t, {}, settings.budget * t),
                            random=ArmResult(0.5 + 0.05 * t, {}, settings.budget * t))
                 for t in range(settings.turns + 1)]
        return turns, settings.workspace / "report" / "index.html"

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    return seen


def test_the_peer_benchmark_passes_every_demo_option_on(demo_settings: list, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "RESULTS.md"
    assert peers.main(["--seeds", "3", "--strategies", "uncertainty+diversity", "typiclust", "--turns", "2",
                       "--budget", "10", "--seed-size", "30", "--replay-ratio", "0.5", "--new-repeats", "3",
                       "--balance", "none", "--devices", "2", "--frames-per-device", "50", "--append", str(out)]) == 0
    assert [s.strategy for s in demo_settings] == ["uncertainty+diversity", "typiclust"]
    for s in demo_settings:
        assert (s.seed, s.turns, s.budget, s.seed_size, s.replay_ratio, s.new_repeats, s.balance, s.devices,
                s.frames_per_device, s.labeler) == (3, 2, 10, 30, 0.5, 3, "none", 2, 50, "oracle")
    text = out.read_text()
    # 0.5 -> 0.6 -> 0.7 against random's final 0.6 at 20 labels: 10 labels, 0.50 of random's
    assert "| 3 | 0.50 (0.700) | 0.50 (0.700) | 0.600 |" in text
    assert "seed set mostly clear (30 frames)" in text
    assert "No target: it compares `uncertainty+diversity` with the peers" in text  # typiclust is not a peer
    assert "over the whole pool" in text
    assert "0.50 (0.700)" in capsys.readouterr().out


def test_the_label_efficiency_benchmark_passes_the_seed_size_on(demo_settings: list, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    assert eff.main(["--seeds", "0", "1", "--turns", "1", "--budget", "20", "--seed-size", "40",
                     "--append", str(out)]) == 0
    assert [(s.seed, s.seed_size, s.strategy) for s in demo_settings] == \
        [(0, 40, "uncertainty+diversity"), (1, 40, "uncertainty+diversity")]
    text = out.read_text()
    assert "seed set mostly clear (40 frames)" in text
    assert "Target <= 0.60 of random's labels (re-scored pool): met" in text


def test_the_demo_s_own_seed_set_is_named_when_none_is_given(demo_settings: list, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    assert eff.main(["--seeds", "0", "--turns", "1", "--append", str(out)]) == 0
    assert demo_settings[0].seed_size is None
    text = out.read_text()  # the base model's epochs are the ones the demo ran, named beside the seed set
    assert f"seed set mostly clear (the demo's size), the base model trained on it for " \
           f"{demo_settings[0].base_epochs} epochs" in text


def test_the_peer_target_compares_the_default_with_the_peers_only(demo_settings: list, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    assert peers.main(["--seeds", "0", "--strategies", "uncertainty+diversity", "entropy", "typiclust", "--turns",
                       "1", "--append", str(out)]) == 0
    text = out.read_text()  # every made-up curve is the same: the default ties the best peer
    assert "needs no more labels than the best peer (entropy, badge, uncertainty+kcenter) on every seed: met " \
           "(1 of 1 seeds)" in text
