"""The frame before each frame of a batch in its video stream, from this batch or the last one seen (for flicker).

Frames of one stream arrive in capture order; ``stream: (n,)`` names each frame's stream (ints or strings).
:class:`StreamHistory` remembers the last frame of each stream between batches, so a stream fed one frame at a
time or in batches gives the same predecessors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from trigger._checks import F64, I64, as_float, describe
from trigger.boxes import Boxes, _make, _take

_Last = tuple[Boxes, float]  # a stream's last frame (one frame, no probs) and its capture time (NaN: unknown)


class StreamHistory:
    """The last frame of each of at most ``limit`` streams (the least recently seen is forgotten first)."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._last: dict[Any, _Last] = {}

    def previous(self, boxes: Boxes, stream: Any, timestamps: F64 | None) -> tuple[Boxes, F64]:
        """See :func:`previous_frames`, with the frames remembered from earlier batches."""
        return previous_frames(boxes, stream, timestamps, self._last)

    def remember(self, boxes: Boxes, stream: Any, timestamps: F64 | None) -> None:
        """Keep the last frame of each stream in this batch."""
        if boxes.n == 0:
            return
        keys, inv, order, _ = _groups(stream)
        s = inv[order]
        last = np.ones(s.shape[0], bool)
        last[:-1] = s[1:] != s[:-1]
        rows = order[last]
        frames = _take(_without_probs(boxes), rows)
        for j, row in enumerate(rows.tolist()):
            key = keys[s[last][j]].item()
            self._last.pop(key, None)
            self._last[key] = (_take(frames, np.array([j])), np.nan if timestamps is None else float(timestamps[row]))
        while len(self._last) > self.limit:
            self._last.pop(next(iter(self._last)))

    def clear(self) -> None:
        self._last.clear()

    def __len__(self) -> int:
        return len(self._last)


def previous_frames(boxes: Boxes, stream: Any, timestamps: F64 | None,
                    last: Mapping[Any, _Last] | None = None) -> tuple[Boxes, F64]:
    """For each frame of ``boxes``, the boxes of the frame before it in its stream, and the time between them.

    ``stream: (n,)`` keys (checked by :func:`as_streams`); ``timestamps: (n,)`` seconds or None; ``last``:
    stream key -> the stream's last frame from an earlier batch. Returns ``(previous, gap)``: ``previous`` has
    n frames (without probs), unknown (``known`` False) for a frame with no predecessor; ``gap: (n,)`` seconds,
    NaN where a time is unknown.
    """
    n = boxes.n
    if n == 0:
        return Boxes.empty(0), np.zeros(0)
    keys, inv, order, first = _groups(stream)
    src_sorted = np.empty(n, np.int64)
    src_sorted[1:] = order[:-1]
    src_sorted[first] = -1
    src = np.empty(n, np.int64)
    src[order] = src_sorted  # the batch row before each frame in its stream, -1 for a stream's first frame
    memory: list[Boxes] = []
    memory_ts: list[float] = []
    if last:
        for row in order[first].tolist():
            got = last.get(keys[inv[row]].item())
            if got is not None:
                src[row] = -2 - len(memory)  # decoded below
                memory.append(got[0])
                memory_ts.append(got[1])
    own = _without_probs(boxes)
    combined = Boxes.concat([*memory, own]) if memory else own
    offset = len(memory)
    idx = np.where(src >= 0, src + offset, np.where(src <= -2, -2 - src, -1))
    previous = _take(combined, idx)
    gap = np.full(n, np.nan)
    if timestamps is not None:
        ts = np.concatenate([np.asarray(memory_ts, np.float64), timestamps])
        has = idx >= 0
        gap[has] = timestamps[has] - ts[idx[has]]
    return previous, gap


def as_streams(value: Any, n: int, what: str = "stream") -> Any:
    """``value`` as an ``(n,)`` array of stream keys: integers or strings."""
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise ValueError(f"{what} must name the stream of each of the {n} frames (shape ({n},)); "
                         f"received {describe(arr)}")
    if n and arr.dtype.kind not in "iuUS":
        if arr.dtype.kind == "O" and all(isinstance(x, str) for x in arr.tolist()):
            return arr.astype(str)
        raise ValueError(f"{what} must hold integers or strings (one stream id per frame); received {describe(arr)}")
    return arr


def as_timestamps(value: Any, n: int, what: str = "timestamps") -> F64:
    """``value`` as ``(n,)`` finite float64 seconds."""
    arr: F64 = as_float(value, what, ndim=1)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},) (seconds, one per frame); received {describe(arr)}")
    return arr


def _groups(stream: Any) -> tuple[Any, I64, I64, Any]:
    """``(keys, inverse, order, first)``: the distinct streams, each frame's stream, the frames grouped by
    stream in batch order, and which of those grouped rows starts its stream."""
    keys, inv = np.unique(stream, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    order = np.argsort(inv, kind="stable")
    s = inv[order]
    first = np.ones(s.shape[0], bool)
    first[1:] = s[1:] != s[:-1]
    return keys, inv, order, first


def _without_probs(b: Boxes) -> Boxes:
    return b if b.probs is None else _make(b.boxes, b.scores, b.labels, b.offsets, None, b.known)
