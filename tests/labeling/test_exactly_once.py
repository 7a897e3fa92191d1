"""Labels reach the hub exactly once: webhooks twice or never, updates, deletions, skips, malformed answers,
and faults on either side. Unit level: the real hub answers in-process (faults injected on the way to it),
Label Studio is in memory."""

from __future__ import annotations

import logging

import pytest

from fleet.errors import InvalidInput
from labeling.bridge import Bridge
from labeling.config import QUEUE_VERSION, BridgeConfig
from labeling.pull import apply_webhook
from labeling.push import queue_scores
from tests.labeling.conftest import Clock, make_bridge
from tests.labeling.fakestudio import FakeStudio
from tests.labeling.realhub import CLASSES, LabelingHub


def tasks_of(studio: FakeStudio) -> list[dict]:  # type: ignore[type-arg]
    return sorted(studio.tasks.values(), key=lambda t: t["id"])


def test_push_creates_tasks_with_signed_images_predictions_and_clusters(bridge: Bridge, hub: LabelingHub,
                                                                        studio: FakeStudio) -> None:
    report = bridge.sync_once()
    assert report.pushed == 6 and not report.errors  # min_depth 6, overlap 1
    project = studio.projects[bridge.project_id]
    assert project.sampling == "Uncertainty sampling" and project.model_version == QUEUE_VERSION
    assert project.class_names == CLASSES
    clusters = hub.clusters()  # what the hub's selection said
    pushed = [hub.selected(t["data"]["case_id"]) for t in tasks_of(studio)]
    order = queue_scores(pushed, clusters)  # rank in the cluster + the case's score
    for t, case in zip(tasks_of(studio), pushed, strict=True):
        assert case.state == "queued"
        assert t["data"]["image"].startswith(f"{hub.public_url}/v1/cases/{case.case_id}/image?exp=")
        [p] = t["predictions"]
        assert (p["score"], p["cluster"], p["model_version"]) == (order[case.case_id], clusters[case.case_id],
                                                                  QUEUE_VERSION)
        assert t["data"]["score"] == case.score and t["data"]["cluster"] == clusters[case.case_id]
        assert t["data"]["model_version"] == hub.model_version  # the model that made the prediction
        assert p["result"][0]["value"]["choices"] == [CLASSES[case.case.prediction.label]]
    # the queue is full: the next turn pushes nothing
    assert bridge.sync_once().pushed == 0


def test_labels_come_back_once_through_reconciliation(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.sync_once()
    for t in tasks_of(studio)[:3]:
        studio.annotate(t["id"], 7, CLASSES[hub.truth[t["data"]["case_id"]]])
    first = bridge.sync_once(reconcile=True)
    assert first.labels_posted == 3
    for _ in range(3):
        assert bridge.sync_once(reconcile=True).labels_posted == 0
    assert len(hub.live_labels()) == 3 and hub.actions() == ["created"] * 3
    label = hub.live_labels()[0]
    assert label["annotator"] == "user7@flywheel.local" and label["status"] == "accepted"
    assert hub.state(label["case_id"]) == "labeled" and label["label"] == hub.truth[label["case_id"]]


def test_a_webhook_delivered_twice_is_applied_once(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.sync_once()
    t = tasks_of(studio)[0]
    ann = studio.annotate(t["id"], 7, "dog")
    body = studio.webhook("ANNOTATION_CREATED", ann)
    hub.post_webhook(body)
    hub.post_webhook(body)  # identical bytes: the inbox keeps one
    hub.post_webhook(dict(reversed(list(body.items()))))  # same event, other bytes: two inbox entries
    assert len(hub.events()) == 2
    report = bridge.sync_once(reconcile=False, push=False)
    assert report.webhook_events == 2 and report.labels_posted == 1
    bridge.sync_once(reconcile=True, push=False)
    assert hub.created() == [ann["id"]] and len(hub.live_labels()) == 1
    assert hub.acked() == max(e["id"] for e in hub.events())


def test_a_webhook_that_never_comes_is_caught_by_reconciliation(bridge: Bridge, hub: LabelingHub,
                                                                 studio: FakeStudio) -> None:
    bridge.sync_once()
    t = tasks_of(studio)[0]
    ann = studio.annotate(t["id"], 7, "dog")
    assert bridge.sync_once(reconcile=False, push=False).labels_posted == 0  # no webhook, no reconcile yet
    assert bridge.sync_once(reconcile=True, push=False).labels_posted == 1
    # the webhook finally arrives, late: nothing changes
    hub.post_webhook(studio.webhook("ANNOTATION_CREATED", ann))
    assert bridge.sync_once(reconcile=False, push=False).labels_posted == 0
    assert hub.created() == [ann["id"]]


def test_an_annotation_changed_after_ingest_updates_the_label_and_stale_events_are_ignored(
        bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.sync_once()
    t = tasks_of(studio)[0]
    ann = studio.annotate(t["id"], 7, "dog")
    old_body = studio.webhook("ANNOTATION_CREATED", dict(ann))
    bridge.sync_once(reconcile=True, push=False)
    studio.change(ann["id"], "bird")
    hub.post_webhook(studio.webhook("ANNOTATION_UPDATED", ann))
    assert bridge.sync_once(reconcile=False, push=False).labels_posted == 1
    [label] = hub.live_labels()
    assert label["label"] == CLASSES.index("bird")
    # the original "created" webhook delivered late must not flip the label back
    hub.post_webhook(old_body)
    assert bridge.sync_once(reconcile=True, push=False).webhook_events == 1
    [label] = hub.live_labels()
    assert label["label"] == CLASSES.index("bird")
    assert hub.actions() == ["created", "updated"]


def test_a_deleted_annotation_deletes_its_label_once(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.sync_once()
    t = tasks_of(studio)[0]
    ann = studio.annotate(t["id"], 7, "dog")
    bridge.sync_once(reconcile=True, push=False)
    studio.remove_annotation(ann["id"])
    body = studio.webhook("ANNOTATIONS_DELETED", annotation_ids=[ann["id"]])
    hub.post_webhook(body)
    hub.post_webhook({**body, "again": True})
    assert bridge.sync_once(reconcile=False, push=False).labels_deleted == 1
    bridge.sync_once(reconcile=True, push=False)
    assert hub.live_labels() == [] and hub.actions() == ["created", "deleted"]
    # a late "created" event for the deleted annotation does not resurrect it
    hub.post_webhook(studio.webhook("ANNOTATION_CREATED", ann))
    bridge.sync_once(reconcile=True, push=False)
    assert hub.live_labels() == []


def test_a_task_deleted_in_label_studio_releases_its_case(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.sync_once()
    t1, t2 = tasks_of(studio)[:2]
    studio.annotate(t1["id"], 7, "dog")
    bridge.sync_once(reconcile=True, push=False)
    case1, case2 = t1["data"]["case_id"], t2["data"]["case_id"]
    assert hub.state(case1) == "labeled"
    studio.delete_task(t1["id"])  # by reconciliation only
    studio.delete_task(t2["id"])
    hub.post_webhook(studio.webhook("TASKS_DELETED", task_ids=[t2["id"]]))  # and by webhook
    report = bridge.sync_once(reconcile=True, push=False)
    assert report.released == 2 and report.labels_deleted == 1
    assert hub.state(case1) == "unlabeled" and hub.state(case2) == "unlabeled"
    assert hub.live_labels() == []
    assert bridge.sync_once(reconcile=True, push=False).released == 0


def test_a_skipped_task_goes_back_to_the_pool(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.sync_once()
    t = tasks_of(studio)[0]
    case = t["data"]["case_id"]
    studio.annotate(t["id"], 7, None, cancelled=True)
    report = bridge.sync_once(reconcile=True, push=False)
    assert report.released == 1
    assert hub.state(case) == "unlabeled"
    assert t["id"] not in studio.tasks  # out of the annotators' queue
    assert hub.live_labels() == []


def test_a_malformed_result_is_refused_with_a_logged_reason_until_fixed(
        bridge: Bridge, hub: LabelingHub, studio: FakeStudio, caplog: pytest.LogCaptureFixture) -> None:
    bridge.sync_once()
    t = tasks_of(studio)[0]
    two = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat", "dog"]}}]
    ann = studio.annotate(t["id"], 7, None, result=two)
    with caplog.at_level(logging.WARNING, logger="labeling.pull"):
        report = bridge.sync_once(reconcile=True, push=False)
    assert report.labels_posted == 0 and hub.live_labels() == []
    assert any(f"refusing annotation {ann['id']}" in r.message and "exactly one class" in r.message
               for r in caplog.records)
    assert bridge.ledger.agreement_summary()["refused"] == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="labeling.pull"):
        bridge.sync_once(reconcile=True, push=False)
    assert not [r for r in caplog.records if "refusing" in r.message]  # logged once, not every turn
    studio.change(ann["id"], "dog")
    assert bridge.sync_once(reconcile=True, push=False).labels_posted == 1
    # and a label that later turns malformed is taken back
    studio.change(ann["id"], result=[{"from_name": "label", "to_name": "image", "type": "choices",
                                      "value": {"choices": ["horse"]}}])
    assert bridge.sync_once(reconcile=True, push=False).labels_deleted == 1
    assert hub.live_labels() == []


def test_a_malformed_webhook_body_is_refused_and_does_not_block_the_inbox(
        bridge: Bridge, hub: LabelingHub, studio: FakeStudio, caplog: pytest.LogCaptureFixture) -> None:
    bridge.sync_once()
    ann = studio.annotate(tasks_of(studio)[0]["id"], 7, "cat")
    hub.post_webhook({"action": "ANNOTATION_CREATED", "annotation": {"id": "not-a-number"}})
    hub.post_webhook(studio.webhook("ANNOTATION_CREATED", ann))
    with caplog.at_level(logging.WARNING, logger="labeling.pull"):
        report = bridge.sync_once(reconcile=False, push=False)
    assert report.webhook_events == 2 and report.labels_posted == 1
    assert any("refusing webhook body" in r.message for r in caplog.records)


def test_hub_down_during_flush_loses_and_duplicates_nothing(bridge: Bridge, hub: LabelingHub,
                                                           studio: FakeStudio) -> None:
    bridge.sync_once()
    for t in tasks_of(studio)[:4]:
        studio.annotate(t["id"], 7, "cat")
    hub.faults.add("POST", "^/v1/labels$", "503", times=20)
    report = bridge.sync_once(reconcile=True, push=False)
    assert report.errors and hub.live_labels() == []
    hub.faults.clear()
    hub.faults.add("POST", "^/v1/labels$", "lose", times=2)  # applied by the hub, answer lost: retried
    hub.faults.add("POST", "^/v1/labels$", "refuse", times=1)
    report = bridge.sync_once(reconcile=True, push=False)
    assert not report.errors
    assert len(hub.live_labels()) == 4
    assert sorted(hub.created()) == sorted({*hub.created()})  # each annotation created once
    assert hub.actions().count("created") == 4 and set(hub.actions()) == {"created", "unchanged"}


def test_label_studio_down_during_pull_deletes_nothing(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.sync_once()
    for t in tasks_of(studio)[:4]:
        studio.annotate(t["id"], 7, "cat")
    bridge.sync_once(reconcile=True, push=False)
    labeled = hub.in_state("labeled")
    assert len(labeled) == 4
    studio.fail_pages_after = 2  # the listing breaks off half way
    report = bridge.sync_once(reconcile=True, push=False)
    assert report.errors and len(hub.live_labels()) == 4
    assert hub.in_state("labeled") == labeled  # nothing released or deleted on a half listing
    studio.fail_pages_after = None
    studio.down = True
    assert bridge.sync_once(reconcile=True).errors
    studio.down = False
    assert not bridge.sync_once(reconcile=True).errors
    assert len(hub.live_labels()) == 4 and hub.actions().count("deleted") == 0


def test_an_import_whose_answer_is_lost_is_not_duplicated(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    studio.lose_next_import = True
    bridge.sync_once()
    case_ids = [t["data"]["case_id"] for t in studio.tasks.values()]
    assert len(case_ids) == 6 and len(set(case_ids)) == 6
    assert {t.state for t in bridge.ledger.tasks()} == {"open"}
    assert all(t.task_id in studio.tasks for t in bridge.ledger.tasks())


def test_an_import_that_never_arrived_is_retried(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    bridge.project(CLASSES)
    studio.down = True
    assert bridge.sync_once().errors
    assert {t.state for t in bridge.ledger.tasks()} == {"importing"}
    studio.down = False
    bridge.sync_once()
    case_ids = [t["data"]["case_id"] for t in studio.tasks.values()]
    assert len(case_ids) == len(set(case_ids)) == 6
    assert {t.state for t in bridge.ledger.tasks()} == {"open"}


def test_label_studio_down_before_the_first_push_strands_no_case(bridge: Bridge, hub: LabelingHub,
                                                                  studio: FakeStudio) -> None:
    studio.down = True  # the project cannot even be created
    assert bridge.sync_once().errors
    studio.down = False
    bridge.sync_once()
    queued = hub.in_state("queued")
    assert queued and {t["data"]["case_id"] for t in studio.tasks.values()} == queued


def test_a_selection_whose_answer_is_lost_is_adopted_next_turn(bridge: Bridge, hub: LabelingHub,
                                                               studio: FakeStudio) -> None:
    bridge.project(CLASSES)
    hub.faults.add("POST", "^/v1/selections$", "lose")
    assert bridge.sync_once().errors
    queued = hub.in_state("queued")
    assert len(queued) == 6 and not studio.tasks
    bridge.sync_once()
    assert {t["data"]["case_id"] for t in studio.tasks.values()} == queued


def test_overlap_consensus_accepts_agreement_and_holds_disagreement(hub: LabelingHub, studio: FakeStudio,
                                                                    clock: Clock) -> None:
    bridge = make_bridge(hub, studio, clock, overlap=2, overlap_share=1.0)
    bridge.sync_once()
    t1, t2 = tasks_of(studio)[:2]
    t1["overlap"] = t2["overlap"] = 2  # Label Studio sets the cohort's overlap
    a = studio.annotate(t1["id"], 7, "dog")
    bridge.sync_once(reconcile=True, push=False)
    assert hub.live_labels()[0]["status"] == "held"  # waiting for the second annotator
    studio.annotate(t1["id"], 8, "dog")
    studio.annotate(t2["id"], 7, "dog")
    studio.annotate(t2["id"], 8, "cat")
    bridge.sync_once(reconcile=True, push=False)
    by_case = {c: sorted((lb["status"], lb["agreement"]) for lb in hub.live_labels(c))
               for c in (t1["data"]["case_id"], t2["data"]["case_id"])}
    assert by_case[t1["data"]["case_id"]] == [("accepted", 1.0), ("accepted", 1.0)]
    assert by_case[t2["data"]["case_id"]] == [("held", 0.5), ("held", 0.5)]
    assert hub.state(t2["data"]["case_id"]) == "held"
    assert next(lb for lb in hub.live_labels() if lb["annotation_id"] == a["id"])["n_annotators"] == 2


def test_gold_tasks_carry_their_answer_to_the_hub_and_score_annotators(hub: LabelingHub, studio: FakeStudio,
                                                                       clock: Clock) -> None:
    """The bridge keeps a gold task's answer from annotators and sends it with every answer on the task; the
    hub decides (fleet.consensus: tests/hub/test_labels.py holds an unreliable annotator everywhere)."""
    from labeling.push import push_gold

    bridge = make_bridge(hub, studio, clock)
    gold_ids = hub.add_cases(4, seed=99, prefix="gold")
    for c in gold_ids:  # known answers: a reviewer's, so labeled in the hub already and never selected again
        hub.label(c, hub.truth[c], annotator="reviewer@flywheel.local", source="review", ground_truth=True)
        assert hub.state(c) == "labeled"
    items = [(hub.selected(c), hub.truth[c]) for c in gold_ids]
    assert push_gold(bridge, items) == 4
    gold_tasks = [studio.task_of_case(c) for c in gold_ids]
    bridge.sync_once()  # plus ordinary tasks
    ordinary = [t for t in tasks_of(studio) if not t["data"]["case_id"].startswith("gold")]
    wrong = {c: CLASSES[(hub.truth[c] + 1) % 3] for c in gold_ids}
    for t in gold_tasks:
        studio.annotate(t["id"], 7, CLASSES[hub.truth[t["data"]["case_id"]]])  # careful annotator
        studio.annotate(t["id"], 9, wrong[t["data"]["case_id"]])  # careless annotator
    studio.annotate(ordinary[0]["id"], 7, "cat")
    studio.annotate(ordinary[1]["id"], 9, "cat")
    bridge.sync_once(reconcile=True, push=False)
    from_studio = [lb for lb in hub.live_labels() if lb["source"] == "label-studio"]
    gold_labels = [lb for lb in from_studio if lb["case_id"].startswith("gold")]
    assert sorted({(lb["annotator"], lb["status"]) for lb in gold_labels}) == [
        ("user7@flywheel.local", "gold"), ("user9@flywheel.local", "held")]
    posts = [post for post, _ in hub.label_posts() if post["source"] == "label-studio"]
    assert all(p["gold_label"] is not None for p in posts if p["case_id"].startswith("gold"))
    assert all(p.get("gold_label") is None for p in posts if not p["case_id"].startswith("gold"))
    # the hub scores annotators on gold answers: 0 of 4 right holds the careless one's other answers too
    status = {lb["annotator"]: lb["status"] for lb in from_studio if not lb["case_id"].startswith("gold")}
    assert status == {"user7@flywheel.local": "accepted", "user9@flywheel.local": "held"}
    from labeling.status import collect

    info = collect(bridge.ledger, now=clock())
    assert info["annotators"]["user7@flywheel.local"]["accuracy"] > 0.8
    assert info["annotators"]["user9@flywheel.local"]["total"] == 4


def test_the_throttle_pushes_more_once_annotators_work(hub: LabelingHub, studio: FakeStudio, clock: Clock) -> None:
    from labeling.throttle import Throttle

    bridge = make_bridge(hub, studio, clock, throttle=Throttle(min_depth=4, max_depth=30, horizon_s=60, window_s=10))
    assert bridge.sync_once().pushed == 4
    assert bridge.sync_once().pushed == 0
    for t in tasks_of(studio):  # annotators finish everything within the window: 0.4 answers/s
        studio.annotate(t["id"], 7, "cat")
    clock.advance(1)
    report = bridge.sync_once(reconcile=True)
    assert report.labels_posted == 4
    assert report.pushed == 24  # target = ceil(0.4/s * 60 s) = 24 annotations, queue empty
    clock.advance(60)  # annotators went quiet: back to the minimum depth, and nothing more is pushed
    assert bridge.sync_once(reconcile=True).pushed == 0
    assert bridge.ledger.open_slots() == 24


def test_classes_may_grow_but_not_change(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    from fleet.errors import InvalidInput

    bridge.sync_once()
    bridge.project(CLASSES + ["fish"])
    assert studio.projects[bridge.project_id].class_names == CLASSES + ["fish"]
    with pytest.raises(InvalidInput, match="do not extend"):
        bridge.project(["dog", "cat", "bird", "fish"])


def test_a_reused_annotation_id_replaces_the_old_label(bridge: Bridge, hub: LabelingHub, studio: FakeStudio) -> None:
    """SQLite-backed Label Studio reuses the highest id after a delete: the old label goes first."""
    bridge.sync_once()
    t1, t2 = tasks_of(studio)[:2]
    a = studio.annotate(t1["id"], 7, "dog")
    bridge.sync_once(reconcile=True, push=False)
    studio.remove_annotation(a["id"])
    b = studio.annotate(t2["id"], 8, "cat")
    b["id"] = a["id"]
    assert apply_webhook(bridge, studio.webhook("ANNOTATION_CREATED", b)) == "new"
    bridge.sync_once(reconcile=True, push=False)
    [label] = hub.live_labels()
    assert label["case_id"] == t2["data"]["case_id"] and label["annotator"] == "user8@flywheel.local"
    assert hub.actions() == ["created", "deleted", "created"]


def test_expiring_image_links_are_refreshed_from_the_hub(bridge: Bridge, hub: LabelingHub,
                                                         studio: FakeStudio) -> None:
    hub.settings.image_url_ttl_s = 600  # links that expire within the bridge's one-hour margin
    bridge.sync_once()
    before = {t["id"]: t["data"]["image"] for t in studio.tasks.values()}
    hub.settings.image_url_ttl_s = 7 * 24 * 3600
    report = bridge.sync_once(push=False)
    assert report.images_refreshed == len(before) == 6
    for t in studio.tasks.values():
        assert t["data"]["image"] != before[t["id"]] and t["data"]["case_id"]  # other task data kept
        assert bridge.ledger.task(task_id=t["id"]).image_url == t["data"]["image"]  # type: ignore[union-attr]
    assert bridge.sync_once(push=False).images_refreshed == 0


def test_the_bridge_asks_the_hub_to_balance_its_selection_over_a_tag(hub: LabelingHub, studio: FakeStudio,
                                                                     clock: Clock) -> None:
    """``flywheel label sync --balance condition``: each selection asks the hub to split its budget evenly over the
    cases' conditions (the hub's side: tests/hub/test_selection.py); a bad tag is refused before any request."""
    hub.add_cases(8)
    bridge = make_bridge(hub, studio, clock, balance="condition")
    assert bridge.sync_once().pushed == 6
    [exchange] = hub.tap.find("POST", "/v1/selections", status=200)
    assert exchange.request_json()["balance"] == "condition"
    with pytest.raises(InvalidInput, match=r"balance must be a tag name of 1-64 letters, digits.*received ''"):
        BridgeConfig(balance="")


def test_the_bridge_seeds_the_hub_s_selection_when_asked(hub: LabelingHub, studio: FakeStudio, clock: Clock) -> None:
    """``flywheel label sync --seed 7``: each selection carries the seed (the same pool, the same picks:
    tests/hub/test_selection.py); unseeded by default; a bad seed is refused before any request."""
    hub.add_cases(8)
    make_bridge(hub, studio, clock, selection_seed=7).sync_once()
    [exchange] = hub.tap.find("POST", "/v1/selections", status=200)
    assert exchange.request_json()["seed"] == 7
    assert BridgeConfig().selection_seed is None
    for bad in (-1, 2**63, "7"):
        with pytest.raises(InvalidInput, match=r"selection_seed must be"):
            BridgeConfig(selection_seed=bad)  # type: ignore[arg-type]
