"""Assemble a run's data: the training pool (new data + replayed base), evaluation sets, class names, shape.

Evaluation sets: ``test`` joins the new data's held-out split (tagged ``source=data`` or
``source=snapshot``) and the base's test split (``source=base``), so the gate sees both new skills
and old ones; ``regression`` joins every ``--regression-set`` (past edge cases).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from fleet.errors import InvalidInput
from fleet.protocol import SnapshotEntry
from training.config import TrainArgs
from training.data import (
    EpochSampler,
    ImageSet,
    Splits,
    concat,
    conform,
    held_out,
    holdout_by_id,
    load_folder,
    load_npz,
    parse_source,
)
from training.hub_client import HubClient
from training.objstore import ObjectStoreReader
from training.snapshot import Snapshot, default_cache_dir, pull_snapshot, snapshot_to_imageset, snapshot_to_mapped

log = logging.getLogger(__name__)

ClientFactory = Callable[[str], HubClient]


S = TypeVar("S")  # the kind of labeled set: ImageSet (classify) or training.detect.data.BoxSet (detect)


@dataclass
class Prepared(Generic[S]):
    pool: S  # new images first, then base images
    n_new: int
    sampler: EpochSampler
    eval_sets: dict[str, S]
    class_names: list[str]
    shape: tuple[int, int, int]
    snapshot_id: str | None
    info: dict[str, Any] = field(default_factory=dict)


def prepare_data(
    args: TrainArgs,
    *,
    client_factory: ClientFactory,
    known_shape: tuple[int, int, int] | None = None,
    known_names: list[str] | None = None,
) -> Prepared[ImageSet]:
    """Load, conform and split everything a run trains and evaluates on.

    ``known_shape``/``known_names`` come from a warm-start or resumed checkpoint and win over the data.
    """
    src = parse_source(args.data, what="--data")
    if known_shape and (args.channels not in (None, known_shape[0]) or args.image_size not in (None, known_shape[1:])):
        raise InvalidInput(
            f"--channels/--image-size ({args.channels}, {args.image_size}) differ from the checkpoint's input "
            f"{known_shape}; a warm start or resume keeps the model's input shape"
        )
    shape = known_shape or _explicit_shape(args)
    names = list(known_names or args.class_names or [])
    base: Splits | None = None
    if args.base:
        base_src = parse_source(args.base, what="--base")
        if base_src.kind == "hub":
            raise InvalidInput(f"--base must be npz:PATH or folder:PATH; received {args.base!r}")
        base = _load_local(base_src.kind, base_src.location, shape, names, args, name="base")
        shape = shape or with_overrides(base.train.shape, args)
        names = names or list(base.class_names or [])
    snapshot_id, snap_stats = None, None
    if src.kind == "hub":
        if shape is None:
            raise InvalidInput(
                "hub data needs the input shape: give --image-size and --channels, a --base, or a --warm-start"
            )
        snap = pull_snapshot(client_factory(src.location), args.snapshot, cache_dir=args.cache_dir,
                             store=object_store(args))
        if snap.task != "classify":
            raise InvalidInput(f"snapshot {snap.snapshot_id} holds {snap.task!r} labels; train it with --task "
                               f"{snap.task}")
        snapshot_id, snap_stats = snap.snapshot_id, snap.stats
        if not snap.entries:
            raise InvalidInput(f"snapshot {snap.snapshot_id} holds no accepted or gold labels yet; nothing to learn")
        if args.stream:
            sides = [images for _, images in mapped_snapshot(snap, shape, args)]
            train, test = sides[0], (sides[1] if len(sides) > 1 else None)
        else:
            train, test = holdout_by_id(snapshot_to_imageset(snap, channels=shape[0], size=shape[1:]), args.holdout)
        data = Splits(train, test, class_names=extend_names(names, snap.class_names, snap.snapshot_id))
        names = list(data.class_names or [])
        new_tag = "snapshot"
    else:
        data = _load_local(src.kind, src.location, shape, names, args, name="data")
        new_tag = "data"
    shape = shape or with_overrides(data.train.shape, args)
    names = names or list(data.class_names or [])

    spill = stream_dir(args) if args.stream else None
    new, base_train, test_parts = split_sources(
        data, base, shape=shape, new_tag=new_tag, holdout=None if src.kind == "hub" else args.holdout,
        conform=functools.partial(conform, spill=spill), holdout_fn=holdout_by_id, missing="x_test/y_test")
    eval_sets = {"test": concat(test_parts, name="test", spill=spill)}
    regression = [_load_regression(spec, shape, names, args, client_factory) for spec in args.regression_sets]
    if regression:
        eval_sets["regression"] = concat(regression, name="regression")

    pool = concat([s for s in (new, base_train) if s is not None and len(s)], name="train", spill=spill)
    n_new = len(new) if base_train is not None else len(pool)
    all_labels = np.concatenate([pool.labels] + [s.labels for s in eval_sets.values()])
    names = _complete_names(names, int(all_labels.max()) + 1)
    sampler = EpochSampler(pool.labels, n_new=n_new, replay_ratio=args.replay_ratio, new_repeats=args.new_repeats,
                           balance="sampler" if args.balance == "sampler" else "none", seed=args.seed)
    info = {
        "shape": list(shape),
        "class_names": names,
        "new": {"source": str(src), "n": n_new, "per_class": _counts(pool.labels[:n_new], len(names))},
        "base": None if base_train is None else {
            "source": args.base, "n": len(base_train), "per_epoch": sampler.base_per_epoch,
            "replay_ratio": args.replay_ratio, "new_repeats": args.new_repeats,
        },
        "epoch_size": sampler.epoch_size,
        "eval": {k: len(v) for k, v in eval_sets.items()},
        "snapshot": None if snapshot_id is None else {"id": snapshot_id, **(snap_stats or {})},
        "fingerprint": pool.fingerprint(),
        "streamed": pool.mapped,
    }
    log.info("data: %d new + %d base images (%d per epoch), eval %s, %d classes, shape %s",
             n_new, len(pool) - n_new, sampler.epoch_size, info["eval"], len(names), shape)
    return Prepared(pool, n_new, sampler, eval_sets, names, shape, snapshot_id, info)


def split_sources(data: Any, base: Any, *, shape: tuple[int, int, int], new_tag: str, holdout: float | None,
                  conform: Callable[[Any, tuple[int, int, int]], Any], holdout_fn: Callable[[Any, float], Any],
                  missing: str) -> tuple[Any, Any, list[Any]]:
    """(new training set, base training set or None, test parts) from the new data's and the base's splits
    (``.train``/``.test``), conformed to ``shape`` and tagged ``source=new_tag`` / ``source=base``. New data
    without a test split gives ``holdout`` of itself (None: it was held out already). ``missing`` names the
    test arrays in the error when no test set results."""
    new = conform(data.train, shape).with_tag("source", new_tag)
    test_parts = []
    if data.test is not None:
        test_parts.append(conform(data.test, shape).with_tag("source", new_tag))
    elif holdout is not None:
        new, held = holdout_fn(new, holdout)
        if held is not None:
            test_parts.append(held)
    base_train = None
    if base is not None:
        base_train = conform(base.train, shape).with_tag("source", "base")
        if base.test is not None:
            test_parts.append(conform(base.test, shape).with_tag("source", "base"))
    if not test_parts:
        raise InvalidInput(f"no held-out test set: give {missing}, a --base with a test split, or --holdout > 0")
    return new, base_train, test_parts


def extend_names(known: list[str], snapshot: list[str], snapshot_id: str) -> list[str]:
    """The classes a run learns: the snapshot's, which may only extend those the model already has."""
    if snapshot[: len(known)] != known and known[: len(snapshot)] != snapshot:
        raise InvalidInput(f"snapshot {snapshot_id} labels classes {snapshot}, which do not extend the model's "
                           f"{known}; train a new model (without --warm-start) for a new class list")
    return known if len(known) >= len(snapshot) else list(snapshot)


def _explicit_shape(args: TrainArgs) -> tuple[int, int, int] | None:
    if args.channels and args.image_size:
        return (args.channels, *args.image_size)
    return None


def with_overrides(shape: tuple[int, int, int], args: TrainArgs) -> tuple[int, int, int]:
    c, h, w = shape
    if args.image_size:
        h, w = args.image_size
    return (args.channels or c, h, w)


def object_store(args: TrainArgs) -> ObjectStoreReader | None:
    """The reader of ``--object-store``, when one is given."""
    return None if args.object_store is None else ObjectStoreReader(args.object_store)


def stream_dir(args: TrainArgs) -> Path:
    """Where ``--stream`` keeps decoded images: ``decoded/`` in the blob cache."""
    return (args.cache_dir or default_cache_dir()) / "decoded"


def mapped_snapshot(snap: Snapshot, shape: tuple[int, int, int], args: TrainArgs
                    ) -> list[tuple[list[SnapshotEntry], ImageSet]]:
    """The snapshot's training side and, when ``--holdout`` leaves one, its held-out side (split by id as
    :func:`holdout_by_id` splits), each with its images decoded into a mapped file of its own (named by the
    snapshot, the cases and the shape, so a rerun or another rank reuses it)."""
    held = held_out([e.case_id for e in snap.entries], args.holdout)
    sides = [snap.entries] if held is None else [
        [snap.entries[i] for i in np.flatnonzero(~held)], [snap.entries[i] for i in np.flatnonzero(held)]]
    out = []
    for entries in sides:
        key = hashlib.sha256(repr((shape, [e.case_id for e in entries])).encode()).hexdigest()[:16]
        path = stream_dir(args) / f"{snap.snapshot_id}-{key}.npy"
        out.append((entries, snapshot_to_mapped(snap, entries, channels=shape[0], size=shape[1:], path=path)))
    return out


def _load_local(
    kind: str, location: str, shape: tuple[int, int, int] | None, names: list[str], args: TrainArgs, *, name: str
) -> Splits:
    if kind == "npz":
        return load_npz(location, name=name, mmap=args.stream)
    if kind == "coco":
        raise InvalidInput(f"coco:{location} holds boxes, which a classifier cannot learn; train a detector with "
                           "--task detect")
    return load_folder(
        location, channels=shape[0] if shape else args.channels, size=shape[1:] if shape else args.image_size,
        class_names=names or None, test_fraction=args.holdout, seed=args.seed, name=name,
    )


def regression_snapshot(spec: str, args: TrainArgs, client_factory: ClientFactory) -> Snapshot:
    """The hub snapshot a ``--regression-set snapshot:ID`` names, from the hub of ``--data`` or ``--publish``."""
    src = parse_source(args.data, what="--data")
    url = src.location if src.kind == "hub" else args.publish
    if not url:
        raise InvalidInput(f"--regression-set {spec}: a snapshot needs a hub (--data hub:URL or --publish URL)")
    snap = pull_snapshot(client_factory(url), spec.split(":", 1)[1], cache_dir=args.cache_dir,
                         store=object_store(args))
    if snap.task != args.task:
        raise InvalidInput(f"--regression-set {spec} holds {snap.task!r} labels; this run trains a {args.task!r} model")
    return snap


def _load_regression(
    spec: str, shape: tuple[int, int, int], names: list[str], args: TrainArgs, client_factory: ClientFactory
) -> ImageSet:
    """``npz:PATH`` (its test split if it has one), ``folder:PATH`` (all images) or ``snapshot:ID`` (same hub)."""
    if spec.startswith("snapshot:"):
        images = snapshot_to_imageset(regression_snapshot(spec, args, client_factory), channels=shape[0],
                                      size=shape[1:])
    else:
        s = parse_source(spec, what="--regression-set")
        if s.kind == "hub":
            raise InvalidInput(f"--regression-set must be npz:PATH, folder:PATH or snapshot:ID; received {spec!r}")
        splits = _load_local(s.kind, s.location, shape, names, args, name="regression")
        if s.kind == "npz":
            images = splits.test if splits.test is not None else splits.train
        else:
            images = concat([p for p in (splits.train, splits.test) if p is not None], name="regression")
    return conform(images, shape)


def _complete_names(names: list[str], n_classes: int) -> list[str]:
    out = list(names) + [f"class_{i}" for i in range(len(names), n_classes)]
    if len(out) < 2:
        raise InvalidInput(f"training needs at least 2 classes; the data has labels for {n_classes}")
    if len(set(out)) != len(out):
        raise InvalidInput(f"class names must be unique; received {out}")
    return out


def _counts(labels: np.ndarray, k: int) -> list[int]:
    return [int(c) for c in np.bincount(labels, minlength=k)]
