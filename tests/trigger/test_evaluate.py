"""Evaluating specs on batches: keep, priority, reasons; expiry, filters, budgets, dedup, restarts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from trigger import Evaluator, FrameBatch, NoveltyBank, parse_spec

K, D = 5, 16


def frames(n: int, seed: int = 0, *, human_rate: float = 0.0) -> FrameBatch:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, K))
    human = np.full(n, -1)
    known = rng.random(n) < human_rate
    human[known] = rng.integers(0, K, int(known.sum()))
    return FrameBatch(logits=logits, embeddings=np.abs(rng.normal(0, 1, (n, D))), human=human)


def take(batch: FrameBatch, rows: Any) -> FrameBatch:
    pick = lambda x: None if x is None else np.asarray(x)[rows]  # noqa: E731
    return FrameBatch(logits=pick(batch.logits), embeddings=pick(batch.embeddings), human=pick(batch.human),
                      images=pick(batch.images))


@pytest.fixture(scope="module")
def bank() -> NoveltyBank:
    return NoveltyBank.from_embeddings(np.abs(np.random.default_rng(99).normal(0, 1, (3000, D))), n_lists=30)


def spec(rule: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "test", "version": 1, "rule": rule, **extra}


MIXED = spec({"any_of": [
    {"trigger": "entropy", "target_rate": 0.05},
    {"trigger": "human_disagreement"},
    {"all_of": [{"trigger": "margin", "below": 0.2}, {"trigger": "novelty", "k": 3, "above": 0.4}]},
    {"trigger": "random", "below": 0.01},
]})


def test_decision_shape_and_reasons(bank: NoveltyBank) -> None:
    ev = Evaluator(MIXED, bank=bank, clock=lambda: 0.0)
    batch = frames(3000, human_rate=0.2)
    d = ev.evaluate(batch)
    n = len(batch)
    assert d.keep.shape == d.priority.shape == d.predicted.shape == (n,) and len(d.fired) == len(d.values) == n
    assert np.all((d.priority >= 0) & (d.priority <= 1))
    assert np.all((d.priority > 0) == np.array([bool(f) for f in d.fired]))
    assert d.keep.any() and not (d.keep & (d.priority == 0)).any()
    for i in np.flatnonzero(d.keep)[:50]:
        assert set(d.values[i]) == set(d.fired[i]) == set(d.thresholds[i])
        for label, value in d.values[i].items():
            assert np.isfinite(value) and np.isfinite(d.thresholds[i][label])
            direction = "below" if label in ("margin", "random") else "above"
            assert value < d.thresholds[i][label] if direction == "below" else value > d.thresholds[i][label]
    # a kept frame has every score, the costly novelty included
    assert set(d.scores) >= {"entropy", "margin", "least_confidence", "energy", "novelty", "human_disagreement"}
    assert np.isfinite(d.scores["novelty"][d.keep]).all()
    np.testing.assert_allclose(d.scores["entropy"], -(lambda p: (p * np.log(p)).sum(1))(
        np.exp(batch.logits) / np.exp(batch.logits).sum(1, keepdims=True)))


def test_human_disagreement_outranks_uncertainty(bank: NoveltyBank) -> None:
    ev = Evaluator(MIXED, bank=bank, clock=lambda: 0.0)
    d = ev.evaluate(frames(4000, seed=1, human_rate=0.3))
    human = np.array(["human_disagreement" in f for f in d.fired])
    others = np.array([bool(f) and "human_disagreement" not in f for f in d.fired])
    assert human.any() and others.any()
    assert np.median(d.priority[human]) > np.median(d.priority[others])
    # more triggers at once, higher priority
    counts = np.array([len(f) for f in d.fired])
    assert d.priority[counts >= 2].mean() > d.priority[counts == 1].mean()


def test_priority_grows_with_how_far_past_the_threshold() -> None:
    ev = Evaluator(spec({"trigger": "least_confidence", "above": 0.2}))
    logits = np.stack([np.array([t, 0, 0, 0, 0.0]) for t in (3.0, 2.0, 1.0, 0.5, 0.0)])  # flatter and flatter
    d = ev.evaluate(FrameBatch(logits=logits), now=0)
    fired = d.priority > 0
    assert fired[1:].all() and np.all(np.diff(d.priority[fired]) > 0)


def test_weight_zero_still_qualifies() -> None:
    ev = Evaluator(spec({"trigger": "random", "below": 1.0, "weight": 0}))
    d = ev.evaluate(FrameBatch(logits=np.zeros((4, 2))), now=0)
    assert d.keep.all() and np.all(d.priority > 0) and d.qualified.all()


def test_expired_campaign_does_nothing(bank: NoveltyBank) -> None:
    doc = dict(MIXED, expires_at="2030-01-01T00:00:00Z",
               budgets={"global": {"rate_per_s": 1, "burst": 2}})
    expiry = parse_spec(doc).expires_at
    assert expiry is not None
    ev = Evaluator(doc, bank=bank)
    ev.evaluate(frames(500), now=expiry - 10)
    before = json.dumps(ev.state_dict(), sort_keys=True)
    d = ev.evaluate(frames(500, seed=3, human_rate=1.0), now=expiry)
    assert d.expired and not d.keep.any() and not d.priority.any() and not any(d.fired)
    assert json.dumps(ev.state_dict(), sort_keys=True) == before  # nothing learned, nothing spent
    clocked = Evaluator(doc, bank=bank, clock=lambda: expiry + 1.0)
    assert clocked.evaluate(frames(10, human_rate=1.0)).expired


def test_filters_on_class_and_tags() -> None:
    doc = spec({"trigger": "random", "below": 1.0}, filters={"classes": [1], "tags": {"site": ["a", "b"]}})
    ev = Evaluator(doc)
    batch = frames(400)
    sites = ["a", "b", "c"]
    tags = [{"site": sites[i % 3]} for i in range(400)]
    d = ev.evaluate(FrameBatch(logits=batch.logits, tags=tags), now=0)
    expected = (batch.logits.argmax(1) == 1) & np.array([t["site"] != "c" for t in tags])
    np.testing.assert_array_equal(d.keep, expected)
    assert not Evaluator(doc).evaluate(FrameBatch(logits=batch.logits), now=0).keep.any()  # no tags: no match


def test_all_of_computes_costly_triggers_only_where_needed(bank: NoveltyBank, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    original = NoveltyBank._distance

    def counting(self: NoveltyBank, q: Any, *args: Any) -> Any:
        seen.append(len(q))
        return original(self, q, *args)

    monkeypatch.setattr(NoveltyBank, "_distance", counting)
    doc = spec({"all_of": [{"trigger": "margin", "below": 0.1}, {"trigger": "novelty", "above": 0.0}]})
    batch = frames(2000, seed=4)
    d = Evaluator(doc, bank=bank).evaluate(batch, now=0)
    margin = d.scores["margin"]
    assert sum(seen) == int((margin < 0.1).sum()) < 2000 / 2
    assert np.isnan(d.scores["novelty"][margin >= 0.1]).all()
    np.testing.assert_array_equal(d.keep, margin < 0.1)


def test_budgets_are_never_exceeded_on_a_stream(bank: NoveltyBank) -> None:
    doc = dict(MIXED, budgets={"global": {"rate_per_min": 60, "burst": 5},
                               "per_trigger": {"random": {"rate_per_hour": 0, "burst": 3}},
                               "per_class": {"2": {"rate_per_min": 6, "burst": 1}}})
    clock = {"now": 1000.0}
    ev = Evaluator(doc, bank=bank, clock=lambda: clock["now"])
    kept_at, class2_at, total = [], [], 0
    for i in range(300):
        clock["now"] += 0.25  # 64-frame batches, 4 per second: far more candidates than budget
        d = ev.evaluate(frames(64, seed=i, human_rate=0.3))
        kept_at += [clock["now"]] * int(d.keep.sum())
        class2_at += [clock["now"]] * int((d.keep & (d.predicted == 2)).sum())
        total += int(d.qualified.sum())
        assert not (d.keep & d.over_budget).any()
    elapsed = clock["now"] - 1000.0
    assert len(kept_at) <= 5 + elapsed * 1.0 and len(class2_at) <= 1 + elapsed / 10
    assert total > 3 * len(kept_at)  # the budget did bind
    assert ev.budget is not None and ev.budget.charged.get("random", 0) <= 3


def test_near_duplicates_are_uploaded_once() -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 255, (1, 48, 48, 3)).astype(np.uint8)
    other = rng.integers(0, 255, (1, 48, 48, 3)).astype(np.uint8)
    images = np.concatenate([np.clip(scene + rng.normal(0, 4, scene.shape), 0, 255).astype(np.uint8)
                             for _ in range(30)] + [other])
    doc = spec({"trigger": "random", "below": 1.0}, dedup={"max_hamming": 6, "memory": 8})
    ev = Evaluator(doc)
    d = ev.evaluate(FrameBatch(logits=np.zeros((31, 3)), images=images), now=0)
    assert d.keep.sum() == 2 and d.duplicate.sum() == 29
    assert ev.evaluate(FrameBatch(logits=np.zeros((1, 3)), images=images[:1]), now=1).duplicate.all()
    with pytest.raises(ValueError, match="images or .hashes"):
        ev.evaluate(FrameBatch(logits=np.zeros((1, 3))), now=2)


def test_batch_and_streaming_agree(bank: NoveltyBank) -> None:
    batch = frames(1500, seed=5, human_rate=0.2)
    whole = Evaluator(MIXED, bank=bank).evaluate(batch, now=0)
    streamed = Evaluator(MIXED, bank=bank)
    chunks, i = [], 0
    sizes = [1, 3, 64, 1, 17]
    while i < len(batch):
        rows = np.arange(i, min(i + sizes[len(chunks) % len(sizes)], len(batch)))
        chunks.append(streamed.evaluate(take(batch, rows), now=0))
        i = rows[-1] + 1
    np.testing.assert_array_equal(np.concatenate([c.keep for c in chunks]), whole.keep)
    np.testing.assert_allclose(np.concatenate([c.priority for c in chunks]), whole.priority, atol=1e-12)
    assert [f for c in chunks for f in c.fired] == whole.fired
    values = [v for c in chunks for v in c.values]
    for a, b in zip(values, whole.values, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-9) for k in a)


def test_state_survives_a_restart(bank: NoveltyBank) -> None:
    doc = dict(MIXED, budgets={"global": {"rate_per_min": 120, "burst": 10}}, dedup={"embedding_threshold": 0.01})
    stream = [frames(32, seed=100 + i, human_rate=0.2) for i in range(40)]
    reference = Evaluator(doc, bank=bank)
    expected = [reference.evaluate(b, now=1000.0 + i) for i, b in enumerate(stream)]
    first = Evaluator(doc, bank=bank)
    for i, b in enumerate(stream[:25]):
        first.evaluate(b, now=1000.0 + i)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable, as the agent stores it
    second = Evaluator(doc, bank=bank)
    second.load_state_dict(state)
    for i, b in enumerate(stream[25:], start=25):
        d = second.evaluate(b, now=1000.0 + i)
        np.testing.assert_array_equal(d.keep, expected[i].keep)
        np.testing.assert_allclose(d.priority, expected[i].priority)
    assert second.stats == reference.stats


def test_state_from_another_spec_is_refused_unless_asked() -> None:
    old = Evaluator(spec({"trigger": "entropy", "target_rate": 0.1}))
    old.evaluate(frames(3000), now=0)
    newer = Evaluator(dict(spec({"trigger": "entropy", "target_rate": 0.1}), version=2))
    with pytest.raises(ValueError, match="pass strict=False"):
        newer.load_state_dict(old.state_dict())
    newer.load_state_dict(old.state_dict(), strict=False)
    assert newer.calibrators["entropy"].threshold == old.calibrators["entropy"].threshold


def test_missing_inputs_are_refused_clearly(bank: NoveltyBank) -> None:
    with pytest.raises(ValueError, match="needs a NoveltyBank"):
        Evaluator(MIXED)
    ev = Evaluator(MIXED, bank=bank)
    with pytest.raises(ValueError, match=r"needs FrameBatch.embeddings \(for novelty\)"):
        ev.evaluate(FrameBatch(logits=np.zeros((2, K))), now=0)
    with pytest.raises(ValueError, match=r"shape \(2, 16\)"):
        ev.evaluate(FrameBatch(logits=np.zeros((2, K)), embeddings=np.zeros((2, 3))), now=0)
    with pytest.raises(ValueError, match="must be finite"):
        ev.evaluate(FrameBatch(logits=np.full((1, K), np.nan), embeddings=np.zeros((1, D))), now=0)
    with pytest.raises(ValueError, match="below k=5"):
        ev.evaluate(FrameBatch(logits=np.zeros((1, K)), embeddings=np.ones((1, D)), human=[7]), now=0)
    # optional inputs that are absent only mean "unknown": no human -> human_disagreement never fires
    d = ev.evaluate(FrameBatch(logits=np.zeros((3, K)), embeddings=np.ones((3, D))), now=0)
    assert np.isnan(d.scores["human_disagreement"]).all()


def test_challenger_and_ensemble_triggers() -> None:
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 3, (200, K))
    challenger = logits.copy()
    challenger[:20] = -challenger[:20]  # the challenger contradicts the model on the first 20 frames
    challenger[20:25] = np.nan  # no challenger output for these
    samples = np.exp(logits[None] + rng.normal(0, 2, (6, 200, K)))
    samples /= samples.sum(-1, keepdims=True)
    doc = spec({"any_of": [{"trigger": "challenger_disagreement"}, {"trigger": "bald", "above": 10.0}]})
    d = Evaluator(doc).evaluate(FrameBatch(logits=logits, challenger_logits=challenger, samples=samples), now=0)
    assert d.keep[:20].sum() >= 18 and not d.keep[20:].any()
    with pytest.raises(ValueError, match="needs FrameBatch.samples"):
        Evaluator(doc).evaluate(FrameBatch(logits=logits), now=0)


def test_random_trigger_samples_uniformly_and_reproducibly() -> None:
    doc = spec({"trigger": "random", "below": 0.1})
    a = Evaluator(doc).evaluate(FrameBatch(logits=np.zeros((20_000, 2))), now=0).keep
    b = Evaluator(doc).evaluate(FrameBatch(logits=np.zeros((20_000, 2))), now=0).keep
    assert abs(a.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(a, b)
