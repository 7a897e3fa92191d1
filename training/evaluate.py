"""Evaluation: batched inference, accuracy overall / per class / per slice, recommended thresholds.

A slice is a ``key=value`` metadata tag (``condition=night``, ``source=base``); every tag present in
an evaluation set becomes a slice of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from training.data import ImageSet, slice_masks


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float batch (n, c, h, w) -> the model's input: ``(x / 255 - mean) / std``."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    return (x - mean) / std


def stats_tensors(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, s


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | None = None,
    batch_size: int = 1024,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, k) and embeddings (n, d) as float32 for uint8 ``images`` (n, c, h, w)."""
    device = device or next(model.parameters()).device
    m, s = stats_tensors(mean, std, device)
    was_training = model.training
    model.eval()
    logits, embs = [], []
    for i in range(0, len(images), batch_size):
        batch = np.require(images[i: i + batch_size], requirements=["W"])  # a mapped set's batch is copied
        x = normalize(torch.from_numpy(batch).to(device, non_blocking=True), m, s)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            lo, emb = model(x)
        logits.append(lo.float().cpu().numpy())
        embs.append(emb.float().cpu().numpy())
    model.train(was_training)
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(embs)


def evaluate(
    model: torch.nn.Module, data: ImageSet, class_names: Sequence[str], **predict_kwargs: Any
) -> dict[str, Any]:
    """Run ``model`` over ``data`` and return :func:`accuracy_metrics` plus the mean cross-entropy."""
    logits, _ = predict(model, data.images, **predict_kwargs)
    metrics = accuracy_metrics(logits, data.labels, data.tags, class_names)
    metrics["loss"] = _cross_entropy(logits, data.labels)
    return metrics


def accuracy_metrics(
    logits: np.ndarray, labels: np.ndarray, tags: Sequence[dict[str, str]], class_names: Sequence[str]
) -> dict[str, Any]:
    """logits: (n, k); labels: (n,). Accuracy overall, per class and per ``key=value`` slice, with counts.

    A model with fewer outputs than ``class_names`` (an older parent) simply never predicts the new classes.
    """
    n = len(labels)
    pred = logits.argmax(axis=1) if n else np.zeros(0, np.int64)
    correct = pred == labels
    per_class = {}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            per_class[name] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean())}
    per_slice = {
        key: {"n": int(mask.sum()), "accuracy": float(correct[mask].mean())} for key, mask in slice_masks(tags).items()
    }
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float(correct.mean()) if n else float("nan"),
        "per_class": per_class,
        "per_slice": per_slice,
    }
    k = len(class_names)
    if k <= 20 and n:
        conf = np.zeros((k, k), np.int64)
        np.add.at(conf, (labels, np.minimum(pred, k - 1)), 1)
        out["confusion"] = conf.tolist()
    return out


def recommended_thresholds(logits: np.ndarray, *, flag_rate: float = 0.05) -> dict[str, float]:
    """Thresholds that flag about ``flag_rate`` of in-distribution frames, per score (see trigger.scores).

    least_confidence, entropy and energy flag above the threshold; margin flags below it.
    """
    if len(logits) == 0:
        return {}
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, -2:]
    lc = 1.0 - top2[:, 1]
    margin = top2[:, 1] - top2[:, 0]
    ent = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
    energy = -(np.log(np.exp(z).sum(axis=1)) + logits.max(axis=1))
    q = 1.0 - flag_rate
    return {
        "least_confidence": round(float(np.quantile(lc, q)), 6),
        "margin": round(float(np.quantile(margin, flag_rate)), 6),
        "entropy": round(float(np.quantile(ent, q)), 6),
        "energy": round(float(np.quantile(energy, q)), 6),
    }


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    if not len(labels):
        return float("nan")
    k = logits.shape[1]
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    idx = np.minimum(labels, k - 1)
    ll = np.where(labels < k, logp[np.arange(len(labels)), idx], -np.inf)
    return float(-np.mean(np.maximum(ll, -50.0)))
