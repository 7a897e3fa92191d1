"""The training loop (torchvision-reference shape) and one whole turn of the trainer: ``main(args)``.

data -> train (checkpoint every epoch, resumable) -> evaluate -> gate -> export -> publish, with a
JSON report in ``args.out``. CUDA when present (bf16/fp16 autocast, channels_last), CPU otherwise;
several GPUs with ``torchrun --nproc-per-node N -m training ...``: same entry point, rank 0 evaluates,
exports and publishes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fleet.errors import InvalidInput
from fleet.signing import PRIVATE_KEY_ENV, load_private_key
from training import augment as aug
from training.checkpoint import (
    CHECKPOINT,
    Dist,
    barrier,
    broadcast,
    init_distributed,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    shutdown,
)
from training.config import TrainArgs
from training.data import channel_stats, class_weights
from training.evaluate import normalize, stats_tensors
from training.export import input_spec
from training.hub_client import HubClient
from training.models import Classifier, build_model, default_width, load_warm_start
from training.prepare import ClientFactory, Prepared, prepare_data
from training.report import finish_turn, write_report

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, completed, total)
RESUME_KEYS = ("data", "base", "replay_ratio", "model", "width", "epochs", "batch_size", "lr", "optimizer",
               "weight_decay", "label_smoothing", "seed", "balance", "augment", "holdout")
CALIBRATION_IMAGES = 128


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    *,
    batch_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    ops: tuple[aug.Op, ...],
    gen: torch.Generator,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    progress: Progress | None = None,
) -> dict[str, float]:
    """One pass over ``order`` (indices into ``images``/``labels``); returns loss, accuracy, images/s."""
    model.train()
    device = mean.device
    starts = _batch_starts(len(order), batch_size)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    t0 = time.perf_counter()
    for step, i in enumerate(starts):
        idx = order[i: i + batch_size]
        x = images[idx].to(device, non_blocking=True).float().div_(255.0)
        y = labels[idx].to(device, non_blocking=True)
        x = normalize(aug.apply(x, ops, gen), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, _ = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress is not None:
            progress("train", step + 1, len(starts))
    loss_value = float(total_loss.item()) / max(seen, 1)  # .item() waits for the device
    seconds = time.perf_counter() - t0
    return {
        "loss": loss_value, "train_accuracy": int(correct.item()) / max(seen, 1), "images": seen,
        "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), "lr": float(scheduler.get_last_lr()[0]),
    }


def main(
    args: TrainArgs, *, client_factory: ClientFactory | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run one turn; returns the report (also written to ``args.out/report.json`` on rank 0)."""
    args.validate()
    t_start = time.perf_counter()
    dist, device = init_distributed(args.device)
    _set_threads(args, dist, device)
    if not dist.is_main:
        logging.getLogger("training").setLevel(logging.WARNING)
    clients: dict[str, HubClient] = {}
    factory = client_factory or (lambda url: clients.setdefault(url, HubClient(url, args.token)))
    report: dict[str, Any] = {"schema": 1, "status": "running", "started_at": time.time(), "timings": {}}
    try:
        return _turn(args, dist, device, factory, progress, report, t_start)
    except Exception as exc:
        if dist.is_main:
            report.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            report["timings"]["total"] = time.perf_counter() - t_start
            write_report(args.out, report)
        raise
    finally:
        for c in clients.values():
            c.close()
        shutdown(dist)


def _turn(
    args: TrainArgs, dist: Dist, device: torch.device, factory: ClientFactory, progress: Progress | None,
    report: dict[str, Any], t_start: float,
) -> dict[str, Any]:
    timings = report["timings"]
    ckpt_path = args.out / CHECKPOINT
    resume = _resume_checkpoint(args, ckpt_path)
    warm = load_checkpoint(args.warm_start) if args.warm_start else None
    key = _signing_key(args)
    src_meta = (resume or warm or {}).get("meta")
    model_name = args.model or (src_meta["model"] if src_meta else "smallcnn")
    if warm and warm["meta"]["model"] != model_name:
        raise InvalidInput(f"--model {model_name} differs from the warm start's model {warm['meta']['model']!r}")
    args.model = model_name
    args.width = args.width or (src_meta or {}).get("width") or default_width(model_name)
    known_shape = _shape_of(src_meta["input"]) if src_meta else None
    known_names = src_meta["class_names"] if src_meta else None
    parent = args.parent or (warm["meta"]["version"] if warm else None)
    args.version = args.version or args.default_version(model_name)
    report.update(version=args.version, parent_version=parent, args=args.to_dict())
    seed_everything(args.seed)

    # --- data (rank 0 first: it creates the snapshot and fills the blob cache)
    t = time.perf_counter()
    data = prepare_data(args, client_factory=factory, known_shape=known_shape, known_names=known_names) \
        if dist.is_main else None
    args.snapshot, args.version = broadcast(dist, (data.snapshot_id if data else None, args.version))
    if data is None:
        data = prepare_data(args, client_factory=factory, known_shape=known_shape, known_names=known_names)
    timings["data"] = time.perf_counter() - t
    report["data"] = data.info
    if resume and resume["meta"]["data_fingerprint"] != data.info["fingerprint"]:
        raise InvalidInput(f"cannot resume {ckpt_path}: the training data differs from the data it was trained on")
    if src_meta:
        mean, std = src_meta["input"]["mean"], src_meta["input"]["std"]
    else:
        mean, std = channel_stats(data.pool.images, seed=args.seed)
    spec = input_spec(data.shape, mean, std)

    # --- model, optimizer, schedule
    model = build_model(model_name, num_classes=len(data.class_names), in_channels=data.shape[0],
                        image_size=data.shape[1:], width=args.width)
    if warm and not resume:
        report["warm_start"] = {"checkpoint": str(args.warm_start), **load_warm_start(model, warm["model"])}
    meta = _meta(args, model, data, spec, parent)
    train = _Trainer(args, dist, device, model, data, spec, bool(warm))
    if resume:
        train.load(resume)
    report["training"] = train.describe()
    t = time.perf_counter()
    train.run(progress, ckpt_path, meta)
    timings["train"] = time.perf_counter() - t
    report["training"].update(history=train.history, resumed_from_epoch=train.resumed_from)
    barrier(dist)
    if not dist.is_main:
        return {"rank": dist.rank, "status": "worker-done"}
    return finish_turn(args, train.core, data, meta, warm, key, factory, report, t_start, device=device)


class _Trainer:
    """Holds the loop's state (model, optimizer, scheduler, scaler, history) between epochs."""

    def __init__(self, args: TrainArgs, dist: Dist, device: torch.device, model: Classifier,
                 data: Prepared, spec: Any, warm: bool) -> None:
        self.args, self.dist, self.device, self.data = args, dist, device, data
        cuda = device.type == "cuda"
        self.channels_last = cuda and args.channels_last
        self.amp_dtype: torch.dtype | None = None
        if cuda and args.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.core = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.model: nn.Module = self.core
        if dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(self.core, device_ids=[device.index] if cuda else None)
        if cuda:
            torch.backends.cudnn.benchmark = True
        self.per_rank = data.sampler.epoch_size // dist.world_size
        self.steps = len(_batch_starts(self.per_rank, args.batch_size))
        if self.steps == 0:
            raise InvalidInput(f"an epoch of {data.sampler.epoch_size} images is too small to train on")
        self.optimizer = _optimizer(args, self.core)
        assert args.lr is not None
        total, pct = args.epochs * self.steps, 0.15 if warm else 0.25
        if pct * total == 1.0:  # OneCycleLR's warm-up would end at step 0 and divide by zero (e.g. 2 epochs x 2)
            pct = min(1.0, 2.0 / total)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=args.lr, total_steps=total, pct_start=pct, div_factor=10.0 if warm else 25.0,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        weights = None
        if args.balance == "loss":
            counts = data.sampler.expected_class_counts(len(data.class_names))
            weights = torch.from_numpy(class_weights(counts)).to(device)
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
        self.mean, self.std = stats_tensors(spec.mean, spec.std, device)
        big = data.pool.images.nbytes > 2 * 1024**3
        self.images = torch.from_numpy(data.pool.images)
        self.images = self.images.pin_memory() if (cuda and big) else self.images.to(device)
        self.labels = torch.from_numpy(data.pool.labels).to(device)
        self.ops = aug.get_preset(args.augment)
        self.start_epoch = 0
        self.resumed_from: int | None = None
        self.history: list[dict[str, Any]] = []

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

    def run(self, progress: Progress | None, ckpt_path: Path, meta: dict[str, Any]) -> None:
        args, dist = self.args, self.dist
        for epoch in range(self.start_epoch, args.epochs):
            order = torch.from_numpy(self.data.sampler.indices(epoch))
            order = order[dist.rank: dist.world_size * self.per_rank: dist.world_size].to(self.images.device)
            gen = torch.Generator().manual_seed(args.seed * 100003 + epoch * 1009 + dist.rank)
            stats = train_one_epoch(
                self.model, self.criterion, self.optimizer, self.scheduler, self.scaler, self.images, self.labels,
                order, batch_size=args.batch_size, mean=self.mean, std=self.std, ops=self.ops, gen=gen,
                amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                progress=None if progress is None else _label(progress, f"train epoch {epoch + 1}/{args.epochs}"),
            )
            world = dist.world_size  # every rank sees an equal share
            stats = {"epoch": epoch, **stats, "images": stats["images"] * world,
                     "images_per_s": stats["images_per_s"] * world}
            if args.eval_each_epoch and dist.is_main:
                stats["test_accuracy"] = self._quick_accuracy()
            self.history.append(stats)
            log.info("epoch %d/%d: loss %.4f, train acc %.4f, %.0f images/s%s", epoch + 1, args.epochs,
                     stats["loss"], stats["train_accuracy"], stats["images_per_s"],
                     f", test acc {stats['test_accuracy']:.4f}" if "test_accuracy" in stats else "")
            if dist.is_main:
                save_checkpoint(self.state(epoch, meta), ckpt_path)

    def state(self, epoch: int, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "epochs": self.args.epochs, "args": self.args.to_dict(), "rng": rng_state(),
            "meta": meta, "history": self.history,
        }

    def _quick_accuracy(self) -> float:
        from training.evaluate import predict

        test = self.data.eval_sets["test"]
        logits, _ = predict(self.core, test.images, mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist(),
                            device=self.device, amp_dtype=self.amp_dtype, channels_last=self.channels_last)
        return float((logits.argmax(1) == test.labels).mean())


def _resume_checkpoint(args: TrainArgs, path: Path) -> dict[str, Any] | None:
    if not path.exists():
        if args.resume:
            log.info("nothing to resume in %s; starting fresh", args.out)
        return None
    if not args.resume:
        raise InvalidInput(f"{path} already exists; pass --resume to continue that run, or choose another --out")
    ckpt = load_checkpoint(path)
    saved = ckpt["args"]
    args.version = args.version or saved.get("version")
    args.snapshot = args.snapshot or saved.get("snapshot")
    args.model = args.model or saved.get("model")
    args.width = args.width or saved.get("width")
    mine = args.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {mine.get(k)!r}"
            for k in RESUME_KEYS if saved.get(k) != mine.get(k)]
    if diff:
        raise InvalidInput(f"cannot resume {path} with different arguments: " + "; ".join(diff))
    return ckpt


def _signing_key(args: TrainArgs) -> Any:
    """Load the key before training, so a missing key fails in a second, not after an hour."""
    if args.sign_key or os.environ.get(PRIVATE_KEY_ENV):
        return load_private_key(args.sign_key)
    if args.publish and not args.dry_run:
        raise InvalidInput(f"publishing needs a signing key: pass --sign-key PATH or set {PRIVATE_KEY_ENV}")
    return None


def _meta(args: TrainArgs, model: Classifier, data: Prepared, spec: Any, parent: str | None) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    calib = data.pool.images[rng.choice(len(data.pool), min(CALIBRATION_IMAGES, len(data.pool)), replace=False)]
    return {
        "model": args.model, "width": args.width, "num_classes": len(data.class_names),
        "class_names": data.class_names, "input": spec.to_dict(), "embedding_dim": model.embedding_dim,
        "version": args.version, "parent_version": parent,
        "data_snapshot": data.snapshot_id, "data_fingerprint": data.info["fingerprint"],
        "calibration": torch.from_numpy(np.ascontiguousarray(calib)),
    }


def _optimizer(args: TrainArgs, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    assert args.lr is not None
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)


def _batch_starts(n: int, batch_size: int) -> list[int]:
    """Batch start offsets; a trailing batch of one image is dropped (batch norm cannot train on it)."""
    starts = list(range(0, n, batch_size))
    if starts and n - starts[-1] < 2:
        starts.pop()
    return starts


def _set_threads(args: TrainArgs, dist: Dist, device: torch.device) -> None:
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


def _label(progress: Progress, phase: str) -> Progress:
    return lambda _, done, total: progress(phase, done, total)


def _shape_of(spec: dict[str, Any]) -> tuple[int, int, int]:
    return int(spec["channels"]), int(spec["height"]), int(spec["width"])

