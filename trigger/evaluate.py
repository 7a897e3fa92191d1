"""Evaluating a spec on frames: per frame, keep or not, a priority, and which triggers fired and why.

An :class:`Evaluator` holds what must persist between batches on a device: a rate calibrator per
``target_rate`` leaf, the budgets, the near-duplicate memory, the random leaves' generators and, for a
detector's video, the last frame of each stream (flicker compares each frame with the one before it).
:meth:`Evaluator.state_dict` returns all of it as JSON-serialisable data, so an agent restart
neither re-learns thresholds nor forgets what it already spent.

Order of work for a batch: filters -> triggers (``all_of`` evaluates its children left to right
and computes a costly trigger such as novelty only for frames still in the running; calibrated
and random leaves see every filtered frame, so their rates hold) -> priority -> near-duplicate
suppression and budgets, frame by frame from the highest priority down (so a scarce budget goes
to the best frames of the batch). Feeding frames one at a time or in batches gives the same
scores, firings and priorities; only which frames a binding budget or duplicate check keeps
within one batch can differ, since the batch is ranked first. Reading and checking a batch is
``trigger._inputs``'s job; priorities, near-duplicates and budgets are ``trigger._admission``'s.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from trigger._admission import admit, make_budget, priority
from trigger._checks import F64, I64, Bool, describe
from trigger._history import StreamHistory
from trigger._inputs import filter_mask, read_batch
from trigger.calibrate import RateCalibrator
from trigger.dedup import NearDuplicateFilter
from trigger.frames import Decision, FrameBatch, Scores, empty_decision, predicted
from trigger.novelty import NoveltyBank
from trigger.spec import AnyOf, Leaf, Node, Spec, parse_spec
from trigger.triggers import Inputs

__all__ = ["STATE_FORMAT", "Evaluator"]

STATE_FORMAT = "flywheel.trigger-state/1"


class Evaluator:
    """Runs one spec over a stream of batches. ``spec``: a :class:`Spec` or a document for
    :func:`parse_spec`. ``bank``: the novelty bank, required when the spec uses ``novelty``.
    ``clock``: unix seconds, for expiry and budgets (inject a fake one in tests). ``task``: the kind
    of model the batches will come from ("classify" or "detect"); when given, a spec whose triggers
    read the other kind's output is refused here, before any frame (without it, at the first batch)."""

    def __init__(
        self,
        spec: Spec | Mapping[str, Any] | str,
        *,
        bank: NoveltyBank | None = None,
        clock: Callable[[], float] = time.time,
        task: str | None = None,
    ) -> None:
        self.spec = spec if isinstance(spec, Spec) else parse_spec(spec)
        self.bank = bank
        self.clock = clock
        if task not in (None, "classify", "detect"):
            raise ValueError(f"task must be 'classify', 'detect' or None; received {task!r}")
        if task is not None and self.spec.task not in (None, task):
            users = [leaf.label for leaf in self.spec.leaves if leaf.definition.task == self.spec.task]
            raise ValueError(f"spec {self.spec.id!r} uses {self.spec.task} triggers ({', '.join(users)}) and "
                             f"cannot run on a {task!r} model's frames")
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
        self.budget = None if self.spec.budgets is None else make_budget(self.spec.budgets, clock)
        d = self.spec.dedup
        self.dedup = (
            None
            if d is None
            else NearDuplicateFilter(
                hash_bits=d.hash_bits, max_hamming=d.max_hamming, embedding_threshold=d.embedding_threshold,
                memory=d.memory,
            )
        )
        # the last frame of each video stream, for flicker; not in state_dict: after a restart the first frame
        # of each stream has no predecessor (NaN), as after any gap
        self.history = StreamHistory() if "stream" in self._uses else None
        self.stats: dict[str, int] = {
            "frames": 0, "filtered_out": 0, "qualified": 0, "kept": 0, "duplicate": 0, "over_budget": 0,
        }
        self.fired_counts: dict[str, int] = {leaf.label: 0 for leaf in self._leaves}

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, batch: FrameBatch, *, now: float | None = None) -> Decision:
        """Decide on a batch; see :class:`Decision`. ``now``: unix seconds (default: the clock)."""
        t = self.clock() if now is None else float(now)
        inputs, extra = read_batch(
            batch, self.spec, needs=self._needs, uses=self._uses, bank=self.bank, dedup=self.dedup,
            history=self.history,
        )
        n = inputs.n
        if self.spec.is_expired(t):
            return empty_decision(inputs, expired=True)
        run = _Run(inputs, filter_mask(self.spec.filters, inputs, extra["tags"]))
        self.stats["frames"] += n
        if run.rows is not None:
            self.stats["filtered_out"] += n - int(run.rows.size)
        root = self._node(self.spec.rule, run, run.passing)
        if not root.any():  # the common case: nothing to keep
            return empty_decision(inputs, run.values)
        candidates = np.flatnonzero(root)
        reported: dict[str, Bool] = {}
        self._report(self.spec.rule, run, root, reported)
        prio = priority(self._leaves, reported, run.values, run.thresholds, self.calibrators, inputs)
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
        keep, duplicate, over = admit(candidates, prio, fired, inputs, extra, t, dedup=self.dedup, budget=self.budget)
        self._fill_costly(run, keep)
        self.stats["qualified"] += int(candidates.size)
        self.stats["kept"] += int(keep.sum())
        self.stats["duplicate"] += int(duplicate.sum())
        self.stats["over_budget"] += int(over.sum())
        return Decision(
            keep=keep, priority=prio, fired=fired, values=values, thresholds=thresholds,
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
        each fires on its initial threshold, or not at all, until it has warmed up again). Called on a model swap,
        it also forgets each stream's last frame: the next model's boxes are not compared with the last one's."""
        if self.history is not None:
            self.history.clear()
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x

