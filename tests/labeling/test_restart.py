"""Label Studio killed in the middle of a sync and started again on its data: nothing lost, nothing twice.

This test runs a Label Studio of its own (the shared one must stay up for the other tests), so it is slow.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from fleet.retry import RetryPolicy
from labeling.bots import BotSpec, BotTeam
from labeling.bridge import Bridge
from labeling.config import BridgeConfig
from labeling.ledger import Ledger
from labeling.studio import Studio
from labeling.throttle import Throttle
from tests.labeling.lsserver import StudioServer, studio_bin, sync_cut_off_by_a_kill
from tests.labeling.realhub import CLASSES, LabelingHub, labeling_hub
from tests.support.services import missing_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(900)
def test_label_studio_restarted_mid_sync(tmp_path: Path) -> None:
    binary = studio_bin()
    if binary is None:
        missing_service("no label-studio executable (scripts/test.sh installs .venv-studio)")
    server = StudioServer(binary, tmp_path / "ls")
    server.start()
    try:
        with labeling_hub(tmp_path, serve=True) as hub:
            hub.add_cases(250, seed=5)
            studio = Studio(server.url, server.token, http=httpx.Client(timeout=10),
                            retry=RetryPolicy(attempts=3, base_s=0.2, cap_s=0.5, deadline_s=5))
            config = BridgeConfig(project_title="restart", overlap=1, overlap_share=0.0, batch_size=25,
                                  throttle=Throttle(min_depth=150, max_depth=150), in_doubt_grace_s=0.5,
                                  webhook_url=f"{hub.public_url}/v1/labeling/webhook",
                                  webhook_secret=hub.webhook_secret)
            bridge = Bridge(studio, hub.bridge_client(), Ledger(tmp_path / "ledger.sqlite"), config)
            bridge.project(CLASSES)

            # kill Label Studio while a 150-task push is under way, in batches of 25
            sync_cut_off_by_a_kill(server, bridge.sync_once, lambda: bool(queued_cases(hub)))
            queued = hub.in_state("queued")
            assert queued  # selected in the hub, some of them not (or not knowingly) in Label Studio yet

            server.start()  # same data dir, same port
            for _ in range(3):
                report = bridge.sync_once(reconcile=True)
            assert not report.errors, report.errors
            tasks = list(studio.iter_tasks(bridge.project_id))
            case_ids = [t.case_id for t in tasks]
            assert len(case_ids) == len(set(case_ids)), "a task was duplicated"
            queued = hub.in_state("queued")
            assert set(case_ids) == queued, "a selected case has no task, or a task has no selected case"
            assert all(t.predictions and t.predictions[0].cluster is not None for t in tasks)

            team = BotTeam(server.url, studio, bridge.project_id, [BotSpec("ann", 1.0, 0.0)], hub.truth.get, CLASSES)
            for _ in range(10):
                team.bots[0].step()
            server.stop(kill=True)  # down again, before the bridge pulled those labels
            assert bridge.sync_once(reconcile=True, push=False).errors
            server.start()
            team.bots[0].step()
            bridge.sync_once(reconcile=True, push=False)
            bridge.sync_once(reconcile=True, push=False)
            annotations = {a.id for t in studio.iter_tasks(bridge.project_id) for a in t.annotations}
            assert len(annotations) == 11
            assert {lb["annotation_id"] for lb in hub.live_labels()} == annotations
            assert hub.actions().count("created") == 11
            team.close()
            studio.close()
    finally:
        server.stop(kill=True)


def queued_cases(hub: LabelingHub) -> list[str]:
    return sorted(hub.in_state("queued"))
