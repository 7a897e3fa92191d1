"""The detector's training loop (torchvision-reference shape) and its turn: data -> train -> evaluate -> gate ->
export -> publish, entered through :func:`training.train.main` with ``args.task == "detect"``.

The machinery is the classifier's (:class:`training.loop.LoopCore`): one-cycle schedule, AMP on CUDA, DDP
under ``torchrun``, a full checkpoint every epoch and ``--resume``; replay draws base images beside the new ones
with :class:`training.data.EpochSampler`. Augmentation keeps boxes where they are (photometric changes and
sensor noise only: a shift or a flip would have to move the boxes, and a flipped digit is another glyph).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fleet.errors import InvalidInput
from training import augment as aug
from training.checkpoint import CHECKPOINT, Dist, save_checkpoint
from training.config import TrainArgs
from training.data import channel_stats
from training.detect.models import Detector, build_detector, default_width, load_init_weights
from training.detect.prepare import BoxPrepared, prepare_boxes
from training.detect.report import finish_detect_turn
from training.evaluate import normalize, stats_tensors
from training.export import input_spec
from training.loop import (
    LoopCore,
    MappedImages,
    Progress,
    batch_starts,
    phase,
    pool_on_device,
    prepare_on_ranks,
    start_turn,
)
from training.models import load_warm_start
from training.prepare import ClientFactory
from training.tracking import Tracker

log = logging.getLogger(__name__)

DEFAULT_MODEL = "fcos_tiny"
RESUME_KEYS = ("task", "data", "base", "replay_ratio", "new_repeats", "model", "width", "epochs", "batch_size", "lr",
               "optimizer", "weight_decay", "seed", "augment", "holdout", "init_weights")
AUGMENT: dict[str, tuple[aug.Op, ...]] = {"none": (), "light": (aug.noise,), "robust": (aug.photometric, aug.noise)}
CALIBRATION_IMAGES = 64


def train_one_epoch(
    model: nn.Module,
    loop: LoopCore,
    images: torch.Tensor | MappedImages,
    targets: list[dict[str, torch.Tensor]],
    order: torch.Tensor,
    *,
    batch_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    ops: tuple[aug.Op, ...],
    gen: torch.Generator,
    amp_dtype: torch.dtype | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One pass over ``order`` (indices into ``images`` (N, c, h, w) uint8 and ``targets``, pixel boxes);
    returns the mean loss (and each of torchvision's loss terms), images/s."""
    model.train()
    device = mean.device
    starts = batch_starts(len(order), batch_size)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    t0 = time.perf_counter()
    for step, i in enumerate(starts):
        idx = order[i: i + batch_size]
        x = images[idx].to(device, non_blocking=True).float().div_(255.0)
        x = normalize(aug.apply(x, ops, gen), mean, std)
        batch_targets = [targets[j] for j in idx.tolist()]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model(x, batch_targets)
        loss = sum(v.float() for v in losses.values())
        assert isinstance(loss, torch.Tensor)
        if not torch.isfinite(loss):
            terms = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"the detector's loss is {loss.item()} at step {step} ({terms}); lower --lr")
        loop.step(loss)
        for k, v in losses.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float() * len(idx)
        seen += len(idx)
        if progress is not None:
            progress("train", step + 1, len(starts))
    terms = {k: float(v.item()) / max(seen, 1) for k, v in sums.items()}
    seconds = time.perf_counter() - t0
    return {"loss": sum(terms.values()), "losses": terms, "images": seen, "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9), "lr": float(loop.scheduler.get_last_lr()[0])}


def turn(
    args: TrainArgs, dist: Dist, device: torch.device, factory: ClientFactory, progress: Progress | None,
    report: dict[str, Any], t_start: float, tracker: Tracker,
) -> dict[str, Any]:
    """One detector turn on this rank (see :func:`training.train.main`, which calls it)."""
    timings = report["timings"]
    ckpt_path = args.out / CHECKPOINT
    start = start_turn(args, report, resume_keys=RESUME_KEYS, default_model=DEFAULT_MODEL,
                       default_width=default_width)
    resume, warm, key, src_meta = start.resume, start.warm, start.key, start.src_meta
    model_name = str(args.model)
    t = time.perf_counter()
    data = prepare_on_ranks(dist, args, lambda: prepare_boxes(args, client_factory=factory, model=model_name,
                                                              known_shape=start.known_shape,
                                                              known_names=start.known_names))
    timings["data"] = time.perf_counter() - t
    report["data"] = data.info
    if resume and resume["meta"]["data_fingerprint"] != data.info["fingerprint"]:
        raise InvalidInput(f"cannot resume {ckpt_path}: the training data differs from the data it was trained on")
    mean, std = (src_meta["input"]["mean"], src_meta["input"]["std"]) if src_meta else \
        channel_stats(data.pool.images.images, seed=args.seed)
    spec = input_spec(data.shape, mean, std)

    model = build_detector(model_name, num_classes=len(data.class_names), in_channels=data.shape[0],
                           image_size=data.shape[1:], width=args.width)
    if warm and not resume:
        report["warm_start"] = {"checkpoint": str(args.warm_start), **load_detector_state(model, warm["model"])}
    elif args.init_weights and not resume:
        report["init_weights"] = load_init_weights(model, args.init_weights)
    meta = _meta(args, model, data, spec, start.parent)
    train = _DetTrainer(args, dist, device, model, data, spec, warm=bool(warm))
    if not train.fit(resume, progress, ckpt_path, meta, report, tracker):
        return {"rank": dist.rank, "status": "worker-done"}
    return finish_detect_turn(args, train.core, data, meta, warm, key, factory, report, t_start, device=device)


def load_detector_state(model: Detector, state: dict[str, Any]) -> dict[str, Any]:
    """Copy a Flywheel detector checkpoint's weights into ``model``; fcos_tiny's class layer may grow with new
    classes (one anchor a place: its output channels are the classes), every other tensor must match."""
    return load_warm_start(model, state, grows=lambda key: model.name == "fcos_tiny" and ".cls_logits." in key)


class _DetTrainer(LoopCore):
    """The detector's loop state: :class:`LoopCore` plus the pool (images on the device, pixel-box targets)."""

    def __init__(self, args: TrainArgs, dist: Dist, device: torch.device, model: Detector, data: BoxPrepared,
                 spec: Any, *, warm: bool) -> None:
        self.data = data
        self.per_rank = data.sampler.epoch_size // dist.world_size
        assert args.batch_size is not None
        super().__init__(args, dist, device, model, steps=len(batch_starts(self.per_rank, args.batch_size)),
                         warm=warm, channels_last=False)
        self.mean, self.std = stats_tensors(spec.mean, spec.std, device)
        pool = data.pool
        self.images = pool_on_device(pool.images.images, pool.images.mapped, device)
        h, w = data.shape[1:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        self.targets = [{"boxes": (torch.from_numpy(b) * scale).to(device), "labels": torch.from_numpy(c).to(device)}
                        for b, c in zip(pool.boxes, pool.classes, strict=True)]
        if args.augment not in AUGMENT:
            raise InvalidInput(f"unknown --augment {args.augment!r} for a detector; choose one of {sorted(AUGMENT)} "
                               "(augmentations that keep boxes in place)")
        self.ops = AUGMENT[args.augment]

    def run(self, progress: Progress | None, ckpt_path: Path, meta: dict[str, Any]) -> None:
        args, dist = self.args, self.dist
        assert args.batch_size is not None
        for epoch in range(self.start_epoch, args.epochs):
            order = torch.from_numpy(self.data.sampler.indices(epoch))
            order = order[dist.rank: dist.world_size * self.per_rank: dist.world_size]
            gen = torch.Generator().manual_seed(args.seed * 100003 + epoch * 1009 + dist.rank)
            stats = train_one_epoch(
                self.model, self, self.images, self.targets, order, batch_size=args.batch_size, mean=self.mean,
                std=self.std, ops=self.ops, gen=gen, amp_dtype=self.amp_dtype,
                progress=None if progress is None else phase(progress, f"train epoch {epoch + 1}/{args.epochs}"),
            )
            world = dist.world_size
            stats = {"epoch": epoch, **stats, "images": stats["images"] * world,
                     "images_per_s": stats["images_per_s"] * world}
            if args.eval_each_epoch and dist.is_main:
                stats["test_map_50"] = self._quick_map()
            self.record(stats)
            log.info("epoch %d/%d: loss %.4f, %.1f images/s%s", epoch + 1, args.epochs, stats["loss"],
                     stats["images_per_s"], f", test mAP@.5 {stats['test_map_50']:.4f}" if "test_map_50" in stats
                     else "")
            if dist.is_main:
                save_checkpoint(self.state(epoch, meta), ckpt_path)

    def _quick_map(self) -> float:
        from training.detect.evaluate import mean_average_precision, predict

        test = self.data.eval_sets["test"]
        pred = predict(self.core, test.images.images, mean=self.mean.flatten().tolist(),
                       std=self.std.flatten().tolist(), device=self.device, amp_dtype=self.amp_dtype)
        return float(mean_average_precision(pred, test.boxes, test.classes, num_classes=len(self.data.class_names),
                                            image_size=test.shape[1:])["map_50"])


def _meta(args: TrainArgs, model: Detector, data: BoxPrepared, spec: Any, parent: str | None) -> dict[str, Any]:
    from training.detect.export import embedding_dim

    rng = np.random.default_rng(args.seed)
    pool = data.pool.images.images
    calib = pool[rng.choice(len(pool), min(CALIBRATION_IMAGES, len(pool)), replace=False)]
    return {
        "task": "detect", "model": args.model, "width": args.width, "num_classes": len(data.class_names),
        "class_names": data.class_names, "input": spec.to_dict(), "embedding_dim": embedding_dim(model),
        "postprocess": asdict(model.post), "version": args.version, "parent_version": parent,
        "data_snapshot": data.snapshot_id, "data_fingerprint": data.info["fingerprint"],
        "calibration": torch.from_numpy(np.ascontiguousarray(calib)),
    }
