"""The labeling queue across model versions, with no stand-ins: the real hub, a real Label Studio, and a
simulated annotator working the queue between model updates.

Label Studio serves its uncertainty queue from the predictions of the project's ``model_version`` only, and
refuses a ``model_version`` that no prediction carries yet; a bridge that gets either wrong stops feeding
annotators after the first retrain (or feeds them in no order), so every test here crosses model versions.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from labeling.bots import BotSpec, BotTeam
from labeling.bridge import Bridge
from labeling.config import QUEUE_VERSION, BridgeConfig
from labeling.hub_client import HubClient
from labeling.ledger import Ledger
from labeling.studio import Studio
from labeling.throttle import Throttle
from tests.labeling.realhub import LabelingHub
from tests.support.faults import FaultTransport

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    bridge: Bridge
    studio: Studio
    hub: HubClient
    faults: FaultTransport
    make_team: Callable[[], BotTeam]


@pytest.fixture
def stack(ls_env: tuple[str, str], ls_project_title: str, real_hub: LabelingHub, tmp_path: Path) -> Iterator[Stack]:
    faults = FaultTransport()
    studio = Studio(*ls_env, http=httpx.Client(transport=faults, timeout=30))
    hub = real_hub.bridge_client()
    config = BridgeConfig(project_title=ls_project_title, overlap=1, overlap_share=0.0, strategy="uncertainty",
                          throttle=Throttle(min_depth=8, max_depth=8, max_batch=8), reconcile_every_s=0.0,
                          webhook_url=f"{real_hub.public_url}/v1/labeling/webhook",
                          webhook_secret=real_hub.webhook_secret)
    bridge = Bridge(studio, hub, Ledger(tmp_path / "ledger.sqlite"), config)
    teams: list[BotTeam] = []

    def make_team() -> BotTeam:
        teams.append(BotTeam(ls_env[0], studio, bridge.project_id, [BotSpec("ann", 1.0, 0.0)], real_hub.truth.get,
                             real_hub.class_names))
        return teams[-1]

    yield Stack(bridge, studio, hub, faults, make_team)
    for team in teams:
        team.close()
    studio.close()
    hub.close()


def _check_queue_order(studio: Studio, project_id: int, solved_before: list[str | None],
                       served: list[str | None]) -> None:
    """Label Studio's uncertainty sampling for one annotator (projects/functions/next_task.py): the task of
    the cluster this annotator has solved least, and within it the lowest score (the most uncertain).
    ``served`` must follow that rule."""
    tasks = {t.case_id: t for t in studio.iter_tasks(project_id)}

    def cluster(cid: str | None) -> int | None:  # Label Studio counts a solved task's highest cluster
        return max((p.cluster for p in tasks[cid].predictions if p.cluster is not None), default=None)

    def score(cid: str | None) -> float:
        return next(float(p.score or 0.0) for p in tasks[cid].predictions if p.model_version == QUEUE_VERSION)

    solved = Counter(cluster(c) for c in solved_before)
    remaining = set(served)
    for cid in served:
        key = {c: (solved[cluster(c)], score(c)) for c in remaining}
        best = min(key.values())
        assert key[cid] == best, f"served {cid} {key[cid]} before a task with (solved in cluster, score) {best}"
        remaining.discard(cid)
        solved[cluster(cid)] += 1


def _sync_until_labeled(bridge: Bridge, real_hub: LabelingHub, n: int, timeout_s: float = 30.0, *,
                        reconcile: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while len(real_hub.live_labels()) < n and time.monotonic() < deadline:
        report = bridge.sync_once(push=False, reconcile=reconcile)
        assert not report.errors, report.errors
        time.sleep(0.2)


def test_every_model_version_reaches_the_queue_in_uncertainty_order(stack: Stack, real_hub: LabelingHub) -> None:
    bridge, studio, make_team = stack.bridge, stack.studio, stack.make_team
    labeled = 0
    team = None
    for turn, version in enumerate(["m1", "m2", "m3"]):
        if turn:
            real_hub.next_model(version)  # the retrained model is now the fleet's
        ids = real_hub.add_cases(8, seed=turn)
        report = bridge.sync_once()
        assert not report.errors, f"{version}: {report.errors}"
        assert report.pushed == 8, f"{version}: pushed {report.pushed} of 8"
        tasks = {t.case_id: t for t in studio.iter_tasks(bridge.project_id)}
        assert set(ids) <= set(tasks), f"{version}: cases without a task: {sorted(set(ids) - set(tasks))}"
        assert {tasks[c].data["model_version"] for c in ids} == {version}
        assert {p.model_version for c in ids for p in tasks[c].predictions} == {QUEUE_VERSION}
        assert studio.get_project(bridge.project_id).model_version == QUEUE_VERSION

        team = team or make_team()
        bot = team.bots[0]
        start = len(bot.stats.served)
        team.run_until_idle()
        served = bot.stats.served[start:]
        assert sorted(served) == sorted(ids), f"{version}: the queue served {served}, expected {ids}"
        _check_queue_order(studio, bridge.project_id, bot.stats.served[:start], served)

        labeled += 8
        _sync_until_labeled(bridge, real_hub, labeled, reconcile=False)  # the webhook works for every version
        labels = real_hub.live_labels()
        assert len(labels) == labeled, f"{version}: {len(labels)} labels at the hub, expected {labeled}"
        assert len({lb["case_id"] for lb in labels}) == labeled  # exactly once per case
        for lb in labels:
            assert lb["label"] == real_hub.truth[lb["case_id"]]
    for _ in range(2):  # nothing is posted twice on later turns
        again = bridge.sync_once(push=False, reconcile=True)
        assert again.labels_posted == 0 and not again.errors
    assert len(real_hub.live_labels()) == 24


def _two_labeled_then_m2(stack: Stack, real_hub: LabelingHub, bridge: Bridge, seed: int) -> tuple[list[str], BotTeam]:
    """Six m1 cases pushed, two of them labeled: four tasks are still open when m2 becomes the fleet's model."""
    old = real_hub.add_cases(6, seed=seed)
    assert bridge.sync_once().pushed == 6
    team = stack.make_team()
    for _ in range(2):
        assert team.bots[0].step()
    real_hub.next_model("m2")
    return old, team


def _one_queue_for_both(stack: Stack, real_hub: LabelingHub, bridge: Bridge, old: list[str], team: BotTeam,
                        seed: int) -> None:
    """Six m2 cases pushed beside the open m1 tasks: one queue serves every open task in uncertainty order,
    and each case is labeled at the hub exactly once."""
    new = real_hub.add_cases(6, seed=seed)
    report = bridge.sync_once()
    assert not report.errors and report.pushed == 6, report
    assert stack.studio.get_project(bridge.project_id).model_version == QUEUE_VERSION
    bot = team.bots[0]
    start = len(bot.stats.served)
    team.run_until_idle()
    served = bot.stats.served[start:]
    open_old = [c for c in old if c not in bot.stats.served[:start]]
    assert sorted(served) == sorted(open_old + new), "every open task, old or new, is served"
    _check_queue_order(stack.studio, bridge.project_id, bot.stats.served[:start], served)
    _sync_until_labeled(bridge, real_hub, 12)
    assert sorted(lb["case_id"] for lb in real_hub.live_labels()) == sorted(old + new)


def test_open_tasks_stay_in_the_queue_when_the_model_changes(stack: Stack, real_hub: LabelingHub) -> None:
    bridge = stack.bridge
    old, team = _two_labeled_then_m2(stack, real_hub, bridge, seed=10)
    bridge.config = replace(bridge.config, throttle=Throttle(min_depth=10, max_depth=10))  # 4 open + 6 new
    _one_queue_for_both(stack, real_hub, bridge, old, team, seed=11)


def test_a_project_from_before_the_queue_version_is_carried_over(stack: Stack, real_hub: LabelingHub) -> None:
    """A project whose queue points at a model's own version (as bridges before the queue version left it):
    its open tasks keep their place, new model versions reach it, and it ends on the queue version."""
    bridge = stack.bridge
    bridge.config = replace(bridge.config, queue_version="m1")  # what the old bridge did for model m1
    old, team = _two_labeled_then_m2(stack, real_hub, bridge, seed=20)
    assert stack.studio.get_project(bridge.project_id).model_version == "m1"
    config = replace(bridge.config, queue_version=QUEUE_VERSION, throttle=Throttle(min_depth=10, max_depth=10))
    upgraded = Bridge(stack.studio, bridge.hub, bridge.ledger, config)
    _one_queue_for_both(stack, real_hub, upgraded, old, team, seed=21)


def test_a_refused_project_update_does_not_stop_the_push(stack: Stack, real_hub: LabelingHub) -> None:
    bridge, studio = stack.bridge, stack.studio
    real_hub.add_cases(4, seed=30)
    assert bridge.sync_once().pushed == 4  # the project exists now
    real_hub.next_model("m2")
    ids = real_hub.add_cases(6, seed=31)
    # a new bridge process whose settings differ (overlap 2): Label Studio refuses the project update
    again = Bridge(studio, bridge.hub, bridge.ledger, replace(bridge.config, overlap=2, overlap_share=1.0,
                                                              throttle=Throttle(min_depth=20, max_depth=20)))
    stack.faults.add("PATCH", r"^/api/projects/\d+/?$", "400")
    report = again.sync_once()
    assert any("refused to update project" in e for e in report.errors), report.errors
    tasks = {t.case_id for t in studio.iter_tasks(again.project_id)}
    assert set(ids) <= tasks, "the refused update must not block the import"
    assert studio.get_project(again.project_id).maximum_annotations == 1  # the project as it was


def test_a_refused_import_gives_the_cases_back_to_the_pool(stack: Stack, real_hub: LabelingHub) -> None:
    bridge, studio = stack.bridge, stack.studio
    ids = real_hub.add_cases(5, seed=40)
    bridge.project(real_hub.class_names)
    stack.faults.add("POST", r"^/api/projects/\d+/import$", "400")
    report = bridge.sync_once()
    assert report.pushed == 0
    assert any("refused 5 task(s) (5 returned to the hub's pool)" in e for e in report.errors), report.errors
    assert not bridge.ledger.tasks("importing")
    assert {real_hub.state(c) for c in ids} == {"unlabeled"}
    report = bridge.sync_once()  # Label Studio takes them now
    assert report.pushed == 5 and not report.errors, report
    assert {t.case_id for t in studio.iter_tasks(bridge.project_id)} == set(ids)


def test_an_annotator_sees_the_new_models_guess_after_a_model_update(stack: Stack, real_hub: LabelingHub,
                                                                     ls_env: tuple[str, str], tmp_path: Path) -> None:
    """In Label Studio's own UI: a task pushed after the retrain shows the new model's guess pre-selected, and
    a task still open from the old model keeps showing the old model's guess."""
    from tests.labeling.test_annotator_view import open_task

    bridge, studio = stack.bridge, stack.studio
    old = real_hub.add_cases(3, seed=50)
    bridge.sync_once()
    real_hub.next_model("m2")
    new = real_hub.add_cases(3, seed=51)
    assert bridge.sync_once().pushed == 3
    names = real_hub.class_names
    for cid, shot in ((new[0], "annotator_view_m2.png"), (old[0], "annotator_view_m1_still_open.png")):
        row = bridge.ledger.task(case_id=cid)
        assert row is not None and row.task_id is not None
        radios = open_task(ls_env[0], studio, bridge.project_id, row.task_id, names, tmp_path / shot)
        guess = names[int(real_hub.predicted(cid))]
        assert [n for n, on, _ in radios if on and n in names] == [guess], (cid, radios)
