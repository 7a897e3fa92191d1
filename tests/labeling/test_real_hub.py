"""The whole labeling path with no stand-ins: the real hub (fleet.hub on loopback), a real Label Studio,
simulated annotators working its queue, webhooks into the hub's inbox, labels back exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from labeling.bots import BotSpec, BotTeam
from labeling.bridge import Bridge
from labeling.config import BridgeConfig
from labeling.hub_client import HubClient
from labeling.ledger import Ledger
from labeling.studio import Studio
from labeling.throttle import Throttle
from tests.labeling.realhub import LabelingHub

pytestmark = pytest.mark.integration


def test_labels_reach_the_real_hub_exactly_once(ls_env: tuple[str, str], ls_project_title: str,
                                                real_hub: LabelingHub, tmp_path: Path) -> None:
    real_hub.add_cases(12)
    studio = Studio(*ls_env)
    hub = HubClient(real_hub.public_url, real_hub.labeler_token)  # over loopback HTTP, like a deployed bridge
    config = BridgeConfig(project_title=ls_project_title, overlap=1, overlap_share=0.0,
                          throttle=Throttle(min_depth=6, max_depth=6),
                          webhook_url=f"{real_hub.public_url}/v1/labeling/webhook",
                          webhook_secret=real_hub.webhook_secret)
    bridge = Bridge(studio, hub, Ledger(tmp_path / "ledger.sqlite"), config)
    report = bridge.sync_once()
    assert report.pushed == 6 and not report.errors, report.errors
    tasks = list(studio.iter_tasks(bridge.project_id))
    assert studio.get_project(bridge.project_id).class_names == real_hub.class_names
    for t in tasks:  # the image an annotator's browser loads, straight from the hub with its signature
        r = httpx.get(t.data["image"], timeout=10)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    queued = {c.case_id for c in hub.iter_pool("queued")}
    assert queued == {t.case_id for t in tasks}

    team = BotTeam(ls_env[0], studio, bridge.project_id, [BotSpec("ann", 1.0, 0.0)], real_hub.truth.get,
                   real_hub.class_names)
    for _ in range(4):
        assert team.bots[0].step()
    time.sleep(1.0)
    report = bridge.sync_once(reconcile=False, push=False)  # webhooks only
    assert report.webhook_events >= 4 and report.labels_posted == 4, report
    for _ in range(2):
        again = bridge.sync_once(reconcile=True, push=False)
        assert again.labels_posted == 0 and not again.errors
    labels = real_hub.live_labels()
    assert len(labels) == 4 and len({lb["annotation_id"] for lb in labels}) == 4
    for lb in labels:
        assert lb["label"] == real_hub.truth[lb["case_id"]]
        assert real_hub.state(lb["case_id"]) == "labeled"

    # one task deleted in Label Studio: its label goes, its case returns to the pool
    gone = labels[0]
    studio.delete_task(gone["task_id"])
    time.sleep(0.5)
    report = bridge.sync_once(reconcile=True, push=False)
    assert report.labels_deleted == 1 and report.released == 1, report
    assert real_hub.state(gone["case_id"]) == "unlabeled"
    assert len(real_hub.live_labels()) == 3
    team.close()
    studio.close()
    hub.close()
