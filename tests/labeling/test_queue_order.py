"""The queue's order in Label Studio (labeling.push.queue_scores): rank within the diversity cluster first, then
informativeness, so the one field Label Studio's bulk import keeps (the prediction's score) carries the
round-robin over clusters; and the bridge's time budget for setting the clusters themselves."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.errors import InvalidInput
from fleet.protocol import Case, Classification, SelectedCase
from labeling.config import BridgeConfig
from labeling.push import MAX_FRACTION, RANKS, queue_scores
from tests.labeling.conftest import Clock, make_bridge
from tests.labeling.fakestudio import FakeStudio
from tests.labeling.realhub import LabelingHub


def selected(case_id: str, score: float, cluster: int) -> SelectedCase:
    case = Case(case_id=case_id, device_id="dev-1", captured_at=1.0, model_version="m1",
                prediction=Classification(label=0, probs=[0.6, 0.4]), image_sha256="0" * 64, image_size=10)
    return SelectedCase(case=case, image_url=f"http://hub.test/v1/cases/{case_id}/image?exp=1",
                        class_names=["a", "b"], state="queued", score=score, uncertainty=1 - score, received_at=1.0,
                        cluster=cluster)


def test_the_queue_serves_each_clusters_best_before_any_clusters_second() -> None:
    rng = np.random.default_rng(0)
    cases = [selected(f"c{i}", float(rng.uniform(0, 1)), int(rng.integers(0, 5))) for i in range(60)]
    clusters = {c.case_id: c.cluster for c in cases}
    order = queue_scores(cases, clusters)
    served = sorted(cases, key=lambda c: order[c.case_id])  # what Label Studio's uncertainty sampling does
    n_clusters = len(set(clusters.values()))
    first = served[:n_clusters]
    assert len({c.cluster for c in first}) == n_clusters  # one of each before any repeats
    for k in set(clusters.values()):  # and each cluster's own cases in the order of their informativeness
        mine = [c.score for c in served if c.cluster == k]
        assert mine == sorted(mine)
        assert first[[c.cluster for c in first].index(k)].score == min(mine)
    assert [c.score for c in first] == sorted(c.score for c in first)  # heads: most informative first
    assert all(0.0 <= v < 1.0 for v in order.values())  # Label Studio refuses a score outside [0, 1]
    scaled = {k: v * RANKS for k, v in order.items()}
    assert all(scaled[c.case_id] - int(scaled[c.case_id]) == pytest.approx(c.score, abs=1e-6) for c in cases)


def test_scores_at_the_edges_stay_inside_their_rank() -> None:
    cases = [selected("lo", -0.5, 0), selected("hi", 1.0, 0), selected("other", 1.0, 1)]
    order = queue_scores(cases, {"lo": 0, "hi": 0, "other": 1})
    assert order == pytest.approx({"lo": 0.0, "hi": (1 + MAX_FRACTION) / RANKS, "other": MAX_FRACTION / RANKS})
    many = [selected(f"c{i:03d}", i / 1000, 0) for i in range(RANKS + 20)]  # one cluster, more cases than ranks
    big = queue_scores(many, {c.case_id: 0 for c in many})
    assert [c.case_id for c in sorted(many, key=lambda c: big[c.case_id])] == [c.case_id for c in many]
    assert max(big.values()) < 1.0


@pytest.mark.parametrize("budget", [-1.0, float("nan")])
def test_a_bad_cluster_budget_is_refused(budget: float) -> None:
    with pytest.raises(InvalidInput, match="cluster_budget_s must be >= 0 seconds; received"):
        BridgeConfig(cluster_budget_s=budget)


def test_a_carried_prediction_label_studio_drops_is_reported(hub: LabelingHub, studio: FakeStudio,
                                                              clock: Clock) -> None:
    """A project on another queue version gets its open tasks' predictions copied to the bridge's; Label Studio
    drops a prediction it finds invalid (a score outside [0, 1], as a bridge before the scaled queue score could
    have stored) and only its count says so: the bridge reports it, and the queue still moves."""
    old = make_bridge(hub, studio, clock, queue_version="m1")
    assert old.sync_once().pushed == 6
    first = old.ledger.tasks("open")[0]
    json_ = dict(first.task_json or {})
    json_["predictions"] = [{**json_["predictions"][0], "score": 1.5}]
    old.ledger.set_task(first.case_id, task_json=json_)
    upgraded = make_bridge(hub, studio, clock)
    upgraded.ledger = old.ledger
    report = upgraded.sync_once()
    assert any("created 5 of the 6 predictions carried to queue version 'flywheel'" in e for e in report.errors), \
        report.errors
    assert studio.projects[upgraded.project_id].model_version == "flywheel"
