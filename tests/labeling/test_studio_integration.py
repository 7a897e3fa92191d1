"""The bridge against a real Label Studio (started by scripts/test.sh): push, the uncertainty queue,
simulated annotators, labels back exactly once, and faults. The hub is the real one, in-process for the
bridge and served on loopback, so Label Studio posts real webhooks to it and loads its signed images."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from labeling.bots import BotSpec
from labeling.config import QUEUE_VERSION
from labeling.push import queue_scores
from tests.labeling.livestack import CLASSES, Live, build
from tests.labeling.realhub import labeling_hub

pytestmark = pytest.mark.integration


def test_push_creates_ordered_tasks_with_predictions_and_signed_images(live: Live) -> None:
    report = live.bridge.sync_once()
    assert report.pushed == 8 and not report.errors
    project = live.studio.get_project(live.bridge.project_id)
    assert project.sampling == "Uncertainty sampling"
    assert project.model_version == QUEUE_VERSION  # one queue across model versions
    assert project.class_names == CLASSES and project.show_collab_predictions
    tasks = list(live.studio.iter_tasks(live.bridge.project_id))
    assert len(tasks) == 8 and len({t.case_id for t in tasks}) == 8
    clusters = live.hub.clusters()
    order = queue_scores([live.hub.selected(t.case_id or "") for t in tasks], clusters)
    for t in tasks:
        case = live.hub.selected(t.case_id or "")
        [p] = t.predictions
        assert (p.model_version, p.score, p.cluster) == (QUEUE_VERSION, order[case.case_id], clusters[case.case_id])
        assert t.data["model_version"] == live.hub.model_version
        image = httpx.get(t.data["image"], timeout=10)  # what an annotator's browser does
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert live.bridge.sync_once().pushed == 0  # the queue is at its target depth


def test_the_queue_serves_the_most_informative_task_first_spread_over_clusters(live: Live) -> None:
    live.bridge.sync_once()
    team = live.team(BotSpec("solo", 1.0, 0.0))
    bot = team.bots[0]
    served = []
    for _ in range(4):
        task = live.studio.get_task(bot.studio.next_task(live.bridge.project_id).id)  # type: ignore[union-attr]
        assert task is not None
        served.append(task)
        bot.studio.create_annotation(task.id, [{"from_name": "label", "to_name": "image", "type": "choices",
                                                "value": {"choices": ["cat"]}}])
    pushed = [t.case_id for t in live.bridge.ledger.tasks()]
    assert served[0].case_id == min(pushed, key=lambda c: live.hub.selected(c).score)  # most informative
    clusters = [t.predictions[0].cluster for t in served]
    available = {live.hub.clusters()[c] for c in pushed}
    assert len(set(clusters)) == min(4, len(available))  # one per cluster before any cluster repeats
    team.close()


def test_the_queue_is_spread_over_clusters_as_soon_as_the_import_returns(ls_env: tuple[str, str],
                                                                         ls_project_title: str,
                                                                         tmp_path: Path) -> None:
    """Label Studio's bulk import drops the prediction's ``cluster``; with no time to set any (budget 0), the queue
    score alone (labeling.push.queue_scores) serves one task per cluster, most informative first, before any
    cluster repeats; a later turn sets the clusters themselves."""
    with labeling_hub(tmp_path, 60, serve=True) as hub:
        live = build(ls_env, ls_project_title, tmp_path, hub, cluster_budget_s=0.0)
        report = live.bridge.sync_once(reconcile=False)
        assert report.pushed == 8 and not report.errors
        tasks = list(live.studio.iter_tasks(live.bridge.project_id))
        assert all(t.predictions[0].cluster is None for t in tasks)  # nothing set by the import
        clusters = hub.clusters()
        team = live.team(BotSpec("solo", 1.0, 0.0))
        bot = team.bots[0]
        served = []
        for _ in range(4):
            task = live.studio.get_task(bot.studio.next_task(live.bridge.project_id).id)  # type: ignore[union-attr]
            assert task is not None and task.case_id is not None
            served.append(task.case_id)
            bot.studio.create_annotation(task.id, [{"from_name": "label", "to_name": "image", "type": "choices",
                                                    "value": {"choices": ["cat"]}}])
        team.close()
        pushed = [t.case_id or "" for t in tasks]
        heads = sorted((c for c in pushed if not any(clusters[o] == clusters[c] and
                                                     hub.selected(o).score < hub.selected(c).score for o in pushed)),
                       key=lambda c: hub.selected(c).score)
        order = queue_scores([hub.selected(c) for c in pushed], clusters)
        assert served == sorted(pushed, key=lambda c: order[c])[:4]  # Label Studio serves the queue's order
        assert served[:len(heads)] == heads[:4]  # each cluster's most informative, most informative first
        assert len({clusters[c] for c in served}) == min(4, len(set(clusters[c] for c in pushed)))
        live.bridge.config = replace(live.bridge.config, cluster_budget_s=60.0)
        assert not live.bridge.sync_once(reconcile=False).errors  # the next turn sets them
        given = {row.case_id: row.cluster for row in live.bridge.ledger.tasks()}
        after = list(live.studio.iter_tasks(live.bridge.project_id))
        assert len(after) >= 8 and all(t.predictions[0].cluster == given[t.case_id or ""] for t in after)
        live.studio.close()


def test_bots_annotate_and_every_annotation_comes_back_exactly_once(live: Live) -> None:
    live.bridge.sync_once()
    team = live.team(BotSpec("ann", 1.0, 0.0), BotSpec("bea", 0.5, 0.0))
    team.run_until_idle()
    live.wait_for_webhooks(8)
    report = live.bridge.sync_once(reconcile=True, push=False)
    assert report.webhook_events >= 8 and not report.errors
    ls = live.ls_annotations()
    hub = live.labels_by_annotation()
    assert set(hub) == set(ls) and len(ls) == 8
    for _ in range(2):
        again = live.bridge.sync_once(reconcile=True, push=False)
        assert again.labels_posted == 0 and again.labels_deleted == 0
    created = live.hub.created()
    assert sorted(created) == sorted(ls)
    stats = team.stats
    assert stats["ann"].answered and stats["ann"].correct == stats["ann"].answered
    accurate = [lb for lb in hub.values() if lb["annotator"] == BotSpec("ann").email]
    assert all(lb["label"] == live.hub.truth[lb["case_id"]] for lb in accurate)
    team.close()


def test_webhook_delivered_twice_or_never(live: Live) -> None:
    live.bridge.sync_once()
    team = live.team(BotSpec("ann", 1.0, 0.0))
    team.bots[0].step()
    live.wait_for_webhooks(1)
    body = live.hub.events()[0]["body"]
    live.hub.post_webhook({**body, "redelivered": True})  # Label Studio retried: a second inbox entry
    report = live.bridge.sync_once(reconcile=False, push=False)
    assert report.webhook_events == 2 and report.labels_posted == 1
    # now the webhooks stop coming: reconciliation still brings the label back, once
    live.studio.delete_webhooks(live.bridge.project_id)
    team.bots[0].step()
    time.sleep(0.5)
    assert len(live.hub.events()) == 2
    assert live.bridge.sync_once(reconcile=False, push=False).labels_posted == 0
    assert live.bridge.sync_once(reconcile=True, push=False).labels_posted == 1
    assert len(live.hub.live_labels()) == 2 == len(live.ls_annotations())
    team.close()


def test_task_deleted_and_annotation_changed_in_label_studio(live: Live) -> None:
    live.bridge.sync_once()
    team = live.team(BotSpec("ann", 1.0, 0.0))
    for _ in range(2):
        team.bots[0].step()
    live.bridge.sync_once(reconcile=True, push=False)
    (a1, ann1), (a2, ann2) = sorted(live.ls_annotations().items())
    # an annotator changes their mind after the label reached the hub
    new_class = (live.labels_by_annotation()[a1]["label"] + 1) % 3
    live.studio.update_annotation(a1, [{"from_name": "label", "to_name": "image", "type": "choices",
                                        "value": {"choices": [CLASSES[new_class]]}}])
    # an admin deletes the other task
    case2 = live.labels_by_annotation()[a2]["case_id"]
    live.studio.delete_task(ann2.task_id)  # type: ignore[attr-defined]
    live.wait_for_webhooks(4)
    report = live.bridge.sync_once(reconcile=True, push=False)
    assert report.labels_posted == 1 and report.labels_deleted == 1 and report.released == 1
    labels = live.labels_by_annotation()
    assert labels[a1]["label"] == new_class and a2 not in labels
    assert live.hub.state(case2) == "unlabeled"
    actions = live.hub.actions()
    assert actions.count("updated") == 1 and actions.count("deleted") == 1
    team.close()


def test_skipped_tasks_go_back_to_the_pool(live: Live) -> None:
    live.bridge.sync_once()
    team = live.team(BotSpec("skipper", 1.0, 0.0, skip_rate=1.0))
    team.bots[0].step()
    live.wait_for_webhooks(1)
    [row] = [t for t in live.bridge.ledger.tasks() if t.task_id in {a.task_id for a in live.ls_annotations().values()}]
    report = live.bridge.sync_once(reconcile=True, push=False)
    assert report.released == 1
    assert live.hub.state(row.case_id) == "unlabeled"
    assert live.studio.get_task(int(row.task_id or 0)) is None
    team.close()


def test_malformed_annotation_is_refused_with_a_logged_reason(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    live.bridge.sync_once()
    team = live.team(BotSpec("sloppy", 1.0, 0.0, malformed_rate=1.0))
    team.bots[0].step()
    with caplog.at_level(logging.WARNING, logger="labeling.pull"):
        report = live.bridge.sync_once(reconcile=True, push=False)
    assert report.labels_posted == 0 and live.hub.live_labels() == []
    [ann_id] = live.ls_annotations()
    assert any(f"refusing annotation {ann_id}" in r.message and "exactly one class" in r.message
               for r in caplog.records)
    team.close()


def test_label_studio_down_slow_or_losing_answers_during_push(live: Live) -> None:
    f = live.faults
    f.add("POST", r"/api/projects/\d+/import", "lose")  # the import happens, its answer is lost
    f.add("PATCH", r"/api/predictions/", "refuse", times=3)  # setting clusters: refused, then retried
    f.add("GET", r"/api/tasks", "slow", times=2, delay_s=1.5)
    report = live.bridge.sync_once()
    assert not report.errors, report.errors
    tasks = list(live.studio.iter_tasks(live.bridge.project_id))
    assert len(tasks) == len({t.case_id for t in tasks}) == 8  # nothing duplicated
    clusters = live.hub.clusters()
    assert all(t.predictions[0].cluster == clusters[t.case_id or ""] for t in tasks)
    assert {r.state for r in live.bridge.ledger.tasks()} == {"open"}
    # Label Studio completely down: the turn reports it, nothing is half-written, the next turn finishes
    f.down = True
    team_hub_queued = len(live.hub.in_state("queued"))
    assert live.bridge.sync_once(reconcile=True).errors
    f.down = False
    live.bridge.sync_once(reconcile=True)
    tasks = list(live.studio.iter_tasks(live.bridge.project_id))
    assert len(tasks) == len({t.case_id for t in tasks})
    queued = live.hub.in_state("queued")
    assert queued == {t.case_id for t in tasks} and len(queued) >= team_hub_queued


def test_label_studio_down_during_pull_loses_and_duplicates_nothing(live: Live) -> None:
    live.bridge.sync_once()
    team = live.team(BotSpec("ann", 1.0, 0.0))
    team.run_until_idle()
    f = live.faults
    f.add("GET", r"/api/tasks", "refuse", times=50)
    f.add("GET", r"/api/users", "503", times=50)
    live.wait_for_webhooks(8)
    report = live.bridge.sync_once(reconcile=True, push=False)
    assert report.errors  # annotators could not be resolved: the webhook events wait in the inbox
    assert live.hub.live_labels() == [] and live.bridge.ledger.get("webhook_cursor") is None
    f.rules.clear()
    live.bridge.sync_once(reconcile=True, push=False)
    assert set(live.labels_by_annotation()) == set(live.ls_annotations())
    assert live.hub.actions().count("created") == len(live.ls_annotations())
    team.close()


def test_the_cli_syncs_and_reports_status(ls_env: tuple[str, str], ls_project_title: str, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from labeling.cli import app

    state = tmp_path / "state.sqlite"
    with labeling_hub(tmp_path, 40, serve=True) as hub:
        args = ["sync", "--hub-url", hub.public_url, "--hub-token", hub.labeler_token, "--ls-url", ls_env[0],
                "--ls-token", ls_env[1], "--project", ls_project_title, "--state", str(state), "--overlap", "1",
                "--min-depth", "5", "--webhook-secret", hub.webhook_secret, "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.strip().splitlines()[-1])
        assert report["pushed"] == 5 and report["errors"] == []
    status = CliRunner().invoke(app, ["status", "--state", str(state), "--json"])
    assert status.exit_code == 0, status.output
    info = json.loads(status.output)
    assert info["queue"]["tasks"] == {"open": 5} and info["class_names"] == CLASSES
