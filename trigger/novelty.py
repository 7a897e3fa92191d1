"""Novelty: cosine k-NN distance of an embedding to a bank of embeddings the fleet already has.

The hub builds a :class:`NoveltyBank` from the embeddings of what is already labeled, saves it as
``.npz`` (deterministic bytes, so its sha256 names it) and ships it to devices; a device scores
each frame's embedding against it. A frame far from everything in the bank shows the model
something its training data does not cover.

Banks under ``exact_below`` entries are searched exhaustively. Larger banks carry a search index,
built once by the hub and shipped in the same file (a PCA projection and inverted lists, described
in ``trigger._novelty_index``), which keeps novelty at tens of microseconds per frame on one CPU
thread. The indexed distance is never below the exact one; ``exact=True`` scans everything.
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
from trigger._novelty_index import Index, build, normalise, row_norms

__all__ = ["NoveltyBank", "sample_rows"]

FORMAT = "flywheel.novelty/1"
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
        self._index = Index(vectors, projection, centroids, offsets)
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
        vectors = normalise(x).astype(np.float32)
        if n_lists is None:
            n_lists = 0 if m < exact_below else int(round(np.sqrt(m)))
        n_lists = min(positive_int(n_lists, "n_lists", minimum=0), m)
        if n_lists <= 1:
            return cls(vectors, labels=lab, meta=meta)
        reduce = None if reduce_dim is None else positive_int(reduce_dim, "reduce_dim")
        order, projection, centroids, offsets = build(vectors, n_lists, reduce, rng)
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
        return self._index.n_lists

    @property
    def reduced_dim(self) -> int:
        """Dimensions the index scans in (``dim`` when there is no projection)."""
        return self._index.reduced_dim

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
        sims, idx = self._index.top_k(q, k, self._probe(n_probe), exact, want_index=True)
        assert idx is not None
        cos = sims.astype(np.float64) / row_norms(q)[:, None]
        order = np.argsort(-cos, axis=1, kind="stable")
        dist = np.clip(1.0 - np.take_along_axis(cos, order, axis=1), 0.0, 2.0)
        return dist, np.take_along_axis(idx, order, axis=1)

    def default_probe(self) -> int:
        """Lists scanned per query by default: 4% of them, at least 4 (0 for an exhaustive bank)."""
        return min(self.n_lists, max(4, round(self.n_lists / 25)))

    # -- persistence ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The bank as ``.npz`` bytes; the same bank always gives the same bytes."""
        index = self._index
        arrays = {
            "format": np.array(FORMAT),
            "vectors": self._vectors,
            "labels": self._labels,
            "projection": np.zeros((self.dim, 0), np.float32) if index.projection is None else index.projection,
            "centroids": index.centroids,
            "offsets": index.offsets,
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
        sims, _ = self._index.top_k(q, k, n_probe, exact, want_index=False)
        if q.shape[0] == 1:  # the per-frame case, in plain floats
            norm = math.sqrt(float(np.dot(q[0], q[0])))
            dist = 1.0 - float(sims.sum(dtype=np.float64)) / (k * norm) if norm > 0 else 1.0
            return np.array([min(max(dist, 0.0), 2.0)])
        out: F64 = 1.0 - sims.sum(axis=1, dtype=np.float64) / (k * row_norms(q))
        np.clip(out, 0.0, 2.0, out=out)
        return out


def sample_rows(labels: Any, size: int, *, seed: int = 0) -> I64:
    """The rows ``(<= size,)`` sorted, that :meth:`NoveltyBank.from_embeddings` keeps with ``max_size=size``
    and ``seed``: a seeded sample stratified by ``labels: (m,)`` (-1 = unknown), all rows when ``m <= size``.

    Pick the rows first to embed only those (``from_embeddings(emb[rows], labels=labels[rows])`` then gives
    the same bank as embedding everything)."""
    arr = np.asarray(labels)
    lab = as_labels(arr, "labels", n=arr.shape[0] if arr.ndim == 1 else -1)
    size = positive_int(size, "size")
    if len(lab) <= size:
        return np.arange(len(lab), dtype=np.int64)
    return _stratified_sample(lab, size, np.random.default_rng(seed))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


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
