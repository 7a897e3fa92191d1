"""The demo's settings (what ``flywheel demo`` was asked) and an arm's state across turns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleet.errors import ProtocolError
from fleet.protocol import STRATEGIES, check_balance
from fleet.sim.detect_world import DETECT_SEED_SCENES, SceneFrames
from fleet.sim.fleet import Frames

TASKS = ("classify", "detect")
DETECT_TEST_SCENES = 60  # ... and its test scenes a condition
# what `flywheel demo` uses for each task when an option is not given
TASK_DEFAULTS: dict[str, dict[str, object]] = {
    # Each retrain replays the whole seed set beside every label so far (replay_ratio 1): at 0.5, a turn's 20 new
    # labels and 20 seed frames made an epoch of 40, one SGD step, and the first fine-tune forgot more than it
    # learned (seed 0: 0.375 from the base model's 0.414, refused by the gate). Each label twice an epoch
    # (new_repeats 2): on digits the flywheel then reached random's final accuracy with 0.29 / 0.22 / 0.26 of its
    # labels (once each: 0.42 / 0.30 / 0.27), on Fashion-MNIST with 0.58 / 0.57 / 0.78 (0.69 / 0.68 / 0.66);
    # measured in benchmarks/RESULTS.md, 2026-12-04 (3 copies was tried: the ratio fell because the random arm's
    # final accuracy fell, not because the flywheel learned faster). Each turn's selection is split evenly over the
    # frames' conditions (balance "condition"): the test accuracy weighs each condition the same while the stream
    # is 75% clear, and over the whole pool 12 of turn 1's 20 labels were clear frames and none night, where the
    # base model was at chance (Fashion-MNIST seed 0: 0.337 after turn 1, against 0.412 balanced). Fashion-MNIST
    # then needed 0.45 / 0.18 / 0.44 of random's labels (0.58 / 0.57 / 0.78 over the whole pool), digits
    # 0.35 / 0.29 / 0.38 (0.32 / 0.31 / 0.35); a detector balanced was no better then (0.44 / 0.81 / 0.78):
    # RESULTS.md, 2026-12-04 21:25-21:50
    "classify": {"model": "smallcnn", "base_epochs": 30, "turn_epochs": 20, "turn_lr": 0.05,
                 "strategy": "uncertainty+diversity", "balance": "condition", "replay_ratio": 1.0,
                 "new_repeats": 2},
    # AdamW's fine-tuning rate for the detector: 0.05 (SGD's, the classifier's) wrecks it in one turn. Selection
    # by informativeness alone: a young detector disagrees with the human on nearly every frame, so the
    # informativeness mass of a cluster follows its size and uncertainty+diversity labels the common clear
    # scenes (seed 0, 160 labels: 0.451 vs random's 0.469 with it, 0.474 with uncertainty alone; with the 36-epoch
    # base below, seeds 1 and 2 took 0.90 and 0.89 of random's labels with it). Each retrain replays the whole seed
    # set too (at half and half and 15 epochs the flywheel fell short of random's final mAP on 2 of 3 seeds;
    # RESULTS.md, 2026-12-04). Each label once an epoch: twice gave 0.40 / 0.63 / 0.93 of random's labels, no
    # better (RESULTS.md, 2026-12-04 18:09). The base model trains 36 epochs, to its plateau (seed 0: 0.446 mAP at
    # 24, 0.437 at 36): at 12 it was still learning (seed 2: 0.372, 0.480 at 24, 0.516 at 36), and each turn's gain
    # was mostly more epochs, not its labels (seed 2: the random arm gained 0.10 mAP over 160 labels, at 36 0.04).
    # Each turn then trains 6 epochs: over seeds 0 to 5 the flywheel needed 0.33 / 0.50 / 0.42 / 0.86 / 0.62 / 0.23
    # of random's labels, against 0.35 / 0.48 / 0.93 / 0.92 / 0.98 / 0.85 at 12 and 4 epochs (36 and 4, seeds 0 to
    # 2: 0.39 / 0.52 / 0.88), and ended with more mAP on every seed, on an Intel Xeon (on an AMD EPYC the same code
    # never reached random's final mAP on seeds 0 and 4: the CPU's arithmetic moves a run that far); RESULTS.md,
    # 2026-12-06. Each turn's selection is then split evenly over the frames' conditions, and a quarter of each
    # condition's share is drawn at random from its frames past the most uncertain (uncertainty+random): over seeds
    # 0 to 5 the flywheel needed 0.27 / 0.60 / 0.42 / 0.52 / 0.47 / 0.15 of random's labels (uncertainty over the
    # whole pool: 0.33 / 0.50 / 0.42 / 0.86 / 0.62 / 0.23). On seeds 3 and 4, where that fell short, either part
    # alone was not enough (balanced 0.71 / 0.77, a quarter at random 0.77 / 0.64); RESULTS.md, 2026-12-06 14:28,
    # the same Intel Xeon
    "detect": {"model": "fcos_tiny", "base_epochs": 36, "turn_epochs": 6, "turn_lr": 0.001,
               "strategy": "uncertainty+random", "balance": "condition", "replay_ratio": 1.0, "new_repeats": 1},
}
SEED_PER_CLASS = 15  # the default seed set: this many frames a class (a many-class set needs more than digits)
TEST_CAP = 500  # the default test set: at most this many images a condition (stratified), so turns stay short
NEAR_CHANCE = 1.5  # a model below this many times chance accuracy is "near chance"


def selection_seed(seed: int, turn: int) -> int:
    """The seed of a demo's selection request in turn ``turn``, from the demo's ``--seed``: the hub's picks then
    repeat run for run over the same pool (unseeded, the hub draws from the operating system: two runs of one
    ``--seed`` picked 11 of turn 1's 40 digits differently from the same 184 uploads). In [0, 2**32)."""
    return int(np.random.SeedSequence([abs(seed), int(seed < 0), turn]).generate_state(1)[0])


@dataclass
class DemoSettings:
    workspace: Path
    turns: int = 4
    devices: int = 4
    budget: int = 40  # labels per turn, for each arm
    seed: int = 0
    dataset: str | None = None
    frames_per_device: int = 300  # per turn
    seed_size: int | None = None  # None: SEED_PER_CLASS frames a class (150 for digits)
    test_size: int | None = None  # test images per condition, stratified by class; None: all, up to TEST_CAP
    base_epochs: int = 30
    turn_epochs: int = 20
    turn_lr: float = 0.05  # fine-tuning rate from the current model's checkpoint (both arms)
    replay_ratio: float | None = None  # each retrain's `flywheel train --replay-ratio` (both arms; 1: the whole seed
    # set every epoch); None: the task's (TASK_DEFAULTS)
    new_repeats: int | None = None  # each retrain's `flywheel train --new-repeats` (both arms: each label this many
    # times an epoch beside the seed set); None: the task's (TASK_DEFAULTS)
    upload_rate: float = 0.08  # calibrated uncertainty trigger's target rate per device
    strategy: str = "uncertainty+diversity"
    balance: str | None = None  # the case tag the hub splits each turn's selection evenly over (SelectionRequest);
    # "none": over the whole pool; None: the task's (TASK_DEFAULTS)
    rescore: bool = True  # re-score the pool with each new active model before selecting (fleet.hub.rescore)
    labeler: str = "auto"  # auto | oracle | studio
    install_studio: bool = True  # auto/studio: install Label Studio into ./.venv-studio when it is missing
    annotate: bool = False  # a person labels each turn in Label Studio's UI (needs Label Studio)
    model: str = "smallcnn"
    width: int = 16
    allow_short: bool = False  # a turn whose labels fall short of the budget is an error unless this is set
    task: str = "classify"  # classify | detect (scenes of digits with boxes: fleet.sim.detect_world)
    gate_tolerance: float | None = None  # how far a turn's candidate may fall below the fleet's model and ship;
    # None: 0.01 overall and `flywheel train`'s default per slice and secondary metric

    def replay(self) -> float:
        """Each retrain's ``--replay-ratio``: the one set, else the task's default."""
        if self.replay_ratio is not None:
            return self.replay_ratio
        return float(TASK_DEFAULTS[self.task]["replay_ratio"])  # type: ignore[arg-type]

    def repeats(self) -> int:
        """Each retrain's ``--new-repeats``: the one set, else the task's default."""
        if self.new_repeats is not None:
            return self.new_repeats
        return int(TASK_DEFAULTS[self.task]["new_repeats"])  # type: ignore[call-overload]

    def balanced(self) -> str | None:
        """The tag each turn's selection is balanced over: the one set (None for "none"), else the task's."""
        chosen = self.balance if self.balance is not None else str(TASK_DEFAULTS[self.task]["balance"])
        return None if chosen == "none" else chosen

    def validate(self) -> None:
        for name in ("turns", "devices", "budget", "frames_per_device", "seed_size", "test_size", "base_epochs",
                     "turn_epochs", "width"):
            value = getattr(self, name)
            if value is None and name in ("seed_size", "test_size"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; received {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be an integer in [0, 2**32) (the trainer's own seeds derive from it); "
                             f"received {self.seed!r}")
        if self.balance is not None:
            try:
                check_balance(self.balance, "--balance")
            except ProtocolError as exc:
                raise ValueError(f"{exc}; or 'none' to select over the whole pool") from None
        if self.gate_tolerance is not None and not 0 <= self.gate_tolerance <= 1:
            raise ValueError(f"--gate-tolerance must be in [0, 1] (a drop in accuracy or mAP); received "
                             f"{self.gate_tolerance}")
        if self.replay_ratio is not None and not 0 <= self.replay_ratio <= 1:
            raise ValueError(f"--replay-ratio must be in [0, 1] (the seed set's share of each retrain's epoch; 1: all "
                             f"of it every epoch); received {self.replay_ratio}")
        if self.new_repeats is not None and (isinstance(self.new_repeats, bool) or
                                             not isinstance(self.new_repeats, int) or self.new_repeats < 1):
            raise ValueError(f"--new-repeats must be a positive integer (each label's copies in a retrain's epoch); "
                             f"received {self.new_repeats!r}")
        if not 0 < self.upload_rate < 1:
            raise ValueError(f"--upload-rate must be in (0, 1); received {self.upload_rate}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; received {self.strategy!r}")
        if self.labeler not in ("auto", "oracle", "studio"):
            raise ValueError(f"--labeler must be auto, oracle or studio; received {self.labeler!r}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}; received {self.task!r}")
        if self.task == "detect" and self.dataset not in (None, "digits"):
            path = Path(self.dataset)
            if not ((path.is_dir() and (path / "annotations.json").is_file()) or
                    (path.is_file() and path.suffix == ".json")):
                raise ValueError(f"--task detect takes 'digits' (scenes of scikit-learn's digits, the default) or a "
                                 f"COCO-format folder (annotations.json and its images) or its .json file; "
                                 f"--dataset {self.dataset!r} is neither")
        if self.annotate and self.labeler == "oracle":
            raise ValueError("--annotate has you label in Label Studio; it cannot go with --labeler oracle")

    def seed_frames(self, classes: int) -> int:
        """The seed set's size: ``seed_size`` if given, else SEED_PER_CLASS frames a class (a detector:
        DETECT_SEED_SCENES scenes)."""
        if self.seed_size is not None:
            return self.seed_size
        return DETECT_SEED_SCENES if self.task == "detect" else SEED_PER_CLASS * classes


@dataclass
class Arm:
    """One arm's state across turns: its current checkpoint, version, and labels spent."""

    name: str
    checkpoint: Path | None = None
    version: str | None = None
    onnx: Path | None = None
    labels: int = 0
    labeled: list[Frames] | list[SceneFrames] = field(default_factory=list)
