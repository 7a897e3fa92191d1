"""Typed arguments of one training run (``flywheel train``), validated once, stored in the checkpoint."""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet.errors import InvalidInput, check_folder
from fleet.protocol import NAME_RE

OPTIMIZERS = {"sgd": 0.1, "adamw": 5e-3}  # name -> default peak learning rate at batch size 64 (classify)
WARM_START_LR_FACTOR = 0.1  # fine-tuning at the from-scratch rate forgets the parent's skills
BALANCE = ("none", "loss", "sampler")
TASKS = ("classify", "detect")
# task -> (optimizer, batch size, balance, peak lr of each optimizer at that batch size) when not given
TASK_DEFAULTS: dict[str, tuple[str, int, str, dict[str, float]]] = {
    "classify": ("sgd", 64, "loss", OPTIMIZERS),
    "detect": ("adamw", 16, "none", {"sgd": 0.01, "adamw": 3e-3}),
}


@dataclass
class TrainArgs:
    """Everything one run needs; see ``flywheel train --help`` for each field's meaning."""

    data: str
    out: Path
    task: str = "classify"
    base: str | None = None
    replay_ratio: float = 0.5
    new_repeats: int = 1  # each new image this many times an epoch beside the replayed base (needs base)
    snapshot: str | None = None
    holdout: float = 0.2
    class_names: list[str] | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    balance: str | None = None  # default: "loss" (classify), "none" (detect)
    augment: str = "light"
    model: str | None = None  # default: the warm start's model, else smallcnn (classify) or fcos_tiny (detect)
    width: int | None = None
    epochs: int = 10
    batch_size: int | None = None  # default: 64 (classify), 16 (detect)
    lr: float | None = None
    optimizer: str | None = None  # default: sgd (classify), adamw (detect)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    seed: int = 0
    warm_start: Path | None = None
    init_weights: Path | None = None  # detect: a torchvision state dict to start from
    resume: bool = False
    regression_sets: list[str] = field(default_factory=list)
    gate_against: Path | None = None
    tolerance: float = 0.0
    slice_tolerance: float = 0.02
    slice_tolerances: dict[str, float] = field(default_factory=dict)
    min_slice_size: int = 10
    min_accuracy: float = 0.0
    version: str | None = None
    parent: str | None = None
    sign_key: str | None = None
    int8: bool = False
    parity_threshold: float = 1e-3
    publish: str | None = None
    token: str | None = None
    rollout_stages: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0])
    stage_seconds: float | None = None
    dry_run: bool = False
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    threads: int | None = None
    cache_dir: Path | None = None
    stream: bool = False  # decode into memory-mapped files and read batches from them (training.stream)
    object_store: str | None = None  # s3://BUCKET/PREFIX/: read hub snapshots from the object store
    eval_each_epoch: bool = False
    tracking_uri: str | None = None  # MLflow store (training.tracking)
    experiment: str = "flywheel"

    def validate(self) -> TrainArgs:
        """Check ranges and fill defaults (lr, version); returns self."""
        self.out = Path(self.out)
        check_folder(self.out, "--out", "the checkpoint, the exported model and report.json")
        if self.task not in TASKS:
            raise InvalidInput(f"unknown --task {self.task!r}; choose one of {list(TASKS)}")
        optimizer, batch_size, balance, rates = TASK_DEFAULTS[self.task]
        self.optimizer = self.optimizer or optimizer
        self.batch_size = batch_size if self.batch_size is None else self.batch_size
        self.balance = self.balance or balance
        _in_range("--replay-ratio", self.replay_ratio, 0.0, 1.0)
        check_new_repeats(self.new_repeats)
        if self.new_repeats > 1 and not self.base:
            raise InvalidInput(f"--new-repeats {self.new_repeats} weighs the new data against a replayed base; give "
                               "--base (without one, raise --epochs instead)")
        _in_range("--holdout", self.holdout, 0.0, 0.9)
        _in_range("--tolerance", self.tolerance, 0.0, 1.0)
        _in_range("--slice-tolerance", self.slice_tolerance, 0.0, 1.0)
        _in_range("--min-accuracy", self.min_accuracy, 0.0, 1.0)
        _in_range("--label-smoothing", self.label_smoothing, 0.0, 0.5)
        for name, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--width", self.width),
                            ("--threads", self.threads)):
            if value is not None and value < 1:  # width and threads: None takes the default
                raise InvalidInput(f"{name} must be >= 1; received {value}")
        if self.min_slice_size < 0:
            raise InvalidInput(f"--min-slice-size must be >= 0; received {self.min_slice_size}")
        if not 0 <= self.seed < 2**32:  # each epoch's generator is seeded with seed * 100003 + ..., in torch's int64
            raise InvalidInput(f"--seed must be in [0, 2**32); received {self.seed}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidInput(f"--weight-decay must be a number >= 0; received {self.weight_decay}")
        if self.stage_seconds is not None and not (math.isfinite(self.stage_seconds) and self.stage_seconds > 0):
            raise InvalidInput(f"--stage-seconds must be a number > 0; received {self.stage_seconds}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"unknown --optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.balance not in BALANCE:
            raise InvalidInput(f"unknown --balance {self.balance!r}; choose one of {list(BALANCE)}")
        if self.task == "detect":
            for name, value, neutral in (("--balance", self.balance, "none"), ("--label-smoothing",
                                         self.label_smoothing, 0.0)):
                if value != neutral:
                    raise InvalidInput(f"{name} applies to classifiers only; received {value!r} with --task detect")
        elif self.init_weights is not None:
            raise InvalidInput("--init-weights applies to detectors (--task detect); a classifier starts from "
                               f"--warm-start; received {self.init_weights}")
        if self.object_store is not None:
            from training.objstore import parse_store_url

            parse_store_url(self.object_store)
            if not self.data.startswith("hub:"):
                raise InvalidInput(f"--object-store reads hub snapshots; --data must be hub:URL with it; received "
                                   f"{self.data!r}")
        if self.channels not in (None, 1, 3):
            raise InvalidInput(f"--channels must be 1 or 3; received {self.channels}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidInput(f"--device must be auto, cpu, cuda or cuda:N; received {self.device!r}")
        if self.lr is None:  # square-root scaling with the batch size; a tenth of it to fine-tune
            scale = math.sqrt(self.batch_size / batch_size) * (WARM_START_LR_FACTOR if self.warm_start else 1.0)
            self.lr = round(rates[self.optimizer] * scale, 6)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidInput(f"--lr must be a positive number; received {self.lr}")
        if self.parity_threshold <= 0:
            raise InvalidInput(f"--parity-threshold must be > 0; received {self.parity_threshold}")
        if not self.experiment.strip() or len(self.experiment) > 500:
            raise InvalidInput(f"--experiment must be a name of 1 to 500 characters; received {self.experiment!r}")
        for name, value in (("--version", self.version), ("--parent", self.parent)):
            if value is not None and not NAME_RE.match(value):
                raise InvalidInput(f"{name} must be letters, digits, '.', '_' or '-' (max 128); received {value!r}")
        return self

    def default_version(self, model_name: str) -> str:
        return f"{model_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (paths as strings), for the checkpoint and the report; the token is left out."""
        d = asdict(self)
        d["token"] = "***" if self.token else None
        return {k: str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``"28"`` -> (28, 28); ``"32x48"`` -> (32, 48) as (height, width)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m or int(m.group(1)) < 1:
        raise InvalidInput(f"--image-size must be N or HxW; received {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def check_new_repeats(value: object) -> None:
    """``--new-repeats``: a whole number >= 1 (checked where the arguments are read and where the epochs are drawn)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"--new-repeats must be an integer >= 1; received {value!r}")


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidInput(f"{name} must be in [{lo}, {hi}]; received {value}")
