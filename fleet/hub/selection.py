"""Which unlabeled cases to label next, under a budget: pure numpy strategies looked up by name.

Every strategy has the same signature::

    strategy(uncertainty (n,), embeddings (n, d) | None, budget, *, rng, labeled (m, d) | None,
             dup_threshold) -> indices (<= budget,) into the pool, best first

``uncertainty`` is in [0, 1], higher = more informative. Candidates whose embedding lies within
``dup_threshold`` cosine distance of an already-labeled embedding are skipped by every strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from fleet.errors import InvalidInput
from trigger.box_scores import box_disagreement, box_uncertainty
from trigger.boxes import Boxes
from trigger.scores import least_confidence

# adaptive: typical frames for the classes the active model trained on fewer than this many frames of (its manifest's
# ``train_n/class=<name>``, else ``train_n`` over its classes): the budget TypiClust's low-budget regime counts is the
# model's, not the hub's labels alone (a model trained on thousands of frames is not in a cold start before the hub's
# 100th label). In the demo's loop on Fashion-MNIST, 4 turns of 40 labels (benchmarks/RESULTS.md, 2026-12-05): from 3
# seed frames a class, typiclust needed fewer of random's labels than uncertainty+diversity on every seed (0.60 / 0.60 /
# 0.55 against 0.61 / 0.95 / 0.63); from the demo's 15 a class the two were level (0.28 / 0.25 / 0.52 against 0.29 /
# 0.27 / 0.40), as on digits from 3 a class. The bar is the second point, one run a seed; not a measured optimum. Per
# class (cold_start_mix, from each class's count in the manifest) the mix was no better than the pure strategy beside
# it: from the demo's seed set 0.26 / 0.42 / 0.43 against uncertainty+diversity's 0.29 / 0.27 / 0.47 (Fashion-MNIST),
# 0.31 / 0.49 / 0.43 against 0.24 / 0.50 / 0.38 (digits); from 3 a class 0.63 / 0.60 / 0.66 against typiclust's 0.57 /
# 0.63 / 0.50 (Fashion-MNIST).
COLD_START_PER_CLASS = 15
COLD_START_LABELS = 100  # adaptive, for a model that does not say what it trained on: typical frames until this
# many are labeled at the hub (TypiClust's low-budget regime)
TYPICLUST_MAX_CLUSTERS = 500  # k-means cost bound; above it clusters hold several uncovered modes
TYPICLUST_MIN_SIZE = 5  # TypiClust's minimum cluster size: smaller clusters (outliers) are taken last
TYPICALITY_K = 20  # neighbours in TypiClust's typicality


class Strategy(Protocol):
    def __call__(
        self, uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
        rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
    ) -> np.ndarray: ...


STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name lists the valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidInput(f"unknown selection strategy {name!r}; expected one of {sorted(STRATEGIES)}") from None


def pick_balanced(strategy: Strategy, groups: np.ndarray | None, uncertainty: np.ndarray,
                  embeddings: np.ndarray | None, budget: int, *, rng: np.random.Generator,
                  labeled: Labeled | None = None, dup_threshold: float = 0.0) -> np.ndarray:
    """``strategy`` run within each group of the pool, the budget split evenly over the groups (the values of a
    tag, such as a frame's condition) -> indices into the pool, each group's best first, groups interleaved.

    The split is :func:`allocate` with equal weights, capped at each group's size, so a group with fewer cases
    than its share gives them all and the others take the rest. Where a group's strategy returns fewer than its
    share (near-duplicates of labeled cases), the strategy over the rest of the pool fills the budget. A
    deployment's metric often weighs each slice the same (the mAP gate's per-slice rule, the demo's test set),
    while the stream is mostly the common slice: over the whole pool a budget follows the stream's mix.
    ``groups`` None: the strategy over the whole pool."""
    if groups is None:
        return strategy(uncertainty, embeddings, budget, rng=rng, labeled=labeled, dup_threshold=dup_threshold)
    g = np.asarray(groups)
    if len(g) != len(uncertainty):
        raise InvalidInput(f"groups must have one value per pool case ({len(uncertainty)}); received {len(g)}")
    values, inv = np.unique(g, return_inverse=True)
    shares = allocate(np.ones(len(values)), np.bincount(inv, minlength=len(values)), budget)
    per_group: list[np.ndarray] = []
    for j, share in enumerate(shares):
        if share == 0:
            continue
        idx = np.flatnonzero(inv == j)
        sub = strategy(uncertainty[idx], None if embeddings is None else embeddings[idx], int(share), rng=rng,
                       labeled=labeled, dup_threshold=dup_threshold)
        per_group.append(idx[np.asarray(sub, dtype=np.int64)])
    picked = [int(p[rank]) for rank in range(max((len(p) for p in per_group), default=0))
              for p in per_group if rank < len(p)]
    if len(picked) < min(budget, len(g)):
        rest = np.setdiff1d(np.arange(len(g)), picked)
        sub = strategy(uncertainty[rest], None if embeddings is None else embeddings[rest], budget - len(picked),
                       rng=rng, labeled=labeled, dup_threshold=dup_threshold)
        picked.extend(int(rest[i]) for i in sub)
    return np.asarray(picked, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# scores and geometry
# ---------------------------------------------------------------------------------------------


def informativeness(probs: np.ndarray, *, human: np.ndarray | None = None,
                    challenger: np.ndarray | None = None) -> np.ndarray:
    """probs: (n, k); human, challenger: (n,) class or -1 unknown -> (n,) in [0, 1], higher = label first.

    A frame where the human's action contradicts the model is most likely a model error, so it ranks
    above every merely uncertain one: [0.9, 1]; among those, the unsure ones first, since a confident
    disagreement is more often the human's slip. Disagreement with a challenger model ranks next,
    [0.5, 1]. Otherwise the normalised least confidence.
    """
    lc = normalized_least_confidence(probs)
    pred = np.asarray(probs).argmax(axis=1)
    out = lc.copy()
    if challenger is not None:
        c = np.asarray(challenger)
        out = np.where((c >= 0) & (c != pred), np.maximum(out, 0.5 + 0.5 * lc), out)
    if human is not None:
        h = np.asarray(human)
        out = np.where((h >= 0) & (h != pred), np.maximum(out, 0.9 + 0.1 * lc), out)
    return np.clip(out, 0.0, 1.0)


def box_informativeness(boxes: Boxes, *, human: Boxes | None = None, challenger: Boxes | None = None,
                        floor: float = 0.0) -> np.ndarray:
    """A detector's frames, ``boxes`` of n frames (``human`` and ``challenger``: the other box sets of the same
    frames, unknown where there is none) -> (n,) in [0, 1], higher = label first, ranked as
    :func:`informativeness` ranks a classifier's: the least sure box's normalised least confidence (1 - its score
    without class distributions; 0 for a frame without a box); frames where the challenger's boxes differ in
    [0.5, 1]; where the human's do, in [0.9, 1]. Within a band, frames rank by how many boxes differ (missed +
    extra + class flips: the device's ``count`` triggers rank the same way), then by how much (1 - F1), through
    ``1 - 2 ** -(count + (1 - F1))``, or by the uncertainty where that is larger. ``floor``: the model's
    operating threshold; only the boxes it reports (scoring at least ``floor``) count, for the uncertainty and
    against the other box sets (the candidates under it are many, mostly background, and nearly uniform over the
    classes: counted, every frame looks unsure)."""
    if boxes.probs is not None or boxes.m == 0:
        u = box_uncertainty(boxes, measure="least_confidence", reduce="max", normalize=True, floor=floor)
    else:
        u = box_uncertainty(boxes, measure="low_score", reduce="max", floor=floor)
    out = np.nan_to_num(u, nan=0.0)
    for other, base in ((challenger, 0.5), (human, 0.9)):
        if other is not None:
            cmp = box_disagreement(boxes, other, floor=floor)
            d = np.nan_to_num(cmp.score, nan=0.0)
            differing = (cmp.missed + cmp.extra + cmp.flips).astype(np.float64)
            key = 1.0 - np.exp2(-(differing + d))
            out = np.where(d > 0, np.maximum(out, base + (1.0 - base) * np.maximum(key, out)), out)
    return np.clip(out, 0.0, 1.0)


def normalized_least_confidence(probs: np.ndarray) -> np.ndarray:
    """probs: (n, k) -> (n,) in [0, 1]: (1 - max p) / (1 - 1/k); 1 = uniform, 0 = one-hot."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise InvalidInput(f"probs must have shape (n, k>=2); received {p.shape}")
    try:
        return least_confidence(p, normalize=True)
    except ValueError as exc:  # not probabilities: the caller's input, so a 4xx
        raise InvalidInput(str(exc)) from None


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """x: (n, d) -> rows of unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


SIMILARITY_BACKENDS = ("auto", "faiss", "numpy")


def _faiss(backend: str) -> Any:
    """The faiss module for ``backend`` ("auto": if installed), or None for numpy."""
    if backend not in SIMILARITY_BACKENDS:
        raise InvalidInput(f"unknown similarity backend {backend!r}; expected one of {list(SIMILARITY_BACKENDS)}")
    if backend == "numpy":
        return None
    try:
        import faiss
    except ImportError:
        if backend == "faiss":
            raise InvalidInput("similarity backend 'faiss' needs faiss-cpu: pip install 'edge-flywheel[hub]'") from None
        return None
    return faiss


class CosineIndex:
    """Vectors for nearest-neighbour queries by cosine distance: rows are unit-normalised and searched exactly by
    inner product through FAISS (``IndexFlatIP``; "auto" uses it when installed) or numpy. It grows with
    :meth:`add`, so a hub worker indexes its labeled set once and adds what gets labeled later."""

    def __init__(self, dim: int, *, backend: str = "auto") -> None:
        self.dim = int(dim)
        self._faiss = _faiss(backend)
        self._index = self._faiss.IndexFlatIP(self.dim) if self._faiss is not None else None
        self._parts: list[np.ndarray] = []
        self._n = 0

    @classmethod
    def of(cls, x: np.ndarray, *, backend: str = "auto") -> CosineIndex:
        index = cls(np.asarray(x).shape[1], backend=backend)
        index.add(x)
        return index

    def __len__(self) -> int:
        return self._n

    def add(self, x: np.ndarray) -> None:
        """x: (k, dim) -> indexed (unit-normalised)."""
        x = np.ascontiguousarray(l2_normalize(np.asarray(x).reshape(-1, self.dim)))
        if not len(x):
            return
        if self._index is not None:
            self._index.add(x)
        self._parts.append(x)
        self._n += len(x)

    @property
    def vectors(self) -> np.ndarray:
        """(n, dim) the unit rows indexed so far."""
        if len(self._parts) > 1:
            self._parts = [np.concatenate(self._parts)]
        return self._parts[0] if self._parts else np.zeros((0, self.dim), np.float32)

    def min_distance(self, a: np.ndarray, *, chunk: int = 2048) -> np.ndarray:
        """a: (n, dim) -> (n,) cosine distance from each row to its nearest indexed row (inf if none)."""
        a = np.ascontiguousarray(l2_normalize(a))
        out = np.full(len(a), np.inf, dtype=np.float32)
        if self._n == 0 or len(a) == 0:
            return out
        if self._index is not None:
            sims, _ = self._index.search(a, 1)
            return np.maximum(1.0 - sims[:, 0], 0.0).astype(np.float32)
        b = self.vectors
        for i in range(0, len(b), chunk):
            out = np.minimum(out, 1.0 - (a @ b[i : i + chunk].T).max(axis=1))
        return np.maximum(out, 0.0)


Labeled = np.ndarray | CosineIndex  # what the strategies take as the labeled set: its embeddings, or an index


def _vectors(labeled: Labeled | None) -> np.ndarray | None:
    return labeled.vectors if isinstance(labeled, CosineIndex) else labeled


def min_cosine_distance(a: np.ndarray, b: Labeled, *, chunk: int = 2048) -> np.ndarray:
    """a: (n, d), b: (m, d) or a :class:`CosineIndex` -> (n,) cosine distance from each row of a to its nearest row
    of b (inf if m=0)."""
    if not isinstance(b, CosineIndex):
        b = np.asarray(b, np.float32)
        if b.ndim != 2:
            raise InvalidInput(f"b must have shape (m, d); received {b.shape}")
        b = CosineIndex.of(b)
    return b.min_distance(a, chunk=chunk)


def k_center_greedy(
    embeddings: np.ndarray, budget: int, *, seeds: Labeled | None = None, first: int = 0,
) -> np.ndarray:
    """embeddings: (n, d) -> (<= budget,) indices of a greedy k-center cover (cosine distance).

    Each step picks the point farthest from everything chosen so far and from ``seeds`` (m, d), the
    already-labeled embeddings. Without seeds, the first pick is ``first``.
    """
    x = l2_normalize(embeddings)
    n = len(x)
    budget = min(budget, n)
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    has_seeds = seeds is not None and len(seeds) > 0
    dist = min_cosine_distance(x, seeds) if has_seeds else np.full(n, np.inf, dtype=np.float32)  # type: ignore[arg-type]
    chosen: list[int] = []
    for _ in range(budget):
        i = int(first) if not chosen and not np.isfinite(dist).any() else int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.maximum(1.0 - x @ x[i], 0.0))
        dist[chosen] = -1.0
    return np.asarray(chosen, dtype=np.int64)


def assign_clusters(embeddings: np.ndarray | None, picked: np.ndarray) -> np.ndarray:
    """Group the picked rows: (p,) cluster ids = nearest of the first ceil(sqrt(p)) picks (0 if no embeddings)."""
    if embeddings is None or len(picked) == 0:
        return np.zeros(len(picked), dtype=np.int64)
    x = l2_normalize(embeddings[picked])
    n_centers = max(1, int(np.ceil(np.sqrt(len(picked)))))
    centers = x[:n_centers]
    return np.asarray(np.argmax(x @ centers.T, axis=1), dtype=np.int64)


def _near_labeled(embeddings: np.ndarray | None, labeled: Labeled | None, threshold: float) -> np.ndarray:
    if embeddings is None or labeled is None or len(labeled) == 0 or threshold <= 0:
        n = 0 if embeddings is None else len(embeddings)
        return np.zeros(n, dtype=bool)
    return min_cosine_distance(embeddings, labeled) < threshold


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------


@register("random")
def random_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """A uniform sample of the pool (the baseline every other strategy must beat)."""
    n = len(uncertainty)
    keep = ~_near_labeled(embeddings, labeled, dup_threshold) if embeddings is not None else np.ones(n, bool)
    order = rng.permutation(np.flatnonzero(keep))
    return order[:budget].astype(np.int64)


@register("uncertainty")
def uncertainty_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """The most uncertain first (ties broken at random)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    keep = ~_near_labeled(embeddings, labeled, dup_threshold) if embeddings is not None else np.ones(len(u), bool)
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((rng.random(len(idx)), -u[idx]))]
    return order[:budget].astype(np.int64)


EXPLORE_SHARE = 0.25  # uncertainty+random: this share of each budget is drawn uniformly from the rest of the pool


@register("uncertainty+random")
def uncertainty_random_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """The most uncertain for all but :data:`EXPLORE_SHARE` of the budget (rounded half up), and that share drawn
    uniformly from the rest of the pool (near-duplicates of the labeled skipped for both parts), so that some
    labels keep sampling the pool as it is rather than only the frames the model finds hardest now (why that helps
    is not measured; that it helps is). The detector's default: balanced over the conditions, it reached the random
    arm's final mAP with fewer labels than ``uncertainty`` on the seeds where that fell short (see
    ``fleet.sim.settings.TASK_DEFAULTS``)."""
    order = uncertainty_strategy(uncertainty, embeddings, len(uncertainty), rng=rng, labeled=labeled,
                                 dup_threshold=dup_threshold)
    n = max(0, min(budget, len(order)))
    n_random = int(np.floor(n * EXPLORE_SHARE + 0.5))
    top, rest = order[:n - n_random], order[n - n_random:]
    drawn = rng.choice(rest, size=n_random, replace=False) if n_random else rest[:0]
    return np.concatenate([top, drawn]).astype(np.int64)


@register("uncertainty+diversity")
def uncertainty_diversity_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """Spread the budget over clusters of the pool in proportion to their informativeness mass.

    The pool (the top-M most informative) is grouped by spherical k-means on the embeddings; each
    cluster gets a share of the budget proportional to the sum of its members' informativeness, and
    gives its most informative members first, skipping near-duplicates of what is already picked or
    labeled. A tight cluster of confident mistakes (a blind spot: night frames the model maps all to
    one place) thus keeps its share, where plain k-center would spend one label on it and move on.
    Without embeddings it falls back to ``uncertainty``.
    """
    if embeddings is None or len(embeddings) == 0:
        return uncertainty_strategy(uncertainty, None, budget, rng=rng)
    u = np.asarray(uncertainty, dtype=np.float64)
    keep = np.flatnonzero(~_near_labeled(embeddings, labeled, dup_threshold))
    if len(keep) == 0 or budget <= 0:
        return np.zeros(0, dtype=np.int64)
    x = l2_normalize(embeddings[keep])
    k = int(np.clip(budget, 1, min(16, len(keep))))
    clusters = spherical_kmeans(x, k, rng=rng)
    shares = allocate(np.bincount(clusters, weights=u[keep] + 1e-9, minlength=k),
                      np.bincount(clusters, minlength=k), min(budget, len(keep)))
    picked: list[int] = []
    for c in range(k):
        members = np.flatnonzero(clusters == c)
        order = members[np.lexsort((rng.random(len(members)), -u[keep][members]))]
        taken: list[int] = []
        for i in order:
            if len(taken) >= shares[c]:
                break
            if dup_threshold > 0 and taken and float(np.min(1.0 - x[taken] @ x[i])) < dup_threshold:
                continue
            taken.append(int(i))
        picked.extend(taken)
    if len(picked) < min(budget, len(keep)):  # near-duplicates left a cluster short: the best of the rest fill in
        rest = np.setdiff1d(np.arange(len(keep)), picked)
        rest = rest[np.argsort(-u[keep][rest], kind="stable")]
        picked.extend(int(i) for i in rest[: min(budget, len(keep)) - len(picked)])
    picked_arr = np.asarray(picked, dtype=np.int64)
    best_first = picked_arr[np.argsort(-u[keep][picked_arr], kind="stable")]
    return keep[best_first].astype(np.int64)


@register("uncertainty+kcenter")
def uncertainty_kcenter_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """k-center greedy over the embeddings of the pool (the top-M most uncertain), seeded by the labeled.

    Pure coverage: good for a broad first look, poor at blind spots (it leaves a dense cluster of
    errors after one pick). Without embeddings it falls back to ``uncertainty``.
    """
    if embeddings is None or len(embeddings) == 0:
        return uncertainty_strategy(uncertainty, None, budget, rng=rng)
    u = np.asarray(uncertainty, dtype=np.float64)
    keep = np.flatnonzero(~_near_labeled(embeddings, labeled, dup_threshold))
    if len(keep) == 0:
        return np.zeros(0, dtype=np.int64)
    first = int(np.argmax(u[keep]))
    picked = k_center_greedy(embeddings[keep], budget, seeds=labeled, first=first)
    return keep[picked].astype(np.int64)


@register("typiclust")
def typiclust_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """Typical frames of the parts of the pool the labels do not cover yet (TypiClust, Hacohen et al., ICML
    2022), for the cold start, where a weak model's uncertainty is no better than chance.

    The labeled and the pool embeddings together are cut into ``labeled + budget`` clusters (spherical
    k-means, at most :data:`TYPICLUST_MAX_CLUSTERS`); clusters are taken fewest labels first, then largest
    first (clusters of fewer than :data:`TYPICLUST_MIN_SIZE` pool frames last), and each gives its most
    typical pool frame: the highest :func:`typicality` within the cluster. Uncertainty is not used. Without
    embeddings it falls back to ``random``.
    """
    if embeddings is None or len(embeddings) == 0:
        return random_strategy(uncertainty, None, budget, rng=rng)
    keep = np.flatnonzero(~_near_labeled(embeddings, labeled, dup_threshold))
    if len(keep) == 0 or budget <= 0:
        return np.zeros(0, dtype=np.int64)
    x = l2_normalize(embeddings[keep])
    vec = _vectors(labeled)
    lab = l2_normalize(vec) if vec is not None and len(vec) else np.zeros((0, x.shape[1]))
    m = len(lab)
    k = int(min(TYPICLUST_MAX_CLUSTERS, len(keep), m + budget))
    clusters = spherical_kmeans(np.concatenate([lab, x]), k, rng=rng)
    covered = np.bincount(clusters[:m], minlength=k)
    pool_of = clusters[m:]
    size = np.bincount(pool_of, minlength=k)
    order = np.lexsort((-size, covered, size < TYPICLUST_MIN_SIZE))  # small last, then fewest labels, largest
    picked: list[int] = []
    for c in order:
        if len(picked) >= budget:
            break
        members = np.flatnonzero(pool_of == c)
        if len(members) == 0:
            continue
        picked.append(int(members[np.argmax(typicality(x[members]))]))
    if len(picked) < min(budget, len(keep)):  # fewer non-empty clusters than the budget: the most typical rest
        rest = np.setdiff1d(np.arange(len(keep)), picked)
        score = typicality(x[rest])
        picked.extend(int(i) for i in rest[np.argsort(-score, kind="stable")][: min(budget, len(keep)) - len(picked)])
    return keep[np.asarray(picked, dtype=np.int64)].astype(np.int64)


@register("adaptive")
def adaptive_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """Budget-aware, on the labels alone: ``typiclust`` while fewer than :data:`COLD_START_LABELS` frames are
    labeled (the model is too weak for its uncertainty to mean much), ``uncertainty+diversity`` from then on. The
    hub's selection first asks :func:`cold_start` with what the active model trained on."""
    n_labeled = 0 if labeled is None else len(labeled)
    inner = typiclust_strategy if n_labeled < COLD_START_LABELS else uncertainty_diversity_strategy
    return inner(uncertainty, embeddings, budget, rng=rng, labeled=labeled, dup_threshold=dup_threshold)


TRAIN_N_CLASS = "train_n/class="  # a manifest metric's prefix: the frames of one class the model trained on


def cold_start(metrics: dict[str, float] | None, class_names: Sequence[str]) -> float | None:
    """The share of a model's classes in the cold start, from its manifest's ``metrics``: each class's training
    frames (``train_n/class=<name>``; a class the metrics leave out counts 0) under :data:`COLD_START_PER_CLASS`;
    for a model that gives only ``train_n`` (the frames it trained on), 1.0 or 0.0 by their number a class. None
    when the model does not say (no model, no counts, no classes): :func:`adaptive_strategy`'s count of labels
    decides."""
    if metrics is None or not class_names:
        return None
    per_class = {k[len(TRAIN_N_CLASS):]: v for k, v in metrics.items() if k.startswith(TRAIN_N_CLASS)}
    if per_class:
        return sum(per_class.get(c, 0.0) < COLD_START_PER_CLASS for c in class_names) / len(class_names)
    n = metrics.get("train_n")
    if n is None:
        return None
    return float(float(n) / len(class_names) < COLD_START_PER_CLASS)


def cold_start_mix(share: float) -> Strategy:
    """``typiclust`` for ``share`` of each budget (rounded half up), ``uncertainty+diversity`` over the rest of the
    pool for the remainder. TypiClust takes the clusters with the fewest labels first, so its part goes where the
    cold classes' few labels leave the pool uncovered; the warm classes' part goes to the uncertain frames."""
    if not 0.0 <= share <= 1.0:
        raise InvalidInput(f"the cold start's share of a budget must be in [0, 1]; received {share!r}")

    def mix(uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
            rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0) -> np.ndarray:
        n_typical = int(np.floor(budget * share + 0.5))
        first = typiclust_strategy(uncertainty, embeddings, n_typical, rng=rng, labeled=labeled,
                                   dup_threshold=dup_threshold) if n_typical else np.zeros(0, dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(uncertainty)), first)
        if budget <= len(first) or len(rest) == 0:
            return first.astype(np.int64)
        second = uncertainty_diversity_strategy(
            uncertainty[rest], None if embeddings is None else embeddings[rest], budget - len(first), rng=rng,
            labeled=labeled, dup_threshold=dup_threshold)
        return np.concatenate([first, rest[second]]).astype(np.int64)

    return mix


def resolve_adaptive(metrics: dict[str, float] | None, class_names: Sequence[str]) -> Strategy:
    """``adaptive`` for the active model: ``typiclust`` with every class in its :func:`cold_start`,
    ``uncertainty+diversity`` with none, :func:`cold_start_mix` of the two where its classes differ, and
    :func:`adaptive_strategy` (labels counted at the hub) when the model does not say."""
    share = cold_start(metrics, class_names)
    if share is None:
        return adaptive_strategy
    if share >= 1.0:
        return typiclust_strategy
    return uncertainty_diversity_strategy if share <= 0.0 else cold_start_mix(share)


@register("entropy")
def entropy_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """Entropy top-k, the classic peer: the cases whose predicted class distribution has the highest entropy in
    the active model's space (the caller passes each case's entropy as ``uncertainty``), near-duplicates of the
    labeled skipped. The ranking is :func:`uncertainty_strategy`'s."""
    return uncertainty_strategy(uncertainty, embeddings, budget, rng=rng, labeled=labeled, dup_threshold=dup_threshold)


@register("badge")
def badge_strategy(
    uncertainty: np.ndarray, embeddings: np.ndarray | None, budget: int, *,
    rng: np.random.Generator, labeled: Labeled | None = None, dup_threshold: float = 0.0,
) -> np.ndarray:
    """BADGE (Ash et al., ICLR 2020): k-means++ seeding over the pool's gradient embeddings
    (:func:`gradient_embeddings`, which the caller makes from each case's probabilities and embedding), so that
    picks are both uncertain (a long gradient) and unlike each other. The first pick is the longest gradient, each
    next one drawn with probability proportional to its squared distance to the nearest pick so far
    (:func:`badge_probabilities`). Uncertainty is not used (BADGE's gradients already say how much a case would
    move the model); candidates near ``labeled`` (given in the same space) are skipped as by every strategy.
    Without embeddings it falls back to ``uncertainty``."""
    if embeddings is None or len(embeddings) == 0:
        return uncertainty_strategy(uncertainty, None, budget, rng=rng)
    keep = np.flatnonzero(~_near_labeled(embeddings, labeled, dup_threshold))
    g = np.asarray(embeddings, dtype=np.float32)[keep]
    n = len(g)
    if n == 0 or budget <= 0:
        return np.zeros(0, dtype=np.int64)
    chosen: list[int] = []
    d2 = np.einsum("ij,ij->i", g, g).astype(np.float64)
    for _ in range(min(budget, n)):
        p = _d2_probabilities(d2, chosen)
        i = int(np.argmax(d2)) if not chosen and d2.sum() > 0 else int(rng.choice(n, p=p))
        chosen.append(i)
        diff = g - g[i]
        d2 = np.minimum(d2, np.einsum("ij,ij->i", diff, diff).astype(np.float64))
        d2[chosen] = 0.0
    return keep[np.asarray(chosen, dtype=np.int64)].astype(np.int64)


def gradient_embeddings(probs: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """BADGE's gradient embedding: ``probs (n, k)`` and the model's ``embeddings (n, d)`` -> ``(n, k * d)``, the
    gradient of the cross-entropy loss against the predicted class with respect to a last linear layer on the
    embedding, ``(p - onehot(argmax p)) outer h``, flattened class by class."""
    p = np.asarray(probs, dtype=np.float32)
    h = np.asarray(embeddings, dtype=np.float32)
    if p.ndim != 2 or h.ndim != 2 or len(p) != len(h):
        raise InvalidInput(f"probs (n, k) and embeddings (n, d) must have the same n; received {p.shape}, {h.shape}")
    diff = p.copy()
    diff[np.arange(len(p)), p.argmax(axis=1)] -= 1.0
    return (diff[:, :, None] * h[:, None, :]).reshape(len(p), -1)


def badge_probabilities(g: np.ndarray, chosen: list[int]) -> list[np.ndarray]:
    """For a sequence of picks ``chosen`` over gradient embeddings ``g``, the D^2 sampling probabilities BADGE
    drew each pick from (the first: squared norms, normalised), as (n,) arrays: what a published implementation's
    utilities can be checked against."""
    g = np.asarray(g, dtype=np.float64)
    d2 = np.einsum("ij,ij->i", g, g)
    out = []
    for step in range(len(chosen)):
        out.append(_d2_probabilities(d2, chosen[:step]))
        diff = g - g[chosen[step]]
        d2 = np.minimum(d2, np.einsum("ij,ij->i", diff, diff))
        d2[chosen[:step + 1]] = 0.0
    return out


def _d2_probabilities(d2: np.ndarray, chosen: list[int]) -> np.ndarray:
    """D^2 sampling weights, normalised; uniform over the cases not yet chosen when every distance is 0."""
    total = float(d2.sum())
    if total > 0:
        return d2 / total
    p = np.ones(len(d2))
    p[chosen] = 0.0
    return p / p.sum()


def typicality(x: np.ndarray, *, k: int = TYPICALITY_K) -> np.ndarray:
    """x: (n, d) unit rows -> (n,) TypiClust's typicality: the inverse of the mean cosine distance to the
    ``min(k, n - 1)`` nearest other rows (Hacohen et al. 2022, eq. 3, with cosine for Euclidean distance on
    unit vectors); 1 for a lone row. Higher = in a denser part of the space."""
    n = len(x)
    if n <= 1:
        return np.ones(n)
    kk = min(k, n - 1)
    out = np.empty(n)
    for i in range(0, n, 1024):
        d = np.maximum(1.0 - x[i:i + 1024] @ x.T, 0.0)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = np.inf  # not its own neighbour
        near = np.partition(d, kk - 1, axis=1)[:, :kk]
        out[i:i + 1024] = 1.0 / (near.mean(axis=1) + 1e-12)
    return out


def spherical_kmeans(x: np.ndarray, k: int, *, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """x: (n, d) unit rows -> (n,) cluster ids in [0, k), k-means++ seeding on cosine distance."""
    n = len(x)
    k = max(1, min(k, n))
    centers = [int(rng.integers(n))]
    dist = np.maximum(1.0 - x @ x[centers[0]], 0.0)
    for _ in range(1, k):
        p = dist / dist.sum() if dist.sum() > 0 else np.full(n, 1.0 / n)
        centers.append(int(rng.choice(n, p=p)))
        dist = np.minimum(dist, np.maximum(1.0 - x @ x[centers[-1]], 0.0))
    c = x[centers].copy()
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if _ and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            m = x[labels == j]
            if len(m):
                c[j] = l2_normalize(m.sum(axis=0, keepdims=True))[0]
    return labels


def allocate(weights: np.ndarray, capacity: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` into integers proportional to ``weights`` (k,), none above ``capacity`` (k,).

    Hamilton's largest-remainder method; what a full cluster cannot take goes to the others in the same
    proportions. Sums to min(budget, capacity.sum()).
    """
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    cap = np.asarray(capacity, dtype=np.int64)
    out = np.zeros(len(w), dtype=np.int64)
    left = int(min(budget, cap.sum()))
    while left > 0:
        open_ = out < cap
        share = np.where(open_, w, 0.0)
        if share.sum() <= 0:
            share = open_.astype(np.float64)
        quota = share / share.sum() * left
        add = np.minimum(np.floor(quota).astype(np.int64), cap - out)
        spare = left - int(add.sum())
        order = np.argsort(-(quota - np.floor(quota)), kind="stable")
        for j in order:
            if spare == 0:
                break
            if open_[j] and out[j] + add[j] < cap[j] and quota[j] > 0:
                add[j] += 1
                spare -= 1
        if add.sum() == 0:  # only zero-weight room is left
            add[int(np.flatnonzero(open_)[0])] = 1
        out += add
        left -= int(add.sum())
    return out
