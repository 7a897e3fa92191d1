"""Near-duplicate suppression, so a device parked in front of one scene uploads it once, not fifty times.

Two views of "the same scene": a difference hash of the image (:func:`dhash`, robust to small
exposure and compression changes; compare with :func:`hamming`) and the cosine distance between
embeddings. :class:`NearDuplicateFilter` remembers the last ``memory`` frames a device kept and
refuses new frames too close to any of them under either view.
"""

from __future__ import annotations

import base64
import functools
import math
from typing import Any

import numpy as np

from trigger._checks import U64, Bool, as_float, describe, positive_int

__all__ = ["NearDuplicateFilter", "dhash", "hamming"]

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def dhash(images: Any, *, size: int = 8) -> U64:
    """Difference hash. ``images: (n, h, w)`` or ``(n, h, w, c)`` uint8 -> ``(n,)`` uint64.

    Each image is turned to grey and averaged over a ``size x (size + 1)`` grid of cells (on up to
    8 x 8 evenly spaced pixels per cell), and each bit says whether a cell is brighter than its
    left neighbour: ``size * size`` bits (64 for the default
    8), in the low bits of the result. Needs ``h >= size`` and ``w >= size + 1``; ``size`` in 2..8.
    """
    size = positive_int(size, "size", minimum=2)
    if size > 8:
        raise ValueError(f"size must be in 2..8 (size * size bits must fit in 64); received {size}")
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8; received {describe(arr)}")
    if arr.ndim == 3:
        arr = arr[..., None]
    elif arr.ndim != 4 or arr.shape[3] not in (1, 3, 4):
        raise ValueError(
            f"images must have shape (n, h, w) or (n, h, w, c) with c in 1, 3, 4; "
            f"received {describe(arr)}"
        )
    n, h, w = arr.shape[:3]
    if h < size or w < size + 1:
        raise ValueError(f"images must be at least {size}x{size + 1} pixels (h x w); received {h}x{w}")
    small = _grey_cells(arr, size, size + 1)  # (n, size, size + 1)
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(n, size * size)
    padded = np.zeros((n, 64), np.uint8)
    padded[:, : size * size] = bits
    packed = np.packbits(padded, axis=1, bitorder="little")
    out: U64 = packed.view("<u8").reshape(n).astype(np.uint64)
    return out


def hamming(a: Any, b: Any) -> Any:
    """Pairwise Hamming distances between hashes. ``a: (n,)``, ``b: (m,)`` uint64 -> ``(n, m)`` int64."""
    x = _hashes(a, "a")
    y = _hashes(b, "b")
    return _popcount(x[:, None] ^ y[None, :])


class NearDuplicateFilter:
    """Streaming near-duplicate memory of the frames a device kept.

    A frame is a duplicate when its hash is within ``max_hamming`` bits of a remembered hash, or
    its embedding within cosine distance ``embedding_threshold`` of a remembered embedding (either
    check may be switched off with None; at least one must be on). ``hash_bits`` (a square: 4, 9,
    ..., 64) sets the dhash size used for ``images``. The memory holds the last ``memory`` frames.
    """

    def __init__(
        self,
        *,
        hash_bits: int = 64,
        max_hamming: int | None = 4,
        embedding_threshold: float | None = None,
        memory: int = 512,
    ) -> None:
        hash_bits = positive_int(hash_bits, "hash_bits", minimum=4)
        side = math.isqrt(hash_bits)
        if side * side != hash_bits or hash_bits > 64:
            raise ValueError(f"hash_bits must be a square from 4 to 64 (4, 9, ..., 64); received {hash_bits}")
        if max_hamming is not None:
            max_hamming = positive_int(max_hamming, "max_hamming", minimum=0)
            if max_hamming > hash_bits:
                raise ValueError(f"max_hamming must be at most hash_bits={hash_bits}; received {max_hamming}")
        if embedding_threshold is not None:
            t = float(embedding_threshold)
            if not 0.0 <= t <= 2.0:
                raise ValueError(
                    f"embedding_threshold must be a cosine distance in [0, 2]; "
                    f"received {embedding_threshold!r}"
                )
            embedding_threshold = t
        if max_hamming is None and embedding_threshold is None:
            raise ValueError("NearDuplicateFilter needs max_hamming or embedding_threshold (or both); received neither")
        self.hash_size = side
        self.hash_bits = hash_bits
        self.max_hamming = max_hamming
        self.embedding_threshold = embedding_threshold
        self.memory = positive_int(memory, "memory")
        self._hashes: U64 = np.zeros(0, np.uint64)
        self._emb: Any = None  # float32 (<= memory, d), unit rows

    def __len__(self) -> int:
        return max(len(self._hashes), 0 if self._emb is None else len(self._emb))

    def hashes(self, images: Any) -> U64:
        """The dhash this filter compares, for ``images`` (see :func:`dhash`)."""
        return dhash(images, size=self.hash_size)

    def is_duplicate(self, *, hashes: Any = None, embeddings: Any = None, images: Any = None) -> Bool:
        """Which frames are near a remembered one ``(n,)`` (the memory is not changed)."""
        h, e, n = self._inputs(hashes, embeddings, images)
        dup = np.zeros(n, bool)
        if h is not None and self.max_hamming is not None and len(self._hashes):
            dup |= _popcount(h[:, None] ^ self._hashes[None, :]).min(axis=1) <= self.max_hamming
        if e is not None and self.embedding_threshold is not None and self._emb is not None and len(self._emb):
            dup |= 1.0 - (e @ self._emb.T).max(axis=1) <= self.embedding_threshold
        return dup

    def add(self, *, hashes: Any = None, embeddings: Any = None, images: Any = None) -> None:
        """Remember these frames (oldest forgotten beyond ``memory``)."""
        h, e, _ = self._inputs(hashes, embeddings, images)
        if h is not None:
            self._hashes = np.concatenate([self._hashes, h])[-self.memory :]
        if e is not None:
            self._emb = e[-self.memory :] if self._emb is None else np.concatenate([self._emb, e])[-self.memory :]

    def filter(self, *, hashes: Any = None, embeddings: Any = None, images: Any = None) -> Bool:
        """Keep-mask ``(n,)`` of frames that are new, frame by frame: each is compared with the
        memory and with the earlier frames of this batch it kept, and remembered when kept."""
        h, e, n = self._inputs(hashes, embeddings, images)
        keep = np.zeros(n, bool)
        for i in range(n):
            hi = None if h is None else h[i : i + 1]
            ei = None if e is None else e[i : i + 1]
            if not self.is_duplicate(hashes=hi, embeddings=ei)[0]:
                keep[i] = True
                self.add(hashes=hi, embeddings=ei)
        return keep

    def state_dict(self) -> dict[str, Any]:
        """The memory as JSON-serialisable data (embeddings as base64 float16)."""
        emb = None
        if self._emb is not None:
            emb = {
                "shape": list(self._emb.shape),
                "float16": base64.b64encode(self._emb.astype("<f2").tobytes()).decode("ascii"),
            }
        return {"hashes": [int(x) for x in self._hashes], "embeddings": emb}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        try:
            hashes = np.array([int(x) for x in state["hashes"]], dtype=np.uint64)
            emb = state["embeddings"]
            if emb is not None:
                shape = tuple(int(s) for s in emb["shape"])
                raw = np.frombuffer(base64.b64decode(emb["float16"]), dtype="<f2")
                emb = raw.reshape(shape).astype(np.float32)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"not a NearDuplicateFilter state: {exc}") from exc
        self._hashes = hashes[-self.memory :]
        self._emb = None if emb is None else emb[-self.memory :]

    # -- internals ------------------------------------------------------------------------------

    def _inputs(self, hashes: Any, embeddings: Any, images: Any) -> tuple[U64 | None, Any, int]:
        h = None
        if self.max_hamming is not None:
            if hashes is not None:
                h = _hashes(hashes, "hashes")
            elif images is not None:
                h = self.hashes(images)
        e = None
        if embeddings is not None and self.embedding_threshold is not None:
            e = as_float(embeddings, "embeddings", ndim=2, dtype=np.float32)
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
            if self._emb is not None and e.shape[1] != self._emb.shape[1]:
                raise ValueError(f"embeddings must have shape (n, {self._emb.shape[1]}); received {describe(e)}")
        if h is None and e is None:
            wanted = " or ".join(
                name
                for name, on in (("hashes/images", self.max_hamming is not None),
                                 ("embeddings", self.embedding_threshold is not None))
                if on
            )
            raise ValueError(f"NearDuplicateFilter needs {wanted} for the checks it was configured with; received none")
        if h is not None and e is not None and len(h) != len(e):
            raise ValueError(f"hashes and embeddings must describe the same frames; received {len(h)} and {len(e)}")
        count = len(h) if h is not None else len(e)  # type: ignore[arg-type]
        return h, e, count


def _hashes(value: Any, what: str) -> U64:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of uint64 hashes; received {describe(arr)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integer hashes; received {describe(arr)}")
    out: U64 = arr.astype(np.uint64)
    return out


def _popcount(x: U64) -> Any:
    count = getattr(np, "bitwise_count", None)
    if count is not None:
        return count(x).astype(np.int64)
    by = x.reshape(*x.shape, 1).view(np.uint8)
    return _POP8[by].sum(axis=-1, dtype=np.int64)


def _grey_cells(images: Any, rows: int, cols: int) -> Any:
    """Grey means over a grid of ``rows x cols`` nearly equal cells: ``(n, h, w, c)`` uint8 ->
    ``(n, rows, cols)`` float32. Each cell's mean is taken over up to 8 x 8 evenly spaced pixels
    (all of them for small cells): the same hash for a fraction of the memory traffic."""
    n, h, w, c = images.shape
    ri, row_avg = _sampling(h, rows)
    ci, col_avg = _sampling(w, cols)
    grid = np.take(images[:, ri], ci, axis=2).astype(np.float32)  # (n, rows * pr, cols * pc, c)
    grey = grid[..., 0] if c == 1 else grid[..., :3] @ _LUMA
    return row_avg @ grey @ col_avg.T


@functools.lru_cache(maxsize=64)
def _sampling(size: int, cells: int) -> tuple[Any, Any]:
    """Sampled pixel positions along one axis and the ``(cells, samples)`` matrix averaging them per cell."""
    edges = (np.arange(cells + 1) * size) // cells
    per = max(1, min(8, size // cells))
    span = np.diff(edges)[:, None]
    positions = (edges[:-1, None] + ((np.arange(per)[None, :] * 2 + 1) * span) // (2 * per)).ravel()
    average = np.kron(np.eye(cells, dtype=np.float32), np.full((1, per), 1.0 / per, np.float32))
    return positions, average
