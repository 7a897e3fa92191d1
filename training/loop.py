"""What every training loop of a turn shares, whatever the task: the optimizer, the one-cycle schedule, mixed
precision, DDP, checkpoint state and resume, CPU threads and the signing key loaded up front.

:class:`LoopCore` holds the state between epochs; the classifier's loop (:mod:`training.train`) and the
detector's (:mod:`training.detect.train`) add their data and their ``train_one_epoch``.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from fleet.errors import InvalidInput
from fleet.signing import PRIVATE_KEY_ENV, load_private_key
from training.checkpoint import (
    CHECKPOINT,
    Dist,
    barrier,
    broadcast,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from training.config import TrainArgs
from training.tracking import NullTracker, Tracker, track_epoch, track_params

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, completed, total)
T = TypeVar("T")


@dataclass
class TurnStart:
    """What a turn knows before it loads data: the checkpoint it resumes, the warm start, the signing key, the
    input shape and classes a checkpoint fixes, and the parent version."""

    resume: dict[str, Any] | None
    warm: dict[str, Any] | None
    key: Any
    src_meta: dict[str, Any] | None
    known_shape: tuple[int, int, int] | None
    known_names: list[str] | None
    parent: str | None


def start_turn(args: TrainArgs, report: dict[str, Any], *, resume_keys: tuple[str, ...], default_model: str,
               default_width: Callable[[str], int]) -> TurnStart:
    """Settle a turn's model, width and version from the arguments, a resumed checkpoint or the warm start
    (``default_width`` also refuses an unknown model name), record them in ``report`` and seed everything."""
    resume = resume_checkpoint(args, args.out / CHECKPOINT, resume_keys)
    warm = load_checkpoint(args.warm_start) if args.warm_start else None
    if warm and warm["meta"].get("task", "classify") != args.task:
        raise InvalidInput(f"--warm-start {args.warm_start} is a {warm['meta'].get('task', 'classify')!r} model; "
                           f"this run trains a {args.task!r} model")
    key = signing_key(args)
    src_meta = (resume or warm or {}).get("meta")
    model_name = args.model or (src_meta["model"] if src_meta else default_model)
    width = default_width(model_name)
    if warm and warm["meta"]["model"] != model_name:
        raise InvalidInput(f"--model {model_name} differs from the warm start's model {warm['meta']['model']!r}")
    args.model = model_name
    args.width = args.width or (src_meta or {}).get("width") or width
    parent = args.parent or (warm["meta"]["version"] if warm else None)
    args.version = args.version or args.default_version(model_name)
    report.update(version=args.version, parent_version=parent, args=args.to_dict(), task=args.task)
    seed_everything(args.seed)
    return TurnStart(resume, warm, key, src_meta, shape_of(src_meta["input"]) if src_meta else None,
                     src_meta["class_names"] if src_meta else None, parent)


def prepare_on_ranks(dist: Dist, args: TrainArgs, prepare: Callable[[], T]) -> T:
    """Rank 0 prepares first (it creates the snapshot and fills the blob cache), then the others, on its
    snapshot id and version."""
    data = prepare() if dist.is_main else None
    args.snapshot, args.version = broadcast(dist, (getattr(data, "snapshot_id", None), args.version))
    return data if data is not None else prepare()


class LoopCore(ABC):
    """The model (and its DDP wrapper), optimizer, one-cycle scheduler, grad scaler and history of one run.

    ``steps`` is the number of optimizer steps per epoch on this rank; ``warm`` lowers the schedule's warm-up
    for a fine-tune. ``channels_last`` applies only where the task feeds the model its batch tensor directly.
    """

    def __init__(self, args: TrainArgs, dist: Dist, device: torch.device, model: nn.Module, *, steps: int,
                 warm: bool, channels_last: bool = True) -> None:
        self.args, self.dist, self.device = args, dist, device
        cuda = device.type == "cuda"
        self.channels_last = cuda and args.channels_last and channels_last
        self.amp_dtype: torch.dtype | None = None
        if cuda and args.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.core = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.model: nn.Module = self.core
        if dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(self.core, device_ids=[device.index] if cuda else None)
        if cuda:
            torch.backends.cudnn.benchmark = True
        if steps == 0:
            raise InvalidInput("an epoch is too small to train on: it holds fewer than 2 images per rank")
        self.steps = steps
        self.optimizer = make_optimizer(args, self.core)
        assert args.lr is not None
        total, pct = args.epochs * steps, 0.15 if warm else 0.25
        if pct * total == 1.0:  # OneCycleLR's warm-up would end at step 0 and divide by zero (e.g. 2 epochs x 2)
            pct = min(1.0, 2.0 / total)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=args.lr, total_steps=total, pct_start=pct, div_factor=10.0 if warm else 25.0,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.resumed_from: int | None = None
        self.history: list[dict[str, Any]] = []
        self.tracker: Tracker = NullTracker()

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "world_size": self.dist.world_size,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            "channels_last": self.channels_last, "threads": torch.get_num_threads(), "epochs": self.args.epochs,
            "steps_per_epoch": self.steps, "model": self.args.model, "width": self.args.width,
            "parameters": sum(p.numel() for p in self.core.parameters()),
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        self.core.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.resumed_from = self.start_epoch
        self.history = list(ckpt.get("history", []))
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d of %d", CHECKPOINT, self.start_epoch, self.args.epochs)

    def state(self, epoch: int, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "epochs": self.args.epochs, "args": self.args.to_dict(), "rng": rng_state(),
            "meta": meta, "history": self.history,
        }

    def fit(self, resume: dict[str, Any] | None, progress: Progress | None, ckpt_path: Path, meta: dict[str, Any],
            report: dict[str, Any], tracker: Tracker | None = None) -> bool:
        """Resume if asked, train every epoch (the task's ``run``), record it in ``report`` and ``tracker`` (the
        parameters, then each epoch, a resumed run's earlier ones first); True on rank 0, which then finishes the
        turn alone."""
        self.tracker = tracker or NullTracker()
        track_params(self.tracker, self.args, report)
        if resume:
            self.load(resume)
            for stats in self.history:
                track_epoch(self.tracker, stats)
        report["training"] = self.describe()
        t = time.perf_counter()
        self.run(progress, ckpt_path, meta)
        report["timings"]["train"] = time.perf_counter() - t
        report["training"].update(history=self.history, resumed_from_epoch=self.resumed_from)
        barrier(self.dist)
        return self.dist.is_main

    def record(self, stats: dict[str, Any]) -> None:
        """An epoch's statistics (``epoch`` and numbers) into the history and the tracker."""
        self.history.append(stats)
        track_epoch(self.tracker, stats)

    @abstractmethod
    def run(self, progress: Progress | None, ckpt_path: Path, meta: dict[str, Any]) -> None:
        """Train from ``start_epoch`` to the last epoch, checkpointing each (the task's loop)."""

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` (scaled for fp16), then the schedule's."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def resume_checkpoint(args: TrainArgs, path: Path, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The checkpoint to continue (``--resume``), refused when ``keys`` of the arguments differ from its own."""
    if not path.exists():
        if args.resume:
            log.info("nothing to resume in %s; starting fresh", args.out)
        return None
    if not args.resume:
        raise InvalidInput(f"{path} already exists; pass --resume to continue that run, or choose another --out")
    ckpt = load_checkpoint(path)
    saved = ckpt["args"]
    if saved.get("task", "classify") != args.task:
        raise InvalidInput(f"cannot resume {path}: it trained a {saved.get('task', 'classify')!r} model, "
                           f"this run asks for --task {args.task}")
    args.version = args.version or saved.get("version")
    args.snapshot = args.snapshot or saved.get("snapshot")
    args.model = args.model or saved.get("model")
    args.width = args.width or saved.get("width")
    mine = args.to_dict()
    # a key the checkpoint lacks was saved before it existed: that run had its default (the old behaviour)
    defaults = {f.name: f.default for f in fields(args) if f.default is not MISSING}
    was = {k: saved.get(k, defaults.get(k)) for k in keys}
    diff = [f"{k}: checkpoint {was[k]!r}, now {mine.get(k)!r}" for k in keys if was[k] != mine.get(k)]
    if diff:
        raise InvalidInput(f"cannot resume {path} with different arguments: " + "; ".join(diff))
    return ckpt


def signing_key(args: TrainArgs) -> Any:
    """Load the key before training, so a missing key fails in a second, not after an hour."""
    if args.sign_key or os.environ.get(PRIVATE_KEY_ENV):
        return load_private_key(args.sign_key)
    if args.publish and not args.dry_run:
        raise InvalidInput(f"publishing needs a signing key: pass --sign-key PATH or set {PRIVATE_KEY_ENV}")
    return None


def make_optimizer(args: TrainArgs, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; biases and norm weights without weight decay."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    assert args.lr is not None
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)


def batch_starts(n: int, batch_size: int) -> list[int]:
    """Batch start offsets; a trailing batch of one image is dropped (batch norm cannot train on it)."""
    starts = list(range(0, n, batch_size))
    if starts and n - starts[-1] < 2:
        starts.pop()
    return starts


def set_threads(args: TrainArgs, dist: Dist, device: torch.device) -> None:
    """CPU threads: --threads, else the idle cores (cores minus the 1-minute load), at least 1.

    Oversubscribing is far worse than idling a core for small models: two OpenMP threads on a busy
    two-core box ran a smallcnn epoch 5-10x slower than one thread did.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        cores = max(1, (os.cpu_count() or 1) // dist.local_world_size)
        try:
            idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
        except OSError:
            idle = cores
        torch.set_num_threads(max(1, min(cores, idle)))


def phase(progress: Progress, name: str) -> Progress:
    """A progress hook that reports under ``name`` whatever phase the loop names."""
    return lambda _, done, total: progress(name, done, total)


def shape_of(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of a manifest input spec."""
    return int(spec["channels"]), int(spec["height"]), int(spec["width"])


class MappedImages:
    """The training pool's images in a memory-mapped file (``--stream``), read one batch at a time: indexing with
    a tensor of indices reads those images (in file order, so the disk reads run forward) and returns them in the
    order asked, as a CPU tensor (pinned for a GPU). Memory holds a batch; the page cache, which the system may
    reclaim, holds what was read recently."""

    device = torch.device("cpu")

    def __init__(self, images: np.ndarray, *, pin: bool = False) -> None:
        self.images, self.pin = images, pin

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        index = idx.cpu().numpy()
        order = np.argsort(index, kind="stable")
        batch = np.empty((len(index), *self.images.shape[1:]), np.uint8)
        batch[order] = self.images[index[order]]
        out = torch.from_numpy(batch)
        return out.pin_memory() if self.pin else out


def pool_on_device(images: np.ndarray, mapped: bool, device: torch.device) -> torch.Tensor | MappedImages:
    """The training pool's images where the loop indexes them: read a batch at a time from their mapped file
    (``--stream``), or whole on the device (pinned host memory instead when a GPU would hold over 2 GiB)."""
    if mapped:
        return MappedImages(images, pin=device.type == "cuda")
    tensor = torch.from_numpy(images)
    big = images.nbytes > 2 * 1024**3
    return tensor.pin_memory() if (device.type == "cuda" and big) else tensor.to(device)
