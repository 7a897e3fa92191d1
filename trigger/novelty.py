"""Novelty: cosine k-NN distance of an embedding to a bank of embeddings the fleet already has.

The hub builds a :class:`NoveltyBank` from the embeddings of what is already labeled, saves it as
``.npz`` (deterministic bytes, so its sha256 names it) and ships it to devices; a device scores
each frame's embedding against it. A frame far from everything in the bank shows the model
something its training data does not cover.

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

Near-duplicate suppression (:func:`dhash`, :func:`hamming`, :class:`NearDuplicateFilter`) lives
in :mod:`trigger.dedup` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from trigger._checks import F32, F64, I64, as_float, as_labels, describe, positive_int
from trigger.dedup import NearDuplicateFilter, dhash, hamming

__all__ = ["NearDuplicateFilter", "NoveltyBank", "dhash", "hamming"]

FORMAT = "flywheel.novelty/1"
SHORTLIST = 24  # candidates re-ranked in full dimension per query (at least 3k)
_KEYS = {"format", "vectors", "labels", "projection", "centroids", "offsets", "meta"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class NoveltyBank:
    """L2-normalised float32 embeddings ``(m, d)`` with optional class labels and a search index.

    Build with :meth:`from_embeddings`, ship with :meth:`save`/:meth:`to_bytes`, read back with
    :meth:`load`/:meth:`from_bytes` (validated), query with :meth:`distance` or :meth:`search`.
    """

    def __init__(
        self,
        vectors: F32,
        *,
        labels: I64 | None = None,
        projection: F32 | None = None,
        centroids: F32 | None = None,
        offsets: I64 | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        vectors = np.ascontiguousarray(as_float(vectors, "bank vectors", ndim=2, dtype=np.float32))
        m, d = vectors.shape
        if m < 1 or d < 1:
            raise ValueError(f"a novelty bank needs at least one embedding of dimension >= 1; received {vectors.shape}")
        norms = np.linalg.norm(vectors, axis=1)
        if np.any((np.abs(norms - 1.0) > 1e-3) & (norms > 1e-6)):
            raise ValueError("bank vectors must be L2-normalised rows (or all-zero); use NoveltyBank.from_embeddings")
        self._vectors: F32 = vectors
        self._labels: I64 = (
            np.full(m, -1, np.int64) if labels is None else as_labels(labels, "bank labels", n=m)
        )
        self._projection: F32 | None = None
        if projection is not None and np.size(projection):
            proj = np.ascontiguousarray(as_float(projection, "bank projection", ndim=2, dtype=np.float32))
            if proj.shape[0] != d or not 1 <= proj.shape[1] <= d:
                raise ValueError(
                    f"bank projection must have shape ({d}, r) with 1 <= r <= {d}; "
                    f"received {describe(proj)}"
                )
            self._projection = proj
        r = d if self._projection is None else self._projection.shape[1]
        if centroids is None or len(centroids) == 0:
            self._centroids: F32 = np.zeros((0, r), np.float32)
            self._offsets: I64 = np.zeros(1, np.int64)
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
            self._centroids, self._offsets = c, o
        reduced = vectors if self._projection is None else np.ascontiguousarray(vectors @ self._projection)
        bounds = list(zip(self._offsets[:-1].tolist(), self._offsets[1:].tolist(), strict=True))
        self._lists: list[F32] = [reduced[a:b] for a, b in bounds]
        ids = np.arange(m, dtype=np.int64)
        self._ids: list[I64] = [ids[a:b] for a, b in bounds]
        meta = dict(meta or {})
        for key, value in meta.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"bank meta must map strings to strings; received {key!r}: {value!r}")
        self._meta: dict[str, str] = meta
        self._sha256: str | None = None

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Any,
        *,
        labels: Any = None,
        max_size: int | None = None,
        seed: int = 0,
        n_lists: int | None = None,
        reduce_dim: int | None = 32,
        exact_below: int = 2048,
        meta: Mapping[str, str] | None = None,
    ) -> NoveltyBank:
        """Build a bank from raw embeddings ``(m, d)`` (any scale: rows are L2-normalised here).

        ``labels: (m,)`` int classes (-1 = unknown). ``max_size`` caps the bank: a seeded sample,
        stratified by label so rare classes keep all their examples (they are exactly what should
        stop looking novel). ``n_lists``: inverted lists of the index; by default none (exhaustive
        search) under ``exact_below`` entries, else ``round(sqrt(m))``. ``reduce_dim``: dimensions
        the index scans in (PCA of the bank; None or >= d scans in full dimension). ``meta``: free
        strings shipped with the bank (put the model version the embeddings came from there).
        """
        x = as_float(embeddings, "embeddings", ndim=2)
        m, d = x.shape
        if m < 1 or d < 1:
            raise ValueError(f"embeddings must be (m, d) with m, d >= 1; received {describe(x)}")
        lab = np.full(m, -1, np.int64) if labels is None else as_labels(labels, "labels", n=m)
        rng = np.random.default_rng(seed)
        if max_size is not None and m > positive_int(max_size, "max_size"):
            keep = _stratified_sample(lab, max_size, rng)
            x, lab = x[keep], lab[keep]
            m = x.shape[0]
        vectors = _normalise(x).astype(np.float32)
        if n_lists is None:
            n_lists = 0 if m < exact_below else int(round(np.sqrt(m)))
        n_lists = min(positive_int(n_lists, "n_lists", minimum=0), m)
        if n_lists <= 1:
            return cls(vectors, labels=lab, meta=meta)
        projection = None
        if reduce_dim is not None and positive_int(reduce_dim, "reduce_dim") < d:
            projection = _pca(vectors, reduce_dim)
        reduced = vectors if projection is None else vectors @ projection
        centroids, assign = _spherical_kmeans(_normalise(reduced).astype(np.float32), n_lists, rng)
        order = np.argsort(assign, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=n_lists))]).astype(np.int64)
        return cls(
            vectors[order], labels=lab[order], projection=projection, centroids=centroids, offsets=offsets, meta=meta
        )

    # -- properties -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    def __repr__(self) -> str:
        return f"NoveltyBank(size={len(self)}, dim={self.dim}, n_lists={self.n_lists}, reduced_dim={self.reduced_dim})"

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self._vectors.shape[1])

    @property
    def n_lists(self) -> int:
        """Inverted lists in the index; 0 = exhaustive search."""
        return int(self._centroids.shape[0])

    @property
    def reduced_dim(self) -> int:
        """Dimensions the index scans in (``dim`` when there is no projection)."""
        return self.dim if self._projection is None else int(self._projection.shape[1])

    @property
    def vectors(self) -> F32:
        """The normalised embeddings ``(m, d)``, in index order (read-only view)."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    @property
    def labels(self) -> I64:
        """Class of each bank entry ``(m,)``, -1 where unknown (read-only view)."""
        v = self._labels.view()
        v.flags.writeable = False
        return v

    @property
    def meta(self) -> dict[str, str]:
        """Free-form strings shipped with the bank (e.g. ``model_version``)."""
        return dict(self._meta)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the saved bytes (of the bytes read, for a loaded bank)."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._sha256

    # -- querying -------------------------------------------------------------------------------

    def distance(self, embeddings: Any, *, k: int = 5, n_probe: int | None = None, exact: bool = False) -> F64:
        """Mean cosine distance to the ``k`` nearest bank entries. ``embeddings: (n, d)`` -> ``(n,)``.

        In ``[0, 2]``: 0 = the frame is already in the bank, 1 = unrelated (orthogonal); an
        all-zero embedding is at distance 1 from everything. ``k`` is capped at the bank size.
        ``n_probe``: lists scanned per query when the bank is indexed (default
        :meth:`default_probe`); ``exact=True`` scans everything.
        """
        return self._distance(self._queries(embeddings), positive_int(k, "k"), self._probe(n_probe), exact)

    def search(
        self, embeddings: Any, *, k: int = 5, n_probe: int | None = None, exact: bool = False
    ) -> tuple[F64, I64]:
        """The ``k`` nearest entries: cosine distances ``(n, k)`` ascending and their indices ``(n, k)``
        into :attr:`vectors`/:attr:`labels` (``k`` capped at the bank size)."""
        q = self._queries(embeddings)
        k = min(positive_int(k, "k"), len(self))
        sims, idx = self._top_k(q, k, self._probe(n_probe), exact, want_index=True)
        assert idx is not None
        cos = sims.astype(np.float64) / _norms(q)[:, None]
        order = np.argsort(-cos, axis=1, kind="stable")
        dist = np.clip(1.0 - np.take_along_axis(cos, order, axis=1), 0.0, 2.0)
        return dist, np.take_along_axis(idx, order, axis=1)

    def default_probe(self) -> int:
        """Lists scanned per query by default: 4% of them, at least 4 (0 for an exhaustive bank)."""
        return min(self.n_lists, max(4, round(self.n_lists / 25)))

    # -- persistence ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The bank as ``.npz`` bytes; the same bank always gives the same bytes."""
        arrays = {
            "format": np.array(FORMAT),
            "vectors": self._vectors,
            "labels": self._labels,
            "projection": np.zeros((self.dim, 0), np.float32) if self._projection is None else self._projection,
            "centroids": self._centroids,
            "offsets": self._offsets,
            "meta": np.array(json.dumps(self._meta, sort_keys=True)),
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                item = io.BytesIO()
                np.lib.format.write_array(item, np.require(arr, requirements="C"), allow_pickle=False)  # type: ignore[no-untyped-call]
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                zf.writestr(info, item.getvalue())
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the bank to ``path`` atomically (temp file + rename); returns its sha256."""
        data = self.to_bytes()
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._sha256 = hashlib.sha256(data).hexdigest()
        return self._sha256

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_sha256: str | None = None) -> NoveltyBank:
        """Read and validate ``.npz`` bytes written by :meth:`to_bytes` (any other layout, dtype,
        shape or non-finite value is refused with a :class:`ValueError` naming it)."""
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise ValueError(f"novelty bank sha256 mismatch: expected {expected_sha256}, received {digest}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                names = set(npz.files)
                if names != _KEYS:
                    raise ValueError(
                        f"novelty bank must hold arrays {sorted(_KEYS)}; received {sorted(names)}"
                    )
                arrays = {name: npz[name] for name in _KEYS}
        except ValueError as exc:
            if "must hold arrays" in str(exc):
                raise
            raise ValueError(f"novelty bank is not a readable .npz file: {exc}") from exc
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"novelty bank is not a readable .npz file: {exc}") from exc
        fmt = arrays["format"]
        if fmt.shape != () or fmt.dtype.kind != "U" or str(fmt) != FORMAT:
            raise ValueError(f"novelty bank format must be {FORMAT!r}; received {fmt!r:.80}")
        expected = {
            "vectors": np.float32, "projection": np.float32, "centroids": np.float32, "labels": np.int64,
            "offsets": np.int64,
        }
        for name, dtype in expected.items():
            if arrays[name].dtype != dtype:
                raise ValueError(
                    f"novelty bank array {name!r} must have dtype {np.dtype(dtype)}; received {arrays[name].dtype}"
                )
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"novelty bank meta must be a JSON object; received {str(arrays['meta'])!r:.80}") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"novelty bank meta must be a JSON object; received {meta!r:.80}")
        vectors = arrays["vectors"]
        if vectors.ndim != 2 or arrays["projection"].ndim != 2 or arrays["projection"].shape[0] != vectors.shape[1]:
            raise ValueError(
                f"novelty bank projection must have shape (d, r) for vectors of shape (m, d); received "
                f"{arrays['projection'].shape} for {vectors.shape}"
            )
        bank = cls(
            vectors,
            labels=arrays["labels"],
            projection=arrays["projection"],
            centroids=arrays["centroids"],
            offsets=arrays["offsets"],
            meta=meta,
        )
        if bank.n_lists == 0 and (arrays["centroids"].ndim != 2 or arrays["centroids"].shape[0] != 0):
            raise ValueError(f"novelty bank centroids must have shape (L, r); received {arrays['centroids'].shape}")
        bank._sha256 = digest
        return bank

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> NoveltyBank:
        """Read and validate a bank saved with :meth:`save`; see :meth:`from_bytes`."""
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read(), expected_sha256=expected_sha256)

    # -- internals ------------------------------------------------------------------------------

    def _queries(self, embeddings: Any) -> F32:
        q: F32 = as_float(embeddings, "embeddings", ndim=2, dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}) to match the bank; received {describe(q)}")
        return q

    def _probe(self, n_probe: int | None) -> int:
        if n_probe is None:
            return self.default_probe()
        return min(positive_int(n_probe, "n_probe"), max(self.n_lists, 1))

    def _distance(self, q: F32, k: int, n_probe: int, exact: bool) -> F64:
        """Unchecked :meth:`distance`: ``q`` is float32 ``(n, d)``, not necessarily normalised."""
        k = min(k, len(self))
        sims, _ = self._top_k(q, k, n_probe, exact, want_index=False)
        if q.shape[0] == 1:  # the per-frame case, in plain floats
            norm = math.sqrt(float(np.dot(q[0], q[0])))
            dist = 1.0 - float(sims.sum(dtype=np.float64)) / (k * norm) if norm > 0 else 1.0
            return np.array([min(max(dist, 0.0), 2.0)])
        out: F64 = 1.0 - sims.sum(axis=1, dtype=np.float64) / (k * _norms(q))
        np.clip(out, 0.0, 2.0, out=out)
        return out

    def _top_k(self, q: F32, k: int, n_probe: int, exact: bool, *, want_index: bool) -> tuple[F32, I64 | None]:
        """Dot products ``(n, k)`` of the k most similar entries (unordered) and their indices."""
        if exact or self.n_lists == 0:
            return _exhaustive(q, self._vectors, k, want_index)
        n, n_lists = q.shape[0], self.n_lists
        z = q if self._projection is None else q @ self._projection  # (n, r)
        c = z @ self._centroids.T  # (n, L)
        n_probe = min(n_probe, n_lists)
        if n_probe == 1:
            probes = c.argmax(axis=1)[:, None]
        else:
            probes = np.argpartition(c, n_lists - n_probe, axis=1)[:, n_lists - n_probe :]
        short = max(SHORTLIST, 3 * k)
        sims = np.empty((n, k), np.float32)
        idx = np.empty((n, k), np.int64) if want_index else None
        lists, ids, vectors = self._lists, self._ids, self._vectors
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
                s_ex, i_ex = _exhaustive(q[i : i + 1], vectors, k, want_index)
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


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _normalise(x: Any) -> Any:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-30)


def _norms(q: F32) -> F64:
    """Row norms as float64, with zero rows at +inf so that their similarities come out as 0."""
    sq = (q * q).sum(axis=1, dtype=np.float64)
    out: F64 = np.sqrt(sq, out=sq)
    out[out == 0.0] = np.inf
    return out


def _exhaustive(q: F32, vectors: F32, k: int, want_index: bool) -> tuple[F32, I64 | None]:
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
        centroids = _normalise(sums).astype(np.float32)
    assign = (x @ centroids.T).argmax(axis=1).astype(np.int64)
    return centroids, assign


def _stratified_sample(labels: I64, size: int, rng: np.random.Generator) -> I64:
    """Indices of ``size`` rows, spread evenly over classes (water-filling), sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros_like(counts)
    remaining, left = size, len(classes)
    for i in np.argsort(counts, kind="stable"):
        quota[i] = min(counts[i], remaining // left)
        remaining -= int(quota[i])
        left -= 1
    # hand out what integer division left over, largest classes first
    for i in np.argsort(-counts, kind="stable"):
        if remaining == 0:
            break
        extra = min(int(counts[i] - quota[i]), remaining)
        quota[i] += extra
        remaining -= extra
    picks = [
        rng.choice(np.flatnonzero(labels == c), int(q), replace=False) for c, q in zip(classes, quota, strict=True)
    ]
    out: I64 = np.sort(np.concatenate(picks)).astype(np.int64)
    return out
