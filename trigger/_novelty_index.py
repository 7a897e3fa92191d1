"""The novelty bank's search index: a PCA projection and inverted lists, searched for the k nearest entries.

Banks under ``exact_below`` entries are searched exhaustively. Larger banks carry an index, built
once by the hub and shipped in the same file: a PCA projection to ``reduce_dim`` dimensions and an
inverted file (spherical k-means into ``n_lists`` lists in the projected space). A query scans the
``n_probe`` lists whose centroids are nearest in the projected space, keeps a shortlist of the
best candidates there, and re-ranks the shortlist with exact full-dimension cosine similarities.
A frame touches a few hundred kilobytes instead of the whole bank (40 MB for 10,000 x 1024
float32), which is what keeps novelty at tens of microseconds per frame on one CPU thread beside
the model's inference. Every reported distance is an exact distance to a real bank entry and the
search can only miss neighbours, never invent closer ones, so the indexed distance is never below
the exact one; ``exact=True`` scans everything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trigger._checks import F32, F64, I64, as_float, describe

SHORTLIST = 24  # candidates re-ranked in full dimension per query (at least 3k)


class Index:
    """Inverted lists over a bank's ``vectors`` ``(m, d)``, which must already be in list order.

    ``projection``: ``(d, r)`` or None (scan in full dimension); ``centroids``: ``(L, r)`` unit rows,
    none for exhaustive search; ``offsets``: ``(L + 1,)``, list j holds rows ``offsets[j]:offsets[j + 1]``.
    Every argument is validated, so a bank read from a file cannot hold an inconsistent index.
    """

    def __init__(self, vectors: F32, projection: Any = None, centroids: Any = None, offsets: Any = None) -> None:
        m, d = vectors.shape
        self.vectors = vectors
        self.projection: F32 | None = None
        if projection is not None and np.size(projection):
            proj = np.ascontiguousarray(as_float(projection, "bank projection", ndim=2, dtype=np.float32))
            if proj.shape[0] != d or not 1 <= proj.shape[1] <= d:
                raise ValueError(
                    f"bank projection must have shape ({d}, r) with 1 <= r <= {d}; "
                    f"received {describe(proj)}"
                )
            self.projection = proj
        r = d if self.projection is None else self.projection.shape[1]
        if centroids is None or len(centroids) == 0:
            self.centroids: F32 = np.zeros((0, r), np.float32)
            self.offsets: I64 = np.zeros(1, np.int64)
        else:
            c = np.ascontiguousarray(as_float(centroids, "bank centroids", ndim=2, dtype=np.float32))
            if c.shape[1] != r:
                raise ValueError(f"bank centroids must have shape (L, {r}); received {describe(c)}")
            o = np.asarray(offsets if offsets is not None else [], dtype=np.int64)
            if o.shape != (c.shape[0] + 1,) or o[0] != 0 or o[-1] != m or np.any(np.diff(o) < 0):
                raise ValueError(
                    f"bank offsets must be {c.shape[0] + 1} non-decreasing integers from 0 to {m}; "
                    f"received {describe(o)}"
                )
            self.centroids, self.offsets = c, o
        reduced = vectors if self.projection is None else np.ascontiguousarray(vectors @ self.projection)
        bounds = list(zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True))
        self._lists: list[F32] = [reduced[a:b] for a, b in bounds]
        ids = np.arange(m, dtype=np.int64)
        self._ids: list[I64] = [ids[a:b] for a, b in bounds]

    @property
    def n_lists(self) -> int:
        """Inverted lists; 0 = exhaustive search."""
        return int(self.centroids.shape[0])

    @property
    def reduced_dim(self) -> int:
        """Dimensions the lists are scanned in."""
        return int(self.vectors.shape[1] if self.projection is None else self.projection.shape[1])

    def top_k(self, q: F32, k: int, n_probe: int, exact: bool, *, want_index: bool) -> tuple[F32, I64 | None]:
        """Dot products ``(n, k)`` of the k most similar entries (unordered) and their indices.

        ``q: (n, d)`` float32, not necessarily normalised; ``k`` at most the bank size.
        """
        if exact or self.n_lists == 0:
            return exhaustive(q, self.vectors, k, want_index)
        n, n_lists = q.shape[0], self.n_lists
        z = q if self.projection is None else q @ self.projection  # (n, r)
        c = z @ self.centroids.T  # (n, L)
        n_probe = min(n_probe, n_lists)
        if n_probe == 1:
            probes = c.argmax(axis=1)[:, None]
        else:
            probes = np.argpartition(c, n_lists - n_probe, axis=1)[:, n_lists - n_probe :]
        short = max(SHORTLIST, 3 * k)
        sims = np.empty((n, k), np.float32)
        idx = np.empty((n, k), np.int64) if want_index else None
        lists, ids, vectors = self._lists, self._ids, self.vectors
        for i, row in enumerate(probes.tolist()):
            zi = z[i]
            if n_probe == 1:
                s, cand = lists[row[0]] @ zi, ids[row[0]]
            else:
                s = np.concatenate([lists[j] @ zi for j in row])
                cand = np.concatenate([ids[j] for j in row])
            size = s.shape[0]
            if size > short:  # the shortlist: every candidate at least as good as the short-th best
                cand = cand[s >= np.partition(s, size - short)[size - short]]
            if cand.shape[0] < k:  # the probed lists hold fewer than k entries: answer exactly
                s_ex, i_ex = exhaustive(q[i : i + 1], vectors, k, want_index)
                sims[i] = s_ex[0]
                if idx is not None and i_ex is not None:
                    idx[i] = i_ex[0]
                continue
            exact_s = vectors[cand] @ q[i]  # re-rank the shortlist in full dimension
            top = cand.shape[0] - k
            if idx is None:
                sims[i] = np.partition(exact_s, top)[top:]
            else:
                best = np.argpartition(exact_s, top)[top:]
                sims[i] = exact_s[best]
                idx[i] = cand[best]
        return sims, idx


def build(vectors: F32, n_lists: int, reduce_dim: int | None, rng: np.random.Generator) -> tuple[I64, F32 | None,
                                                                                                  F32, I64]:
    """Plan the index of unit rows ``vectors: (m, d)`` with ``n_lists`` >= 2 lists (``reduce_dim``
    below d projects first): ``(order, projection, centroids, offsets)``, where ``vectors[order]``
    is the list order that :class:`Index` expects."""
    d = vectors.shape[1]
    projection = None
    if reduce_dim is not None and reduce_dim < d:
        projection = _pca(vectors, reduce_dim)
    reduced = vectors if projection is None else vectors @ projection
    centroids, assign = _spherical_kmeans(normalise(reduced).astype(np.float32), n_lists, rng)
    order: I64 = np.argsort(assign, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=n_lists))]).astype(np.int64)
    return order, projection, centroids, offsets


def exhaustive(q: F32, vectors: F32, k: int, want_index: bool) -> tuple[F32, I64 | None]:
    """:meth:`Index.top_k` by scanning every row of ``vectors``."""
    n, m = q.shape[0], vectors.shape[0]
    sims = np.empty((n, k), np.float32)
    idx = np.empty((n, k), np.int64) if want_index else None
    step = max(1, (1 << 22) // m)  # bound the (rows, m) similarity block to ~16 MB
    for a in range(0, n, step):
        s = q[a : a + step] @ vectors.T
        if idx is None:
            sims[a : a + step] = np.partition(s, m - k, axis=1)[:, -k:]
        else:
            top = np.argpartition(s, m - k, axis=1)[:, -k:]
            sims[a : a + step] = np.take_along_axis(s, top, axis=1)
            idx[a : a + step] = top
    return sims, idx


def normalise(x: Any) -> Any:
    """Rows of ``x: (m, d)`` scaled to unit length (all-zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-30)


def row_norms(q: F32) -> F64:
    """Row norms as float64, with zero rows at +inf so that their similarities come out as 0."""
    sq = (q * q).sum(axis=1, dtype=np.float64)
    out: F64 = np.sqrt(sq, out=sq)
    out[out == 0.0] = np.inf
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _pca(x: F32, r: int) -> F32:
    """The ``(d, r)`` orthonormal basis that best preserves dot products between rows of ``x``
    (top eigenvectors of the uncentred second moment), columns by decreasing variance."""
    gram = (x.T.astype(np.float64) @ x.astype(np.float64)) / max(1, x.shape[0])
    _, vecs = np.linalg.eigh(gram)
    out: F32 = np.ascontiguousarray(vecs[:, ::-1][:, :r]).astype(np.float32)
    return out


def _spherical_kmeans(x: F32, n_lists: int, rng: np.random.Generator, iters: int = 12) -> tuple[F32, I64]:
    """Centroids ``(L, d)`` (unit rows) and the list of each row, by cosine k-means."""
    m = x.shape[0]
    centroids = x[rng.choice(m, n_lists, replace=False)].copy()
    assign = np.zeros(m, np.int64)
    for it in range(iters):
        sims = x @ centroids.T
        new = sims.argmax(axis=1)
        if it and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=n_lists)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # re-seed empty lists with the rows their centroids fit worst
            worst = np.argsort(sims[np.arange(m), assign])[: empty.size]
            sums[empty] = x[worst]
        centroids = normalise(sums).astype(np.float32)
    assign = (x @ centroids.T).argmax(axis=1).astype(np.int64)
    return centroids, assign
