"""Shadow mode in two stages: ``infer`` runs the active model and, beside it, the challenger on each
batch as frames arrive; ``decide`` evaluates the live campaigns' triggers over a window of inferred
batches and turns the frames they keep into captures with their full context.

Deciding over a window (64 frames by default) rather than per frame keeps the trigger library's fixed cost
per call off each frame; the library gives the same scores, firings and priorities either way, and
a shadow-mode decision is not urgent. The challenger is never acted on: its outputs only feed the
agreement counters, the triggers that compare against it, and the context recorded with a case.

A detector's batch carries each model's dense outputs; the window decodes them all at once into the boxes each
model kept per frame (:class:`~fleet.inference.detector.Detections`); the challenger agrees on a frame when both
found the same objects (IoU matching at 0.5, same classes).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.edge.campaigns import Campaign
from fleet.edge.frame import Frame
from fleet.edge.inference import Raw, log_once, run_chunk
from fleet.edge.ota import LoadedModels
from fleet.edge.recorder import Capture, new_case_id
from fleet.inference.detector import Detections, best_labels, box_sets_agree, decode, to_detection
from fleet.protocol import (
    ChallengerOutput,
    Classification,
    Prediction,
    TriggerHit,
    encode_embedding,
    fit_tags,
)
from fleet.protocol.base import MAX_NAME

log = logging.getLogger(__name__)


@dataclass
class Inferred:
    """One batch right after inference: raw outputs only (all bookkeeping, a detector's decoding included, waits
    for the window)."""

    frames: list[Frame]
    models: LoadedModels  # the models that produced these outputs
    logits: NDArray[Any] | None  # (n, k) active; None for a detector
    embedding: NDArray[Any]  # (n, d) active
    challenger_logits: NDArray[Any] | None  # (n, k), or None without a (working) challenger
    latency_ms: float  # active model, per frame (preprocess + inference)
    seen_at: float  # unix seconds when the batch was inferred
    boxes: NDArray[Any] | None = None  # a detector's dense outputs: (n, A, 4) every anchor's box
    scores: NDArray[Any] | None = None  # (n, A, k) every anchor's class scores
    challenger_boxes: NDArray[Any] | None = None  # the challenger's, or None without a (working) challenger
    challenger_scores: NDArray[Any] | None = None

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        """Bytes held: the frames' pixels and the outputs (a detector's dense outputs can outweigh the pixels)."""
        arrays = (self.logits, self.embedding, self.challenger_logits, self.boxes, self.scores,
                  self.challenger_boxes, self.challenger_scores)
        return sum(f.image.nbytes for f in self.frames) + sum(a.nbytes for a in arrays if a is not None)

    @classmethod
    def from_raw(cls, frames: Sequence[Frame], models: LoadedModels, raw: Raw, *, now: float | None = None
                 ) -> Inferred:
        return cls(
            frames=list(frames), models=models, logits=raw.logits, embedding=raw.embedding,
            challenger_logits=raw.challenger_logits, latency_ms=raw.latency_ms,
            seen_at=time.time() if now is None else now, boxes=raw.boxes, scores=raw.scores,
            challenger_boxes=raw.challenger_boxes, challenger_scores=raw.challenger_scores,
        )


@dataclass
class WindowResult:
    """What a decision window produced. Arrays are (n,) over the window's frames."""

    captures: list[Capture]
    predicted: NDArray[Any]  # active top-1 (a detector: its best box's class, -1 for none); -1 where not finite
    human: NDArray[Any]  # -1 = unknown (or a class the model does not have)
    challenger_predicted: NDArray[Any] | None  # -1 = not comparable
    latency_ms: NDArray[Any]  # per frame
    nonfinite: int  # frames whose active outputs held NaN or inf (or a detector's scores left [0, 1]); never triggered
    models: LoadedModels | None = None  # the models that produced the window
    detections: Detections | None = None  # a detector's boxes per frame
    challenger_detections: Detections | None = None
    challenger_agrees: NDArray[Any] | None = None  # a detector's: 1 same objects, 0 not, -1 not comparable
    human_agrees: NDArray[Any] | None = None  # a detector's against the human's boxes: 1, 0, -1 as above


def infer(frames: Sequence[Frame], models: LoadedModels, *, now: float | None = None) -> Inferred:
    """Run the active model, and the challenger beside it, on a batch (models.active must be set)."""
    assert models.active is not None, "infer needs an active model"
    (raw,) = run_chunk([f.image for f in frames], len(frames), models.active, models.challenger)
    return Inferred.from_raw(frames, models, raw, now=now)


def decide(window: Sequence[Inferred], campaigns: Sequence[Campaign], *, device_id: str,
           now: float | None = None) -> WindowResult:
    """Evaluate the campaigns over a window of batches inferred by the same models."""
    assert window, "decide needs at least one batch"
    now = time.time() if now is None else now
    models = window[0].models
    assert all(w.models is models for w in window), "a decision window must hold one model generation"
    if window[0].boxes is not None:  # a detector's dense outputs
        return _decide_detections(window, campaigns, device_id=device_id, now=now)
    frames = [f for w in window for f in w.frames]
    n = len(frames)
    cat = (lambda xs: xs[0]) if len(window) == 1 else np.concatenate
    logits = cat([w.logits for w in window])
    embedding = cat([w.embedding for w in window])
    k = logits.shape[1]
    human = np.array([-1 if f.human_action is None else f.human_action for f in frames], np.int64)
    human[human >= k] = -1  # an action the model has no class for cannot be compared
    ok = _finite_rows(logits, embedding)
    predicted = _top1(logits, ok)
    ch_logits = ch_pred = None
    if all(w.challenger_logits is not None for w in window):
        ch_logits = cat([w.challenger_logits for w in window])
        ch_ok = _finite_rows(ch_logits)
        ch_pred = _top1(ch_logits, ch_ok & ok)
        if not ch_ok.all():
            ch_logits = ch_logits.copy()
            ch_logits[~ch_ok] = np.nan  # the trigger library reads NaN rows as "no challenger output"
    latency = np.repeat([w.latency_ms for w in window], [len(w) for w in window])
    result = WindowResult([], predicted, human, ch_pred, latency, int(n - ok.sum()), models)
    idx = np.flatnonzero(ok)
    if not campaigns or not len(idx):
        return result

    from trigger import FrameBatch, softmax

    def sub(a: NDArray[Any]) -> NDArray[Any]:
        return a if len(idx) == n else a[idx]

    images_kept, hashes = _images_or_hashes([f.image for f in frames], idx)
    batch = FrameBatch(
        logits=sub(logits),
        embeddings=sub(embedding),
        human=sub(human),
        challenger_logits=None if ch_logits is None else sub(ch_logits),
        tags=[frames[i].tags for i in idx],
        images=images_kept,
        hashes=hashes,
    )
    best = _best_per_frame(batch, campaigns, now)
    if not best:
        return result
    rows = np.array(sorted(best), dtype=np.intp)
    kept = idx[rows]
    # float64; a challenger row of NaN (no output for that frame) stays NaN
    probs = dict(zip(kept.tolist(), softmax(logits[kept], nonfinite="nan"), strict=True))
    ch_probs = {} if ch_logits is None else dict(
        zip(kept.tolist(), softmax(ch_logits[kept], nonfinite="nan"), strict=True))
    seen_at = [w.seen_at for w in window for _ in w.frames]
    for j in rows.tolist():
        prio, campaign, decision = best[j]
        i = int(idx[j])
        ch = ch_probs.get(i)
        result.captures.append(_capture(
            frames[i], j, prio, campaign, decision, models, embedding[i], _classification(probs[i]),
            None if ch is None or not np.isfinite(ch).all() else _classification(ch),
            # an action the model has no class for cannot be compared, so it is not sent either
            None if human[i] < 0 else Classification(int(human[i])), device_id=device_id, now=seen_at[i],
        ))
    return result


# ---------------------------------------------------------------------------------------------


def _decide_detections(window: Sequence[Inferred], campaigns: Sequence[Campaign], *, device_id: str,
                       now: float) -> WindowResult:
    """A detector's window: its boxes, its challenger's and the human's compared frame by frame, and the campaigns'
    box triggers evaluated on them. ``predicted`` is the class of each frame's best box (-1 when it found none); a
    human action given as a class is not comparable with boxes, so ``human`` is all -1 and the human's boxes
    (``Frame.human_boxes``) are compared instead (``human_agrees``). Each frame's stream (``Frame.stream``; the
    frames of a plain source are one stream, in order) feeds flicker."""
    models = window[0].models
    assert models.active is not None and models.active.manifest.detector is not None
    spec = models.active.manifest.detector
    k = len(models.active.manifest.class_names)
    frames = [f for w in window for f in w.frames]
    cat = (lambda xs: xs[0]) if len(window) == 1 else np.concatenate
    dets = decode(cat([w.boxes for w in window]), cat([w.scores for w in window]), spec)
    n = len(dets)
    embedding = cat([w.embedding for w in window])
    ok = dets.known_mask & _finite_rows(embedding)
    predicted = np.where(ok, best_labels(dets), -1)
    ch = agrees = None
    if models.challenger is not None and all(w.challenger_boxes is not None for w in window):
        assert models.challenger.manifest.detector is not None
        ch = decode(cat([w.challenger_boxes for w in window]), cat([w.challenger_scores for w in window]),
                    models.challenger.manifest.detector)
        agrees = box_sets_agree(dets, ch, a_threshold=spec.operating_threshold,
                                b_threshold=models.challenger.manifest.detector.operating_threshold)
        agrees[~ok] = -1
    human = _human_boxes(frames, k)
    human_agrees = None
    if human is not None:
        human_agrees = box_sets_agree(dets, human, a_threshold=spec.operating_threshold, b_threshold=0.0)
        human_agrees[~ok] = -1
    latency = np.repeat([w.latency_ms for w in window], [len(w) for w in window])
    result = WindowResult([], predicted, np.full(n, -1, np.int64), None, latency, int(n - ok.sum()), models,
                          detections=dets, challenger_detections=ch, challenger_agrees=agrees,
                          human_agrees=human_agrees)
    idx = np.flatnonzero(ok)
    if not campaigns or not len(idx):
        return result

    from trigger import FrameBatch

    def sub(b: Detections | None) -> Detections | None:
        return b if b is None or len(idx) == n else b.take(idx)

    seen_at = [w.seen_at for w in window for _ in w.frames]
    images_kept, hashes = _images_or_hashes([f.image for f in frames], idx)
    batch = FrameBatch(
        boxes=sub(dets),
        embeddings=embedding if len(idx) == n else embedding[idx],
        challenger_boxes=sub(ch),
        human_boxes=sub(human),
        stream=[frames[i].stream or "" for i in idx],
        timestamps=[_stream_clock(frames[i], seen_at[i]) for i in idx],
        operating_threshold=spec.operating_threshold,
        tags=[frames[i].tags for i in idx],
        images=images_kept,
        hashes=hashes,
    )
    for j, (prio, campaign, decision) in _best_per_frame(batch, campaigns, now).items():
        i = int(idx[j])
        result.captures.append(_capture(
            frames[i], j, prio, campaign, decision, models, embedding[i], to_detection(dets, i),
            None if ch is None or not ch.known_mask[i] else to_detection(ch, i),
            frames[i].human_boxes if human is not None and human.known_mask[i] else None,
            device_id=device_id, now=seen_at[i],
        ))
    return result


def _best_per_frame(batch: Any, campaigns: Sequence[Campaign], now: float) -> dict[int, tuple[float, Campaign, Any]]:
    """Each kept row of ``batch`` (by row, in order) with the campaign that kept it at the highest priority and
    that campaign's decision. A campaign that cannot run on these frames is logged once and skipped."""
    best: dict[int, tuple[float, Campaign, Any]] = {}
    for campaign in campaigns:
        try:
            decision = campaign.evaluator.evaluate(batch, now=now)
        except ValueError as exc:  # a spec that needs what this device cannot give (say, embeddings)
            log_once(campaign.key, f"campaign {campaign.key} cannot run on this device's frames: {exc}")
            continue
        for j in np.flatnonzero(decision.keep).tolist():
            prio = float(decision.priority[j])
            if j not in best or prio > best[j][0]:
                best[j] = (prio, campaign, decision)
    return dict(sorted(best.items()))


def _human_boxes(frames: Sequence[Frame], k: int) -> Detections | None:
    """The objects the human marked per frame (unknown where a frame has none, or a class the model lacks), or
    None when no frame of the window has any."""
    if all(f.human_boxes is None for f in frames):
        return None
    known = np.array([f.human_boxes is not None and all(b.label < k for b in f.human_boxes.boxes)
                      for f in frames])
    rows = [[(b.x1, b.y1, b.x2, b.y2) for b in f.human_boxes.boxes] if kn and f.human_boxes else []
            for f, kn in zip(frames, known, strict=True)]
    labels = [[b.label for b in f.human_boxes.boxes] if kn and f.human_boxes else []
              for f, kn in zip(frames, known, strict=True)]
    return Detections.from_frames(rows, labels=labels, known=known)


def _stream_clock(frame: Frame, seen_at: float) -> float:
    """Seconds on the frame's stream clock: the video's own, else its capture time, else when it was seen."""
    if frame.stream_time is not None:
        return frame.stream_time
    return frame.ts if frame.ts is not None else seen_at


def _finite_rows(*arrays: NDArray[Any]) -> NDArray[Any]:
    """(n,) bool: rows where every array is finite (one cheap sum on the usual, all-finite path)."""
    n = arrays[0].shape[0]
    if all(np.isfinite(a.sum()) for a in arrays):
        return np.ones(n, bool)
    ok = np.ones(n, bool)
    for a in arrays:
        ok &= np.isfinite(a).all(axis=1)
    return ok


def _top1(logits: NDArray[Any], ok: NDArray[Any]) -> NDArray[Any]:
    """(n,) argmax per row, -1 where ``ok`` is False."""
    if ok.all():
        return np.argmax(logits, axis=1)  # type: ignore[no-any-return]
    return np.where(ok, np.argmax(np.where(ok[:, None], logits, 0), axis=1), -1)


def _images_or_hashes(images: list[NDArray[Any]], idx: NDArray[Any]) -> tuple[NDArray[Any] | None, NDArray[Any] | None]:
    """The rows as one (n, h, w[, c]) array for near-duplicate hashing (hashed lazily, only for frames
    that fire). Frames of different sizes cannot be stacked, and frames under 8x9 pixels are too small
    for a difference hash; those are hashed here, one by one, tiny ones enlarged first."""
    rows = [images[int(i)] for i in idx]
    first = rows[0].shape
    if all(r.shape == first for r in rows) and first[0] >= 8 and first[1] >= 9:
        return np.stack(rows), None
    from trigger import dhash

    def one(img: NDArray[Any]) -> NDArray[Any]:
        fy, fx = -(-8 // img.shape[0]), -(-9 // img.shape[1])
        if fy > 1 or fx > 1:
            img = np.repeat(np.repeat(img, fy, axis=0), fx, axis=1)
        hashed: NDArray[Any] = dhash(img[None])
        return hashed

    return None, np.concatenate([one(r) for r in rows])


def _capture(frame: Frame, j: int, prio: float, campaign: Campaign, decision: Any, models: LoadedModels,
             embedding: NDArray[Any], prediction: Prediction, challenger: Prediction | None,
             human: Prediction | None, *, device_id: str, now: float) -> Capture:
    """The Case fields for frame ``j`` of a decision: the active model's ``prediction``, the challenger's and the
    human's action (a Classification or a Detection, by task; None without one)."""
    assert models.active is not None
    values = decision.values[j]
    thresholds = decision.thresholds[j] if j < len(decision.thresholds) else {}
    hits = []
    for name in decision.fired[j]:
        v, thr = values.get(name), thresholds.get(name)
        hits.append(TriggerHit(
            name=str(name)[:MAX_NAME],
            value=float(v) if v is not None and math.isfinite(v) else prio,
            threshold=float(thr) if thr is not None and math.isfinite(thr) else None,
        ))
    scores = {}
    for name, arr in decision.scores.items():
        v = float(arr[j])
        if math.isfinite(v):
            scores[str(name)[:MAX_NAME]] = v
    fields: dict[str, Any] = dict(
        case_id=new_case_id(),
        device_id=device_id,
        captured_at=frame.ts if frame.ts is not None else now,
        model_version=models.active.version,
        prediction=prediction,
        priority=min(1.0, max(0.0, prio)),
        scores=scores,
        triggers=hits,
        campaign_id=campaign.campaign_id,
        campaign_version=campaign.version,
        human_action=human,
        tags=fit_tags(frame.tags),
        embedding=encode_embedding(embedding),
    )
    if models.challenger is not None and challenger is not None:
        fields["challenger"] = ChallengerOutput(models.challenger.version, challenger)
    return Capture(image=frame.image, fields=fields)


def _classification(probs: NDArray[Any]) -> Classification:
    """A classifier's output for one frame, ``probs: (k,)``."""
    return Classification(int(np.argmax(probs)), [float(p) for p in probs])
