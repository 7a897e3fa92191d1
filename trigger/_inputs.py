"""A FrameBatch checked once into the triggers' :class:`Inputs` (only the fields a spec reads), and the filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trigger import scores as _s
from trigger._checks import F32, F64, Bool, as_float, as_labels, as_probs, describe
from trigger.dedup import NearDuplicateFilter
from trigger.frames import FrameBatch, predicted
from trigger.novelty import NoveltyBank
from trigger.spec_types import Filters, Spec
from trigger.triggers import Inputs


def read_batch(
    batch: FrameBatch, spec: Spec, *, needs: frozenset[str], uses: set[str], bank: NoveltyBank | None,
    dedup: NearDuplicateFilter | None,
) -> tuple[Inputs, dict[str, Any]]:
    """Validate the fields of ``batch`` that ``spec`` reads (``uses``; the others are ignored) and
    return them as :class:`Inputs`, with the tags, images and hashes the filters and dedup read.

    ``needs``: fields the spec cannot run without; ``bank``: the novelty bank the embeddings must
    match; ``dedup``: the spec's near-duplicate filter, whose inputs must be present.
    """
    if not isinstance(batch, FrameBatch):
        raise TypeError(f"evaluate expects a FrameBatch; received {describe(batch)}")
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
    embeddings: F32 | None = None
    if batch.embeddings is not None and "embeddings" in uses:
        embeddings = as_float(batch.embeddings, "FrameBatch.embeddings", ndim=2, dtype=np.float32)
        if embeddings.shape[0] != n or (bank is not None and embeddings.shape[1] != bank.dim):
            want = f"({n}, {bank.dim})" if bank is not None else f"({n}, d)"
            raise ValueError(f"FrameBatch.embeddings must have shape {want}; received {describe(embeddings)}")
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
    tags = batch.tags
    if tags is not None and spec.filters.tags and (not isinstance(tags, Sequence) or len(tags) != n):
        raise ValueError(f"FrameBatch.tags must be a list of {n} dicts; received {describe(tags)}")
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
    probs = _s._softmax(logits, spec.temperature)
    inputs = Inputs(
        logits=logits, probs=probs, embeddings=embeddings, human=human, challenger_probs=challenger,
        samples=samples, bank=bank,
    )
    return inputs, {"tags": tags, "images": batch.images, "hashes": batch.hashes}


def filter_mask(f: Filters, inputs: Inputs, tags: Sequence[Mapping[str, str]] | None) -> Bool | None:
    """Mask of frames that pass the filters ``f``; None when every frame passes."""
    if f.classes is None and not f.tags:
        return None
    passing = np.ones(inputs.n, bool)
    if f.classes is not None:
        passing &= np.isin(predicted(inputs), list(f.classes))
    if f.tags:
        if tags is None:
            passing[:] = False
        else:
            for i, frame_tags in enumerate(tags):
                if passing[i]:
                    passing[i] = all(frame_tags.get(key) in allowed for key, allowed in f.tags.items())
    return passing
