"""A FrameBatch checked once into the triggers' :class:`Inputs` (only the fields a spec reads), and the filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trigger import scores as _s
from trigger._checks import F32, F64, Bool, as_float, as_labels, as_probs, describe
from trigger._history import StreamHistory, as_streams, as_timestamps
from trigger.boxes import Boxes, _unit
from trigger.dedup import NearDuplicateFilter
from trigger.frames import FrameBatch, predicted
from trigger.novelty import NoveltyBank
from trigger.spec_types import Filters, Spec
from trigger.triggers import Inputs


def read_batch(
    batch: FrameBatch, spec: Spec, *, needs: frozenset[str], uses: set[str], bank: NoveltyBank | None,
    dedup: NearDuplicateFilter | None, history: StreamHistory | None = None,
) -> tuple[Inputs, dict[str, Any]]:
    """Validate the fields of ``batch`` that ``spec`` reads (``uses``; the others are ignored) and
    return them as :class:`Inputs`, with the tags, images and hashes the filters and dedup read.

    ``needs``: fields the spec cannot run without; ``bank``: the novelty bank the embeddings must
    match; ``dedup``: the spec's near-duplicate filter, whose inputs must be present; ``history``: the
    last frame of each video stream from earlier batches (a detector's batch with ``stream``; it is
    updated with this batch's frames).
    """
    if not isinstance(batch, FrameBatch):
        raise TypeError(f"evaluate expects a FrameBatch; received {describe(batch)}")
    _check_task(batch, spec)
    if batch.task == "detect":
        return _read_detector_batch(batch, spec, needs=needs, uses=uses, bank=bank, dedup=dedup, history=history)
    logits: F64 = as_float(batch.logits, "FrameBatch.logits", ndim=2)
    n, k = logits.shape
    if k < 1:
        raise ValueError(f"FrameBatch.logits must have at least one class; received shape {logits.shape}")
    for name in ("embeddings", "samples"):
        if name in needs and getattr(batch, name) is None:
            users = [leaf.label for leaf in spec.leaves if name in leaf.definition.needs] or ["dedup"]
            raise ValueError(
                f"spec {spec.id!r} needs FrameBatch.{name} (for {', '.join(users)}); received None"
            )
    embeddings = _embeddings(batch, n, uses, bank)
    human = None
    if batch.human is not None and "human" in uses:
        human = as_labels(batch.human, "FrameBatch.human", n=n)
        if human.size and int(human.max()) >= k:
            raise ValueError(
                f"FrameBatch.human must be class indices below k={k} or -1; "
                f"received {int(human.max())}"
            )
    challenger = None
    if batch.challenger_logits is not None and "challenger_logits" in uses:
        cl = as_float(batch.challenger_logits, "FrameBatch.challenger_logits", ndim=2, finite=False)
        if cl.shape != (n, k):
            raise ValueError(f"FrameBatch.challenger_logits must have shape ({n}, {k}); received {describe(cl)}")
        challenger = _s._softmax_or_nan(cl)
    samples = None
    if batch.samples is not None and "samples" in uses:
        samples = as_probs(batch.samples, "FrameBatch.samples", ndim=3)
        if samples.shape[1:] != (n, k) or samples.shape[0] < 1:
            raise ValueError(f"FrameBatch.samples must have shape (m, {n}, {k}); received {describe(samples)}")
    tags = _tags(batch, spec, n)
    _check_dedup(batch, spec, n, dedup, embeddings)
    probs = _s._softmax(logits, spec.temperature)
    inputs = Inputs(
        logits=logits, probs=probs, embeddings=embeddings, human=human, challenger_probs=challenger,
        samples=samples, bank=bank,
    )
    return inputs, {"tags": tags, "images": batch.images, "hashes": batch.hashes}


def _read_detector_batch(
    batch: FrameBatch, spec: Spec, *, needs: frozenset[str], uses: set[str], bank: NoveltyBank | None,
    dedup: NearDuplicateFilter | None, history: StreamHistory | None,
) -> tuple[Inputs, dict[str, Any]]:
    """:func:`read_batch` for a detector's batch: boxes instead of logits, and the detector-only fields."""
    boxes = _boxes(batch.boxes, "FrameBatch.boxes", None)
    n = boxes.n
    if "box_probs" in needs and boxes.probs is None and boxes.m:
        users = [leaf.label for leaf in spec.leaves if "box_probs" in leaf.definition.needs]
        raise ValueError(f"spec {spec.id!r} needs each box's class distribution (Boxes.probs, for "
                         f"{', '.join(users)}); received boxes without probs")
    if "embeddings" in needs and batch.embeddings is None:
        users = [leaf.label for leaf in spec.leaves if "embeddings" in leaf.definition.needs] or ["dedup"]
        raise ValueError(f"spec {spec.id!r} needs FrameBatch.embeddings (for {', '.join(users)}); received None")
    embeddings = _embeddings(batch, n, uses, bank)
    tags = _tags(batch, spec, n)
    _check_dedup(batch, spec, n, dedup, embeddings)
    threshold = 0.5
    if batch.operating_threshold is not None:
        threshold = _unit(batch.operating_threshold, "FrameBatch.operating_threshold")
    inputs = Inputs(boxes=boxes, embeddings=embeddings, bank=bank, operating_threshold=threshold)
    if "challenger_boxes" in uses and batch.challenger_boxes is not None:
        inputs.challenger_boxes = _boxes(batch.challenger_boxes, "FrameBatch.challenger_boxes", n)
    if "human_boxes" in uses and batch.human_boxes is not None:
        inputs.human_boxes = _boxes(batch.human_boxes, "FrameBatch.human_boxes", n)
    extra: dict[str, Any] = {"tags": tags, "images": batch.images, "hashes": batch.hashes}
    if "stream" in uses and batch.stream is not None:
        stream = as_streams(batch.stream, n, "FrameBatch.stream")
        ts = None if batch.timestamps is None else as_timestamps(batch.timestamps, n, "FrameBatch.timestamps")
        inputs.previous, inputs.gap = (history or StreamHistory()).previous(boxes, stream, ts)
        if history is not None:
            history.remember(boxes, stream, ts)
    return inputs, extra


def _check_task(batch: FrameBatch, spec: Spec) -> None:
    """Refuse a batch that is neither a classifier's nor a detector's, or not the kind ``spec`` was written for."""
    if batch.logits is not None and batch.boxes is not None:
        raise ValueError("FrameBatch holds a classifier's logits or a detector's boxes, not both; received both")
    if batch.logits is None and batch.boxes is None:
        raise ValueError("FrameBatch needs logits (a classifier's output) or boxes (a detector's); received neither")
    if spec.task is not None and spec.task != batch.task:
        users = [leaf.label for leaf in spec.leaves if leaf.definition.task == spec.task]
        wants = "a detector's batch (FrameBatch.boxes)" if spec.task == "detect" else \
            "a classifier's batch (FrameBatch.logits)"
        got = "a detector's (boxes, no logits)" if batch.task == "detect" else "a classifier's (logits)"
        raise ValueError(f"spec {spec.id!r} uses {spec.task} triggers ({', '.join(users)}) and needs {wants}; "
                         f"received {got}")


def _boxes(value: Any, what: str, n: int | None) -> Boxes:
    if not isinstance(value, Boxes):
        raise ValueError(f"{what} must be trigger.Boxes (see Boxes.from_frames or decode_dense); "
                         f"received {describe(value)}")
    if n is not None and value.n != n:
        raise ValueError(f"{what} must describe the batch's {n} frames; received Boxes of {value.n} frames")
    return value


def _embeddings(batch: FrameBatch, n: int, uses: set[str], bank: NoveltyBank | None) -> F32 | None:
    embeddings: F32 | None = None
    if batch.embeddings is not None and "embeddings" in uses:
        embeddings = as_float(batch.embeddings, "FrameBatch.embeddings", ndim=2, dtype=np.float32)
        if embeddings.shape[0] != n or (bank is not None and embeddings.shape[1] != bank.dim):
            want = f"({n}, {bank.dim})" if bank is not None else f"({n}, d)"
            raise ValueError(f"FrameBatch.embeddings must have shape {want}; received {describe(embeddings)}")
    return embeddings


def _tags(batch: FrameBatch, spec: Spec, n: int) -> Sequence[Mapping[str, str]] | None:
    tags = batch.tags
    if tags is not None and spec.filters.tags and (not isinstance(tags, Sequence) or len(tags) != n):
        raise ValueError(f"FrameBatch.tags must be a list of {n} dicts; received {describe(tags)}")
    return tags


def _check_dedup(batch: FrameBatch, spec: Spec, n: int, dedup: NearDuplicateFilter | None,
                 embeddings: F32 | None) -> None:
    if dedup is not None:
        has_pixels = batch.images is not None or batch.hashes is not None
        usable = (dedup.max_hamming is not None and has_pixels) or (
            dedup.embedding_threshold is not None and embeddings is not None
        )
        if not usable:  # refused before anything is learned or spent
            wanted = "FrameBatch.images or .hashes" if dedup.max_hamming is not None else ""
            if dedup.embedding_threshold is not None:
                wanted += (" or " if wanted else "") + "FrameBatch.embeddings"
            raise ValueError(f"spec {spec.id!r} deduplicates frames and needs {wanted}; received none")
        for name in ("images", "hashes"):
            value = getattr(batch, name)
            if value is not None and np.shape(value)[:1] != (n,):
                raise ValueError(
                    f"FrameBatch.{name} must describe {n} frames; "
                    f"received {describe(np.asarray(value))}"
                )


def filter_mask(f: Filters, inputs: Inputs, tags: Sequence[Mapping[str, str]] | None) -> Bool | None:
    """Mask of frames that pass the filters ``f``; None when every frame passes.

    ``classes``: a classifier's frame passes when its top class is listed; a detector's when one of its boxes
    scoring at least the operating threshold has a listed class (a frame may show many classes).
    """
    if f.classes is None and not f.tags:
        return None
    passing = np.ones(inputs.n, bool)
    if f.classes is not None and inputs.boxes is not None:
        b = inputs.boxes
        hit = np.isin(b.labels, list(f.classes)) & (b.scores >= inputs.operating_threshold)
        passing &= np.bincount(b.frame_index[hit], minlength=b.n) > 0
    elif f.classes is not None:
        passing &= np.isin(predicted(inputs), list(f.classes))
    if f.tags:
        if tags is None:
            passing[:] = False
        else:
            for i, frame_tags in enumerate(tags):
                if passing[i]:
                    passing[i] = all(frame_tags.get(key) in allowed for key, allowed in f.tags.items())
    return passing
