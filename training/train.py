"""The training loop (torchvision-reference shape) and one whole turn of the trainer: ``main(args)``.

``main`` runs a classifier's turn (here) or a detector's (:mod:`training.detect.train`, ``args.task == "detect"``).

data -> train (checkpoint every epoch, resumable) -> evaluate -> gate -> export -> publish, with a
JSON report in ``args.out``. CUDA when present (bf16/fp16 autocast, channels_last), CPU otherwise;
several GPUs with ``torchrun --nproc-per-node N -m training ...``: same entry point, rank 0 evaluates,
exports and publishes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fleet.errors import InvalidInput
from training import augment as aug
from training.checkpoint import (
    CHECKPOINT,
    Dist,
    init_distributed,
    save_checkpoint,
    shutdown,
)
from training.config import TrainArgs
from training.data import channel_stats, class_weights
from training.evaluate import normalize, stats_tensors
from training.export import input_spec
from training.hub_client import HubClient
from training.loop import (
    LoopCore,
    MappedImages,
    Progress,
    batch_starts,
    phase,
    pool_on_device,
    prepare_on_ranks,
    set_threads,
    signing_key,
    start_turn,
)
from training.models import Classifier, build_model, default_width, load_warm_start
from training.prepare import ClientFactory, Prepared, prepare_data
from training.publish import reach_hub
from training.report import REPORT, finish_turn, write_report
from training.tracking import NullTracker, Tracker, open_tracker, track_turn

log = logging.getLogger(__name__)

RESUME_KEYS = ("data", "base", "replay_ratio", "new_repeats", "model", "width", "epochs", "batch_size", "lr",
               "optimizer", "weight_decay", "label_smoothing", "seed", "balance", "augment", "holdout")
CALIBRATION_IMAGES = 128


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor | MappedImages,
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
    starts = batch_starts(len(order), batch_size)
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
    set_threads(args, dist, device)
    if not dist.is_main:
        logging.getLogger("training").setLevel(logging.WARNING)
    clients: dict[str, HubClient] = {}
    factory = client_factory or (lambda url: clients.setdefault(url, HubClient(url, args.token)))
    report: dict[str, Any] = {"schema": 1, "status": "running", "started_at": time.time(), "timings": {}}
    if args.task == "detect":
        from training.detect.train import turn
    else:
        turn = _turn
    tracker: Tracker = NullTracker()
    try:
        if dist.is_main:  # reach the tracking store and the hub to publish to before anything trains
            tracker = open_tracker(args.tracking_uri, args.experiment)
            if args.publish and not args.dry_run:
                signing_key(args)  # no key to sign with is said first: it needs no hub to find
                reach_hub(factory(args.publish))
        result = turn(args, dist, device, factory, progress, report, t_start, tracker)
        track_turn(tracker, report, args.out)
        tracker.end("FINISHED")
        return result
    except Exception as exc:
        if dist.is_main:
            report.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            report["timings"]["total"] = time.perf_counter() - t_start
            write_report(args.out, report)
            tracker.set_tags({"flywheel.status": "failed", "flywheel.error": report["error"][:5000]})
            tracker.log_artifact(args.out / REPORT)
            tracker.end("FAILED")
        raise
    finally:
        tracker.end("KILLED")  # interrupted (Ctrl-C, a signal): nothing was closed above
        for c in clients.values():
            c.close()
        shutdown(dist)


def _turn(
    args: TrainArgs, dist: Dist, device: torch.device, factory: ClientFactory, progress: Progress | None,
    report: dict[str, Any], t_start: float, tracker: Tracker,
) -> dict[str, Any]:
    timings = report["timings"]
    ckpt_path = args.out / CHECKPOINT
    start = start_turn(args, report, resume_keys=RESUME_KEYS, default_model="smallcnn", default_width=default_width)
    resume, warm, key, src_meta, parent = start.resume, start.warm, start.key, start.src_meta, start.parent
    model_name = str(args.model)
    t = time.perf_counter()
    data = prepare_on_ranks(dist, args, lambda: prepare_data(args, client_factory=factory,
                                                              known_shape=start.known_shape,
                                                              known_names=start.known_names))
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
    if not train.fit(resume, progress, ckpt_path, meta, report, tracker):
        return {"rank": dist.rank, "status": "worker-done"}
    return finish_turn(args, train.core, data, meta, warm, key, factory, report, t_start, device=device)


class _Trainer(LoopCore):
    """The classifier's loop state: :class:`LoopCore` plus the pool on the device, the loss and augmentation."""

    def __init__(self, args: TrainArgs, dist: Dist, device: torch.device, model: Classifier,
                 data: Prepared, spec: Any, warm: bool) -> None:
        self.data = data
        self.per_rank = data.sampler.epoch_size // dist.world_size
        assert args.batch_size is not None
        super().__init__(args, dist, device, model, steps=len(batch_starts(self.per_rank, args.batch_size)),
                         warm=warm)
        weights = None
        if args.balance == "loss":
            counts = data.sampler.expected_class_counts(len(data.class_names))
            weights = torch.from_numpy(class_weights(counts)).to(device)
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
        self.mean, self.std = stats_tensors(spec.mean, spec.std, device)
        self.images = pool_on_device(data.pool.images, data.pool.mapped, device)
        self.labels = torch.from_numpy(data.pool.labels).to(device)
        self.ops = aug.get_preset(args.augment)

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
                progress=None if progress is None else phase(progress, f"train epoch {epoch + 1}/{args.epochs}"),
            )
            world = dist.world_size  # every rank sees an equal share
            stats = {"epoch": epoch, **stats, "images": stats["images"] * world,
                     "images_per_s": stats["images_per_s"] * world}
            if args.eval_each_epoch and dist.is_main:
                stats["test_accuracy"] = self._quick_accuracy()
            self.record(stats)
            log.info("epoch %d/%d: loss %.4f, train acc %.4f, %.0f images/s%s", epoch + 1, args.epochs,
                     stats["loss"], stats["train_accuracy"], stats["images_per_s"],
                     f", test acc {stats['test_accuracy']:.4f}" if "test_accuracy" in stats else "")
            if dist.is_main:
                save_checkpoint(self.state(epoch, meta), ckpt_path)

    def _quick_accuracy(self) -> float:
        from training.evaluate import predict

        test = self.data.eval_sets["test"]
        logits, _ = predict(self.core, test.images, mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist(),
                            device=self.device, amp_dtype=self.amp_dtype, channels_last=self.channels_last)
        return float((logits.argmax(1) == test.labels).mean())


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
