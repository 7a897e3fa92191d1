"""Evaluating a spec on frames: per frame, keep or not, a priority, and which triggers fired and why.

An :class:`Evaluator` holds what must persist between batches on a device: a rate calibrator per
``target_rate`` leaf, the budgets, the near-duplicate memory and the random leaves' generators.
:meth:`Evaluator.state_dict` returns all of it as JSON-serialisable data, so an agent restart
neither re-learns thresholds nor forgets what it already spent.

Order of work for a batch: filters -> triggers (``all_of`` evaluates its children left to right
and computes a costly trigger such as novelty only for frames still in the running; calibrated
and random leaves see every filtered frame, so their rates hold) -> priority -> near-duplicate
suppression and budgets, frame by frame from the highest priority down (so a scarce budget goes
to the best frames of the batch). Feeding frames one at a time or in batches gives the same
scores, firings and priorities; only which frames a binding budget or duplicate check keeps
within one batch can differ, since the batch is ranked first.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trigger import scores as _s
from trigger._checks import F32, F64, I64, U64, Bool, as_float, as_labels, as_probs, describe
from trigger.budget import Budget, TokenBucket
from trigger.calibrate import RateCalibrator
from trigger.dedup import NearDuplicateFilter, dhash
from trigger.frames import Decision, FrameBatch, Scores, empty_decision, predicted
from trigger.novelty import NoveltyBank
from trigger.spec import AnyOf, Leaf, Node, Spec, parse_spec
from trigger.triggers import Inputs

__all__ = ["Decision", "Evaluator", "FrameBatch", "Scores"]

STATE_FORMAT = "flywheel.trigger-state/1"
MIN_PRIORITY = 1e-6  # the priority of a frame that qualified through weight-0 triggers only


class Evaluator:
    """Runs one spec over a stream of batches. ``spec``: a :class:`Spec` or a document for
    :func:`parse_spec`. ``bank``: the novelty bank, required when the spec uses ``novelty``.
    ``clock``: unix seconds, for expiry and budgets (inject a fake one in tests)."""

    def __init__(
        self,
        spec: Spec | Mapping[str, Any] | str,
        *,
        bank: NoveltyBank | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec if isinstance(spec, Spec) else parse_spec(spec)
        self.bank = bank
        self.clock = clock
        users = [leaf.label for leaf in self.spec.leaves if "bank" in leaf.definition.needs]
        if users and bank is None:
            raise ValueError(
                f"spec {self.spec.id!r} uses novelty ({', '.join(users)}) and needs a NoveltyBank; received bank=None"
            )
        self._leaves = self.spec.leaves
        self._needs = self.spec.needs
        self._uses = set(self._needs) | {u for leaf in self._leaves for u in leaf.definition.uses}
        if self.spec.dedup is not None and self.spec.dedup.embedding_threshold is not None:
            self._uses.add("embeddings")
        self._params: dict[str, dict[str, Any]] = {leaf.label: dict(leaf.params) for leaf in self._leaves}
        self.calibrators: dict[str, RateCalibrator] = {
            leaf.label: RateCalibrator(leaf.threshold, window=leaf.window, direction=leaf.direction)
            for leaf in self._leaves
            if leaf.mode == "target_rate"
        }
        self._rngs: dict[str, np.random.Generator] = {}
        for leaf in self._leaves:
            if leaf.definition.stateful:
                seed = [int(leaf.params.get("seed", 0)), zlib.crc32(self.spec.id.encode()), self.spec.version,
                        zlib.crc32(leaf.label.encode())]
                self._rngs[leaf.label] = np.random.default_rng(seed)
                self._params[leaf.label]["_rng"] = self._rngs[leaf.label]
        self.budget = _budget(self.spec, clock) if self.spec.budgets is not None else None
        d = self.spec.dedup
        self.dedup = (
            None
            if d is None
            else NearDuplicateFilter(
                hash_bits=d.hash_bits, max_hamming=d.max_hamming, embedding_threshold=d.embedding_threshold,
                memory=d.memory,
            )
        )
        self.stats: dict[str, int] = {
            "frames": 0, "filtered_out": 0, "qualified": 0, "kept": 0, "duplicate": 0, "over_budget": 0,
        }
        self.fired_counts: dict[str, int] = {leaf.label: 0 for leaf in self._leaves}

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, batch: FrameBatch, *, now: float | None = None) -> Decision:
        """Decide on a batch; see :class:`Decision`. ``now``: unix seconds (default: the clock)."""
        t = self.clock() if now is None else float(now)
        inputs, extra = self._inputs(batch)
        n = inputs.n
        if self.spec.is_expired(t):
            return empty_decision(inputs, expired=True)
        run = _Run(inputs, self._filter(inputs, extra["tags"]))
        self.stats["frames"] += n
        if run.rows is not None:
            self.stats["filtered_out"] += n - int(run.rows.size)
        root = self._node(self.spec.rule, run, run.passing)
        if not root.any():  # the common case: nothing to keep
            return empty_decision(inputs, run.values)
        candidates = np.flatnonzero(root)
        reported: dict[str, Bool] = {}
        self._report(self.spec.rule, run, root, reported)
        priority = self._priority(run, reported, inputs)
        keep = np.zeros(n, bool)
        duplicate = np.zeros(n, bool)
        over = np.zeros(n, bool)
        fired: list[list[str]] = [[] for _ in range(n)]
        values: list[dict[str, float]] = [{} for _ in range(n)]
        thresholds: list[dict[str, float]] = [{} for _ in range(n)]
        for leaf in self._leaves:
            label = leaf.label
            mask = reported.get(label)
            if mask is None:
                continue
            rows = np.flatnonzero(mask)
            if not rows.size:
                continue
            self.fired_counts[label] += int(rows.size)
            vals = run.values[label][rows].tolist()
            thr = run.thresholds[label]
            thrs = thr[rows].tolist() if isinstance(thr, np.ndarray) else [thr] * rows.size
            for i, v, th in zip(rows.tolist(), vals, thrs, strict=True):
                fired[i].append(label)
                values[i][label] = v
                thresholds[i][label] = th
        self._admit(candidates, priority, fired, inputs, extra, t, keep, duplicate, over)
        self._fill_costly(run, keep)
        self.stats["qualified"] += int(candidates.size)
        self.stats["kept"] += int(keep.sum())
        self.stats["duplicate"] += int(duplicate.sum())
        self.stats["over_budget"] += int(over.sum())
        return Decision(
            keep=keep, priority=priority, fired=fired, values=values, thresholds=thresholds,
            scores=Scores(inputs, run.values), predicted=predicted(inputs), duplicate=duplicate, over_budget=over,
        )

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Calibration, budgets, dedup memory and generators as JSON-serialisable data."""
        return {
            "format": STATE_FORMAT,
            "spec": {"id": self.spec.id, "version": self.spec.version},
            "calibrators": {label: c.state_dict() for label, c in self.calibrators.items()},
            "budget": None if self.budget is None else self.budget.state_dict(),
            "dedup": None if self.dedup is None else self.dedup.state_dict(),
            "rngs": {label: _jsonable(rng.bit_generator.state) for label, rng in self._rngs.items()},
            "stats": dict(self.stats),
            "fired_counts": dict(self.fired_counts),
        }

    def calibration_state(self) -> dict[str, Any]:
        """The calibrated thresholds alone, by trigger label (they belong to the model whose scores they saw)."""
        return {label: c.state_dict() for label, c in self.calibrators.items()}

    def load_calibration(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`calibration_state`; ``None`` starts every calibrator afresh (a model they never saw:
        each fires on its initial threshold, or not at all, until it has warmed up again)."""
        for leaf in self._leaves:
            if leaf.label in self.calibrators:
                self.calibrators[leaf.label] = RateCalibrator(leaf.threshold, window=leaf.window,
                                                              direction=leaf.direction)
        for label, sub in dict(state or {}).items():
            if label in self.calibrators:
                self.calibrators[label].load_state_dict(sub)

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`state_dict`. ``strict``: refuse a state saved for another spec id or
        version; with ``strict=False`` (a campaign updated in place) restore what still matches:
        calibrators and per-trigger budgets by label, class budgets by class, dedup memory."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an Evaluator state: expected format {STATE_FORMAT!r}; received {describe(state)}")
        saved = state.get("spec") or {}
        if strict and (saved.get("id"), saved.get("version")) != (self.spec.id, self.spec.version):
            raise ValueError(
                f"state was saved for spec {saved.get('id')!r} version {saved.get('version')!r}, not "
                f"{self.spec.id!r} version {self.spec.version}; pass strict=False to keep what still matches"
            )
        same_spec = (saved.get("id"), saved.get("version")) == (self.spec.id, self.spec.version)
        for label, sub in dict(state.get("calibrators") or {}).items():
            if label in self.calibrators:
                self.calibrators[label].load_state_dict(sub)
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])
        if self.dedup is not None and state.get("dedup") is not None:
            self.dedup.load_state_dict(state["dedup"])
        for label, sub in dict(state.get("rngs") or {}).items():
            if label in self._rngs and same_spec:
                try:
                    self._rngs[label].bit_generator.state = sub
                except (TypeError, ValueError, KeyError) as exc:
                    raise ValueError(f"not an Evaluator state: bad generator state for {label!r}: {exc}") from exc
        if same_spec:
            self.stats.update({k: int(v) for k, v in dict(state.get("stats") or {}).items() if k in self.stats})
            self.fired_counts.update(
                {k: int(v) for k, v in dict(state.get("fired_counts") or {}).items() if k in self.fired_counts}
            )

    # -- internals ------------------------------------------------------------------------------

    def _inputs(self, batch: FrameBatch) -> tuple[Inputs, dict[str, Any]]:
        """Validate the fields of ``batch`` this spec reads (the others are ignored)."""
        if not isinstance(batch, FrameBatch):
            raise TypeError(f"evaluate expects a FrameBatch; received {describe(batch)}")
        logits: F64 = as_float(batch.logits, "FrameBatch.logits", ndim=2)
        n, k = logits.shape
        if k < 1:
            raise ValueError(f"FrameBatch.logits must have at least one class; received shape {logits.shape}")
        uses = self._uses
        for name in ("embeddings", "samples"):
            if name in self._needs and getattr(batch, name) is None:
                users = [leaf.label for leaf in self._leaves if name in leaf.definition.needs] or ["dedup"]
                raise ValueError(
                    f"spec {self.spec.id!r} needs FrameBatch.{name} (for {', '.join(users)}); received None"
                )
        embeddings: F32 | None = None
        if batch.embeddings is not None and "embeddings" in uses:
            embeddings = as_float(batch.embeddings, "FrameBatch.embeddings", ndim=2, dtype=np.float32)
            if embeddings.shape[0] != n or (self.bank is not None and embeddings.shape[1] != self.bank.dim):
                want = f"({n}, {self.bank.dim})" if self.bank is not None else f"({n}, d)"
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
            known = np.isfinite(cl).all(axis=1)
            challenger = np.full((n, k), np.nan)
            challenger[known] = _s._softmax(cl[known])
        samples = None
        if batch.samples is not None and "samples" in uses:
            samples = as_probs(batch.samples, "FrameBatch.samples", ndim=3)
            if samples.shape[1:] != (n, k) or samples.shape[0] < 1:
                raise ValueError(f"FrameBatch.samples must have shape (m, {n}, {k}); received {describe(samples)}")
        tags = batch.tags
        if tags is not None and self.spec.filters.tags and (not isinstance(tags, Sequence) or len(tags) != n):
            raise ValueError(f"FrameBatch.tags must be a list of {n} dicts; received {describe(tags)}")
        if self.dedup is not None:
            has_pixels = batch.images is not None or batch.hashes is not None
            usable = (self.dedup.max_hamming is not None and has_pixels) or (
                self.dedup.embedding_threshold is not None and embeddings is not None
            )
            if not usable:  # refused before anything is learned or spent
                wanted = "FrameBatch.images or .hashes" if self.dedup.max_hamming is not None else ""
                if self.dedup.embedding_threshold is not None:
                    wanted += (" or " if wanted else "") + "FrameBatch.embeddings"
                raise ValueError(f"spec {self.spec.id!r} deduplicates frames and needs {wanted}; received none")
            for name in ("images", "hashes"):
                value = getattr(batch, name)
                if value is not None and np.shape(value)[:1] != (n,):
                    raise ValueError(
                        f"FrameBatch.{name} must describe {n} frames; "
                        f"received {describe(np.asarray(value))}"
                    )
        probs = _s._softmax(logits, self.spec.temperature)
        inputs = Inputs(
            logits=logits, probs=probs, embeddings=embeddings, human=human, challenger_probs=challenger,
            samples=samples, bank=self.bank,
        )
        return inputs, {"tags": tags, "images": batch.images, "hashes": batch.hashes}

    def _filter(self, inputs: Inputs, tags: Sequence[Mapping[str, str]] | None) -> Bool | None:
        """Mask of frames that pass the spec's filters; None when every frame passes."""
        f = self.spec.filters
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

    def _node(self, node: Node, run: _Run, live: Bool | None) -> Bool:
        """Frames on which ``node`` fires, among ``live`` (None = every frame)."""
        if isinstance(node, Leaf):
            sat = self._leaf(node, run, live)
        elif isinstance(node, AnyOf):
            sat = self._node(node.children[0], run, live)
            for child in node.children[1:]:
                sat = sat | self._node(child, run, live)
        else:
            sat = self._node(node.children[0], run, live)
            for child in node.children[1:]:
                sat = sat & self._node(child, run, sat)
        run.sat[id(node)] = sat
        return sat

    def _leaf(self, leaf: Leaf, run: _Run, live: Bool | None) -> Bool:
        tdef = leaf.definition
        n = run.inputs.n
        label = leaf.label
        rows: I64 | None
        if leaf.mode == "target_rate" or tdef.stateful or not tdef.costly or live is None:
            rows = run.rows  # every frame that passed the filters
        else:
            rows = np.flatnonzero(live)
            if rows.size == n:
                rows = None
        if rows is not None and rows.size == 0:
            run.values.setdefault(label, np.full(n, np.nan))
            run.thresholds[label] = self.calibrators[label].threshold if leaf.mode == "target_rate" else leaf.threshold
            return np.zeros(n, bool)
        v = tdef.compute(run.inputs, rows, self._params[label])
        if rows is None:
            run.values[label] = v
        else:
            full = run.values.get(label)
            if full is None:
                full = run.values[label] = np.full(n, np.nan)
            full[rows] = v
        if leaf.mode == "target_rate":
            used = np.empty(v.shape[0])
            hit = self.calibrators[label]._update(v, used)
            if rows is None:
                run.thresholds[label] = used
            else:
                spread = np.full(n, np.nan)
                spread[rows] = used
                run.thresholds[label] = spread
        else:
            hit = v > leaf.threshold if leaf.mode == "above" else v < leaf.threshold
            run.thresholds[label] = leaf.threshold
        if rows is None:
            return hit
        sat = np.zeros(n, bool)
        sat[rows] = hit
        return sat

    def _report(self, node: Node, run: _Run, active: Bool, out: dict[str, Bool]) -> None:
        if isinstance(node, Leaf):
            mask = run.sat[id(node)] & active
            out[node.label] = out[node.label] | mask if node.label in out else mask
        elif isinstance(node, AnyOf):
            for child in node.children:
                self._report(child, run, active & run.sat[id(child)], out)
        else:
            for child in node.children:
                self._report(child, run, active, out)

    def _priority(self, run: _Run, reported: Mapping[str, Bool], inputs: Inputs) -> F64:
        n = inputs.n
        keep_prob = np.ones(n)
        any_fired = False
        for leaf in self._leaves:
            mask = reported.get(leaf.label)
            if mask is None or not mask.any():
                continue
            any_fired = True
            rows = np.flatnonzero(mask)
            v = run.values[leaf.label][rows]
            thr = run.thresholds[leaf.label]
            strength = self._strength(leaf, v, thr[rows] if isinstance(thr, np.ndarray) else thr, inputs)
            keep_prob[rows] *= 1.0 - leaf.weight * (0.5 + 0.5 * strength)
        if not any_fired:
            return np.zeros(n)
        out: F64 = 1.0 - keep_prob
        np.clip(out, 0.0, 1.0, out=out)
        # a frame that qualified ranks above every frame that did not, even through weight-0 triggers
        qualified = np.zeros(n, bool)
        for mask in reported.values():
            qualified |= mask
        out[qualified] = np.maximum(out[qualified], MIN_PRIORITY)
        return out

    def _strength(self, leaf: Leaf, v: F64, thr: F64 | float, inputs: Inputs) -> F64:
        """How far past its threshold each value is, in [0, 1]."""
        lo, hi = leaf.definition.bounds(inputs, leaf.params)
        cal = self.calibrators.get(leaf.label)
        if leaf.direction == "above":
            excess, edge = v - thr, hi
            if not math.isfinite(edge) and cal is not None:
                edge = cal.extreme
            span = edge - thr
        else:
            excess, edge = thr - v, lo
            if not math.isfinite(edge) and cal is not None:
                edge = cal.extreme
            span = thr - edge
        excess = np.maximum(excess, 0.0)
        ok = np.isfinite(span) & (span > 0)
        if ok.all():
            out: F64 = np.minimum(excess / span, 1.0)
            return out
        out = np.where(ok, np.minimum(excess / np.where(ok, span, 1.0), 1.0), 1.0 - np.exp(-excess))
        return out

    def _admit(
        self, candidates: I64, priority: F64, fired: list[list[str]], inputs: Inputs, extra: Mapping[str, Any],
        now: float, keep: Bool, duplicate: Bool, over: Bool,
    ) -> None:
        order = candidates[np.argsort(-priority[candidates], kind="stable")]
        hashes: U64 | None = None
        dedup = self.dedup
        if dedup is not None and dedup.max_hamming is not None:
            if extra["hashes"] is not None:
                hashes = np.asarray(extra["hashes"]).astype(np.uint64)
            elif extra["images"] is not None:
                hashes = np.zeros(inputs.n, np.uint64)
                hashes[order] = dhash(np.asarray(extra["images"])[order], size=dedup.hash_size)
        classes = predicted(inputs)
        for i in order.tolist():
            h = None if hashes is None else hashes[i : i + 1]
            e = None
            if dedup is not None and dedup.embedding_threshold is not None and inputs.embeddings is not None:
                e = inputs.embeddings[i : i + 1]
            if dedup is not None and dedup.is_duplicate(hashes=h, embeddings=e)[0]:
                duplicate[i] = True
                continue
            if self.budget is not None and not self.budget.try_acquire(fired[i], int(classes[i]), now=now):
                over[i] = True
                continue
            keep[i] = True
            if dedup is not None:
                dedup.add(hashes=h, embeddings=e)

    def _fill_costly(self, run: _Run, keep: Bool) -> None:
        """Give every kept frame every trigger's value, computing costly ones where skipped."""
        if not keep.any():
            return
        for leaf in self._leaves:
            if not leaf.definition.costly:
                continue
            values = run.values[leaf.label]
            rows = np.flatnonzero(keep & np.isnan(values))
            if rows.size:
                values[rows] = leaf.definition.compute(run.inputs, rows, self._params[leaf.label])


class _Run:
    """Scratch state of one evaluate call."""

    def __init__(self, inputs: Inputs, passing: Bool | None) -> None:
        self.inputs = inputs
        self.passing = passing  # None = every frame passed the filters
        self.rows: I64 | None = None if passing is None else np.flatnonzero(passing)
        self.values: dict[str, F64] = {}
        self.thresholds: dict[str, F64 | float] = {}
        self.sat: dict[int, Bool] = {}


def _budget(spec: Spec, clock: Callable[[], float]) -> Budget:
    b = spec.budgets
    assert b is not None

    def bucket(rate: float, burst: float) -> TokenBucket:
        return TokenBucket(rate, burst, clock=clock)

    return Budget(
        global_bucket=None if b.global_bucket is None else bucket(b.global_bucket.rate_per_s, b.global_bucket.burst),
        per_trigger={k: bucket(v.rate_per_s, v.burst) for k, v in b.per_trigger.items()},
        per_class={k: bucket(v.rate_per_s, v.burst) for k, v in b.per_class.items()},
        clock=clock,
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x

