"""Assemble a detector run's data: the training pool (new boxes + replayed base), evaluation sets, classes, shape.

The same shape as the classifier's :mod:`training.prepare`: ``test`` joins the new data's held-out share
(``source=data`` or ``source=snapshot``) and the base's test split (``source=base``); ``regression`` joins every
``--regression-set``. Sources: ``npz:PATH`` (boxes, see :func:`training.detect.data.load_box_npz`),
``coco:PATH`` (a COCO-format folder) or ``hub:URL`` (a snapshot of ``detect`` labels).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from fleet.coco import COCO_ANNOTATIONS
from fleet.errors import InvalidInput
from training.config import TrainArgs
from training.data import EpochSampler, parse_source
from training.detect.data import (
    BoxSet,
    BoxSplits,
    concat_boxes,
    conform_boxes,
    holdout_boxes,
    load_box_npz,
    load_coco,
    snapshot_to_boxset,
)
from training.detect.models import THREE_CHANNEL_MODELS, default_size
from training.prepare import (
    ClientFactory,
    Prepared,
    extend_names,
    mapped_snapshot,
    object_store,
    regression_snapshot,
    split_sources,
    stream_dir,
    with_overrides,
)
from training.snapshot import pull_snapshot

log = logging.getLogger(__name__)


BoxPrepared = Prepared[BoxSet]


def prepare_boxes(
    args: TrainArgs, *, client_factory: ClientFactory, model: str,
    known_shape: tuple[int, int, int] | None = None, known_names: list[str] | None = None,
) -> BoxPrepared:
    """Load, conform and split everything a detector run trains and evaluates on.

    The input shape: a warm start's or resumed checkpoint's, else ``--channels``/``--image-size``, else the
    model's own (320x320 RGB for torchvision's mobile detectors), else the data's.
    """
    src = parse_source(args.data, what="--data")
    if known_shape and (args.channels not in (None, known_shape[0]) or args.image_size not in (None, known_shape[1:])):
        raise InvalidInput(f"--channels/--image-size ({args.channels}, {args.image_size}) differ from the "
                           f"checkpoint's input {known_shape}; a warm start or resume keeps the model's input shape")
    shape = known_shape or _explicit_shape(args, model)
    names = list(known_names or args.class_names or [])
    base: BoxSplits | None = None
    if args.base:
        base_src = parse_source(args.base, what="--base")
        base = _load_local(base_src.kind, base_src.location, shape, names, what="--base", name="base",
                           mmap=args.stream)
        shape = shape or with_overrides(base.train.shape, args)
        names = names or list(base.class_names or [])
    snapshot_id, snap_stats, new_tag = None, None, "data"
    if src.kind == "hub":
        if shape is None:
            raise InvalidInput("hub data needs the input shape: give --image-size and --channels, a --base, or a "
                               "--warm-start")
        snap = pull_snapshot(client_factory(src.location), args.snapshot, cache_dir=args.cache_dir,
                             store=object_store(args))
        snapshot_id, snap_stats, new_tag = snap.snapshot_id, snap.stats, "snapshot"
        if not snap.entries:
            raise InvalidInput(f"snapshot {snap.snapshot_id} holds no accepted or gold labels yet; nothing to learn")
        names = extend_names(names, list(snap.class_names), snap.snapshot_id)
        if args.stream:
            sides = [snapshot_to_boxset(snap, channels=shape[0], size=shape[1:], entries=entries, images=mapped.images)
                     for entries, mapped in mapped_snapshot(snap, shape, args)]
            train, held = sides[0], (sides[1] if len(sides) > 1 else None)
        else:
            train, held = holdout_boxes(snapshot_to_boxset(snap, channels=shape[0], size=shape[1:]), args.holdout)
        data = BoxSplits(train, held, class_names=names)
    else:
        data = _load_local(src.kind, src.location, shape, names, what="--data", name="data", mmap=args.stream)
    shape = shape or with_overrides(data.train.shape, args)
    names = names or list(data.class_names or [])

    spill = stream_dir(args) if args.stream else None
    new, base_train, test_parts = split_sources(
        data, base, shape=shape, new_tag=new_tag, holdout=None if src.kind == "hub" else args.holdout,
        conform=functools.partial(conform_boxes, spill=spill), holdout_fn=holdout_boxes,
        missing="test scenes (x_test, boxes_test, ...)")
    eval_sets = {"test": concat_boxes(test_parts, name="test", spill=spill)}
    regression = []
    for spec in args.regression_sets:
        if spec.startswith("snapshot:"):
            snap = regression_snapshot(spec, args, client_factory)
            regression.append(snapshot_to_boxset(snap, channels=shape[0], size=shape[1:]))
            continue
        s = parse_source(spec, what="--regression-set")
        if s.kind == "hub":
            raise InvalidInput(f"--regression-set must be npz:PATH, coco:PATH or snapshot:ID for a detector; received "
                               f"{spec!r}")
        splits = _load_local(s.kind, s.location, shape, names, what="--regression-set", name="regression")
        regression.append(conform_boxes(splits.test if splits.test is not None else splits.train, shape))
    if regression:
        eval_sets["regression"] = concat_boxes(regression, name="regression")

    pool = concat_boxes([new, base_train], name="train", spill=spill)
    n_new = len(new) if base_train is not None else len(pool)
    names = _complete_names(names, [pool, *eval_sets.values()])
    sampler = EpochSampler(np.zeros(len(pool), np.int64), n_new=n_new, replay_ratio=args.replay_ratio,
                           new_repeats=args.new_repeats, balance="none", seed=args.seed)
    info = {
        "shape": list(shape), "class_names": names,
        "new": {"source": str(src), "n": n_new, "boxes": pool.subset(np.arange(n_new)).n_boxes,
                "per_class": pool.subset(np.arange(n_new)).class_counts(len(names))},
        "base": None if base_train is None else {
            "source": args.base, "n": len(base_train), "boxes": base_train.n_boxes,
            "per_epoch": sampler.base_per_epoch, "replay_ratio": args.replay_ratio,
            "new_repeats": args.new_repeats,
        },
        "epoch_size": sampler.epoch_size,
        "eval": {k: len(v) for k, v in eval_sets.items()},
        "snapshot": None if snapshot_id is None else {"id": snapshot_id, **(snap_stats or {})},
        "fingerprint": pool.fingerprint(),
        "streamed": pool.images.mapped,
    }
    log.info("data: %d new + %d base images (%d per epoch), eval %s, %d classes, shape %s",
             n_new, len(pool) - n_new, sampler.epoch_size, info["eval"], len(names), shape)
    return Prepared(pool, n_new, sampler, eval_sets, names, shape, snapshot_id, info)


def _explicit_shape(args: TrainArgs, model: str) -> tuple[int, int, int] | None:
    channels = args.channels or (3 if model in THREE_CHANNEL_MODELS else None)
    size = args.image_size or default_size(model)
    return (channels, *size) if channels and size else None


def _load_local(kind: str, location: str, shape: tuple[int, int, int] | None, names: list[str], *, what: str,
                name: str, mmap: bool = False) -> BoxSplits:
    if kind == "npz":
        return load_box_npz(location, name=name, mmap=mmap)
    if kind == "coco" or (kind == "folder" and (Path(location) / COCO_ANNOTATIONS).is_file()):
        return load_coco(location, channels=shape[0] if shape else None, size=shape[1:] if shape else None,
                         name=name, class_names=names or None)
    raise InvalidInput(f"{what} for a detector must be npz:PATH (with boxes), coco:PATH or hub:URL; received "
                       f"{kind}:{location}")


def _complete_names(names: list[str], sets: list[BoxSet]) -> list[str]:
    top = max((int(c.max()) + 1 for s in sets for c in s.classes if len(c)), default=0)
    out = list(names) + [f"class_{i}" for i in range(len(names), top)]
    if len(out) < 2:  # the signed manifest lists at least 2 class names (fleet.protocol.ModelManifest)
        raise InvalidInput(f"a detector needs at least 2 classes (name them with --class-names); the data has {out}")
    if len(set(out)) != len(out):
        raise InvalidInput(f"class names must be unique; received {out}")
    return out
