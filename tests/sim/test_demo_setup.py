"""How the demo sets itself up: Label Studio installed on first use (or the oracle, with the reason in one line),
the pin read from the package's own `studio` extra, and a stratified test sample for large data sets."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fleet.sim.studio as studio
from fleet.sim import settings
from fleet.sim.data import Dataset, sample_test
from fleet.sim.demo import DemoSettings, _make_labeler
from fleet.sim.labelers import OracleLabeler
from fleet.sim.procs import ProcessFailed
from fleet.sim.settings import selection_seed

ROOT = Path(__file__).resolve().parents[2]


def test_the_studio_pins_are_the_studio_extra_of_pyproject() -> None:
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert studio.studio_requirement() == extras["studio"][0].replace(" ", "")
    assert tuple(extras["studio"]) == studio.STUDIO_REQUIREMENTS  # the fallback when no metadata is installed
    assert [str(Requirement(r)) for r in studio.studio_requirements()] == [str(Requirement(r))
                                                                         for r in extras["studio"]]
    # sentry-sdk 3.0 refuses `send_default_pii`, which Label Studio 1.23 passes as it starts: the server exits
    assert "3.0.0" not in Requirement(next(r for r in extras["studio"] if r.startswith("sentry-sdk"))).specifier


def test_an_install_made_before_a_pin_was_added_still_gets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studio, "_studio_extra", lambda: ["label-studio==1.23.2"])  # metadata of an older pyproject
    assert studio.studio_requirements() == list(studio.STUDIO_REQUIREMENTS)


def test_a_failed_install_leaves_no_half_made_virtualenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studio, "studio_requirement", lambda: "./no-such-project-dir")  # pip fails, no network
    venv = tmp_path / ".venv-studio"
    with pytest.raises(ProcessFailed, match=r"installing \./no-such-project-dir into .*\.venv-studio failed"):
        studio.install_studio(venv, timeout=300)
    assert not venv.exists()


class _Hub:
    url = "http://127.0.0.1:9"

    def token(self, role: str, name: str) -> str:
        return f"{role}-{name}"


def _world() -> Any:
    return object()


def test_auto_falls_back_to_the_oracle_and_says_why_in_one_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLYWHEEL_STUDIO_URL", raising=False)
    monkeypatch.setattr(studio, "find_studio_bin", lambda: None)

    def broken(venv: Path, **_: Any) -> Path:
        raise ProcessFailed("installing label-studio==1.23.2 into .venv-studio failed (exit 1):\nERROR: no network")

    monkeypatch.setattr(studio, "install_studio", broken)
    settings = DemoSettings(workspace=tmp_path / "ws")
    labeler = _make_labeler(settings, _Hub(), _world(), tmp_path, said.append)  # type: ignore[arg-type]
    assert isinstance(labeler, OracleLabeler)
    assert said[0].startswith("installing label-studio==")
    assert said[-1] == ("Label Studio not used (installing label-studio==1.23.2 into .venv-studio failed (exit 1):); "
                        "the built-in oracle labels instead")
    labeler.close()
    # --labeler studio fails instead, with the same reason; --no-install-studio does not try to install
    with pytest.raises(RuntimeError, match="--labeler studio: installing label-studio"):
        _make_labeler(DemoSettings(workspace=tmp_path, labeler="studio"), _Hub(), _world(), tmp_path, said.append)  # type: ignore[arg-type]
    said.clear()
    _make_labeler(DemoSettings(workspace=tmp_path, install_studio=False), _Hub(), _world(), tmp_path,  # type: ignore[arg-type]
                  said.append).close()
    assert len(said) == 1 and "the studio extra (the Label Studio server) is not installed" in said[0]


def test_the_seed_set_scales_with_the_classes_and_options_are_checked(tmp_path: Path) -> None:
    assert DemoSettings(workspace=tmp_path).seed_frames(10) == 150 == settings.SEED_PER_CLASS * 10
    assert DemoSettings(workspace=tmp_path).seed_frames(40) == 600
    assert DemoSettings(workspace=tmp_path, seed_size=90).seed_frames(40) == 90
    for bad in ({"seed_size": 0}, {"test_size": -3}, {"width": 0}, {"base_epochs": 0}):
        with pytest.raises(ValueError, match=f"--{next(iter(bad)).replace('_', '-')} must be a positive integer; "
                                             f"received {next(iter(bad.values()))}"):
            DemoSettings(workspace=tmp_path, **bad).validate()  # type: ignore[arg-type]
    # a strategy the hub has no such selection for is refused before anything starts, not at the first turn's pick
    with pytest.raises(ValueError, match="--strategy must be one of random, uncertainty, .*; received 'bogus'"):
        DemoSettings(workspace=tmp_path, strategy="bogus").validate()


def test_each_retrain_replays_the_task_s_share_of_the_seed_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each turn retrains on the whole seed set beside every label so far (``--replay-ratio 1``), each label the
    task's ``--new-repeats`` times an epoch; the options set them for both arms, the seed set's own model replays
    nothing, and a ratio outside [0, 1] or a repeat count under 1 is refused with what was received."""
    import fleet.sim.trainer as trainer_mod

    assert DemoSettings(workspace=tmp_path).replay() == 1.0
    assert DemoSettings(workspace=tmp_path, task="detect").replay() == 1.0
    assert DemoSettings(workspace=tmp_path, task="detect", replay_ratio=0.25).replay() == 0.25
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=f"--replay-ratio must be in \\[0, 1\\].*received {bad}"):
            DemoSettings(workspace=tmp_path, replay_ratio=bad).validate()
    for task in settings.TASKS:
        assert DemoSettings(workspace=tmp_path, task=task).repeats() == settings.TASK_DEFAULTS[task]["new_repeats"]
    assert DemoSettings(workspace=tmp_path, task="detect", new_repeats=5).repeats() == 5
    for bad_n in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"--new-repeats must be a positive integer.*received {bad_n!r}"):
            DemoSettings(workspace=tmp_path, new_repeats=bad_n).validate()  # type: ignore[arg-type]

    commands: list[list[str]] = []

    class Ran(Exception):
        pass

    class Started:  # the trainer's process, never started: its command is all this test reads
        def __init__(self, cmd: list[str], *args: Any, **kw: Any) -> None:
            commands.append(list(cmd))
            raise Ran

    monkeypatch.setattr(trainer_mod, "LoggedRun", Started)
    seed = tmp_path / "seed.npz"
    for task, data, want, ratio, repeats in (
            ("classify", "npz:new.npz", "1.0", None, None), ("detect", "npz:new.npz", "1.0", None, None),
            ("detect", "npz:new.npz", "0.5", 0.5, 3), ("classify", f"npz:{seed}", None, None, None)):
        t = trainer_mod.Trainer(DemoSettings(workspace=tmp_path, task=task, replay_ratio=ratio, new_repeats=repeats),
                                tmp_path, tmp_path / "key", None, "token", seed, ["a", "b"])  # type: ignore[arg-type]
        with pytest.raises(Ran):
            t.train("fw-1", data=data, epochs=1, publish=False, stages="", warm=None)
        cmd = commands[-1]
        if want is None:
            assert "--replay-ratio" not in cmd and "--base" not in cmd and "--new-repeats" not in cmd
        else:
            assert cmd[cmd.index("--base") + 1] == f"npz:{seed}" and cmd[cmd.index("--replay-ratio") + 1] == want
            n = repeats or settings.TASK_DEFAULTS[task]["new_repeats"]
            assert cmd[cmd.index("--new-repeats") + 1] == str(n)


def test_a_resume_compares_the_replay_ratio_each_retrain_gets(tmp_path: Path) -> None:
    """``flywheel demo --resume --replay-ratio R``: R is the ratio the demo started with when it left the option
    unset and R is the task's default (1 for a classifier), so the resume goes on; another R is refused, naming
    what it started with."""
    from types import SimpleNamespace

    from fleet.sim.cli import _check_resume
    from fleet.sim.resume import DemoState, settings_to_dict

    DemoState(settings=settings_to_dict(DemoSettings(workspace=tmp_path)), hub={}, base_version="base-s0", arms={},
              rng={}).save(tmp_path)
    option = SimpleNamespace(name="replay_ratio", opts=["--replay-ratio"])
    ctx = SimpleNamespace(command=SimpleNamespace(params=[option]),
                          get_parameter_source=lambda name: SimpleNamespace(name="COMMANDLINE"))
    _check_resume(ctx, DemoSettings(workspace=tmp_path, replay_ratio=1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"would change --replay-ratio 0.5 \(it started with 1.0\)"):
        _check_resume(ctx, DemoSettings(workspace=tmp_path, replay_ratio=0.5))  # type: ignore[arg-type]
    repeats = SimpleNamespace(name="new_repeats", opts=["--new-repeats"])  # the same for each label's copies
    ctx.command.params = [repeats]
    default = int(settings.TASK_DEFAULTS["classify"]["new_repeats"])  # type: ignore[call-overload]
    _check_resume(ctx, DemoSettings(workspace=tmp_path, new_repeats=default))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"would change --new-repeats {default + 2} \(it started with {default}\)"):
        _check_resume(ctx, DemoSettings(workspace=tmp_path, new_repeats=default + 2))  # type: ignore[arg-type]


def test_each_turn_s_selection_is_balanced_over_the_task_s_tag(tmp_path: Path) -> None:
    """The labelers ask the hub to split each turn's budget over the frames' conditions (a classifier's default;
    the test accuracy weighs each condition the same); --balance names another tag or 'none', and a bad one is
    refused with what was received. A resume compares the tag each selection gets. Each turn's request carries a
    seed from the demo's --seed and the turn (fleet.sim.settings.selection_seed), the same again on a resume."""
    from types import SimpleNamespace

    import httpx

    from fleet.sim.cli import _check_resume
    from fleet.sim.resume import DemoState, settings_to_dict

    for task in settings.TASKS:
        want = settings.TASK_DEFAULTS[task]["balance"]
        assert DemoSettings(workspace=tmp_path, task=task).balanced() == (None if want == "none" else want)
    assert DemoSettings(workspace=tmp_path, task="detect", balance="condition").balanced() == "condition"
    assert DemoSettings(workspace=tmp_path, balance="none").balanced() is None
    for bad in ("", "x" * 65, "new\nline"):
        with pytest.raises(ValueError, match=r"--balance must be a tag name of 1-64 letters, digits.*received "
                                             r".*; or 'none' to select over the whole pool"):
            DemoSettings(workspace=tmp_path, balance=bad).validate()
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"selection_id": "sel-1", "strategy": "uncertainty", "budget": 3,
                                         "pool_size": 0, "cases": []})

    labeler = OracleLabeler("http://hub.test", "t", _world(), strategy="uncertainty",  # type: ignore[arg-type]
                            balance=DemoSettings(workspace=tmp_path).balanced())
    labeler.client = httpx.Client(base_url="http://hub.test", transport=httpx.MockTransport(handler))
    labeler.label(3, 1)
    assert bodies[-1]["balance"] == settings.TASK_DEFAULTS["classify"]["balance"] and bodies[-1]["budget"] == 3
    labeler.balance = None
    labeler.label(3, 2)
    assert bodies[-1]["balance"] is None
    assert bodies[-1]["seed"] is None  # a labeler made without the demo's seed asks unseeded
    labeler.seed = 0
    labeler.label(3, 1)
    labeler.label(3, 2)
    labeler.label(3, 1)  # a resumed turn asks as the interrupted one did
    assert [b["seed"] for b in bodies[-3:]] == [selection_seed(0, 1), selection_seed(0, 2), selection_seed(0, 1)]
    labeler.close()
    seeds = {selection_seed(seed, turn) for seed in (-1, 0, 1, 2**40) for turn in (1, 2, 3)}
    assert len(seeds) == 12 and all(0 <= x < 2**32 for x in seeds)

    DemoState(settings=settings_to_dict(DemoSettings(workspace=tmp_path)), hub={}, base_version="base-s0", arms={},
              rng={}).save(tmp_path)
    option = SimpleNamespace(name="balance", opts=["--balance"])
    ctx = SimpleNamespace(command=SimpleNamespace(params=[option]),
                          get_parameter_source=lambda name: SimpleNamespace(name="COMMANDLINE"))
    _check_resume(ctx, DemoSettings(workspace=tmp_path, balance="condition"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"would change --balance none \(it started with condition\)"):
        _check_resume(ctx, DemoSettings(workspace=tmp_path, balance="none"))  # type: ignore[arg-type]


def test_the_test_sample_keeps_every_class_in_proportion() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(40), np.r_[np.full(20, 50), np.full(20, 10)])  # 1200 test images, two class sizes
    x = rng.integers(0, 255, (len(y), 8, 8, 3), dtype=np.uint8)
    data = Dataset("many", x[:5], y[:5], x, y, [f"c{i}" for i in range(40)])
    small = sample_test(data, 300, seed=1)
    counts = np.bincount(small.y_test, minlength=40)
    assert counts.min() >= 1 and len(small.y_test) <= 300
    assert counts[:20].tolist() == [12] * 20 and counts[20:].tolist() == [2] * 20  # 300/1200 of 50 and of 10
    for i in rng.choice(len(small.y_test), 20):  # each kept image still has its own label
        j = int(np.flatnonzero((x == small.x_test[i]).all(axis=(1, 2, 3)))[0])
        assert y[j] == small.y_test[i]
    assert sample_test(data, 5000) is data
    with pytest.raises(ValueError, match="positive number of images; received 0"):
        sample_test(data, 0)


def test_the_demo_s_help_names_each_task_s_defaults() -> None:
    """`flywheel demo --help` states what each option defaults to per task; it must follow TASK_DEFAULTS (it once
    still said a detector's retrain ran 15 epochs at half and half after both had changed)."""
    import inspect

    from fleet.sim.cli import demo

    params = inspect.signature(demo).parameters
    classify, detect = settings.TASK_DEFAULTS["classify"], settings.TASK_DEFAULTS["detect"]
    for option, key in (("model", "model"), ("base_epochs", "base_epochs"), ("epochs", "turn_epochs"),
                        ("strategy", "strategy"), ("new_repeats", "new_repeats"), ("balance", "balance")):
        text = params[option].default.help
        assert f"default {classify[key]}; detect: {detect[key]})" in text, (option, text)
    assert classify["replay_ratio"] == detect["replay_ratio"] == 1.0
    assert "default 1, both tasks" in params["replay_ratio"].default.help


def test_the_pins_check_reads_what_a_virtualenv_holds() -> None:
    """The Label Studio that the test command installed meets every pin; this test's own virtualenv (no Label
    Studio in it) does not, nor a folder with no Python."""
    from tests.labeling.lsserver import studio_bin
    from tests.support.services import missing_service

    binary = studio_bin()
    if binary is None:
        missing_service("no label-studio executable (scripts/test.sh installs one into .venv-studio)")
    assert studio.studio_pins_met(Path(binary).parent.parent)
    assert not studio.studio_pins_met(Path(sys.executable).parent.parent)
    assert not studio.studio_pins_met(Path("/no/such/venv"))


@pytest.mark.parametrize("met", [True, False], ids=["pins-met", "pins-unmet"])
def test_a_studio_virtualenv_that_misses_a_pin_is_brought_to_the_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      met: bool) -> None:
    """A ./.venv-studio made before a pin was added (sentry-sdk 3 beside Label Studio 1.23: the server exits as it
    starts) gets the studio extra's pins before the demo starts it; one that meets them is left alone."""
    import fleet.sim.labelers as labelers

    said: list[str] = []
    installed: list[Path] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLYWHEEL_STUDIO_URL", raising=False)
    binary = tmp_path / ".venv-studio" / "bin" / "label-studio"
    monkeypatch.setattr(studio, "find_studio_bin", lambda: binary)
    monkeypatch.setattr(studio, "studio_pins_met", lambda venv: met)
    monkeypatch.setattr(studio, "install_studio", lambda venv, **_: installed.append(venv) or binary)

    class NotStarted:
        def __init__(self, *_: Any, **__: Any) -> None:
            raise ProcessFailed("label-studio exited while starting")

    monkeypatch.setattr(labelers, "StudioLabeler", NotStarted)
    _make_labeler(DemoSettings(workspace=tmp_path / "ws"), _Hub(), _world(), tmp_path, said.append).close()  # type: ignore[arg-type]
    assert installed == ([] if met else [tmp_path / ".venv-studio"])
    assert any(s.startswith(f"bringing {tmp_path / '.venv-studio'} to the studio extra's pins (label-studio==1.23.2, "
                            "sentry-sdk") for s in said) is not met
    assert said[-1].startswith("Label Studio not used (it did not start: label-studio exited while starting)")
