"""Labeling with no stand-ins, under faults: the hub as its own process, a Label Studio of this test's own
(killed and restarted mid-sync on its data dir), simulated annotators, webhooks lost while the hub is
down and webhooks delivered twice: every annotation becomes exactly one label at the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.labeling.lsserver import StudioServer, studio_bin, sync_cut_off_by_a_kill
from tests.labeling.realhub import RealHub
from tests.support.models import make_model_files
from tests.support.services import missing_service

from .support import bearer, kill9, publish, record, respawn, restartable_hub, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

CLASSES = ["cat", "dog", "bird"]


def test_annotations_reach_the_hub_exactly_once_through_restarts_and_bad_webhooks(tmp_path: Path) -> None:
    if not os.environ.get("FLYWHEEL_TEST_LS_URL"):
        missing_service("FLYWHEEL_TEST_LS_URL is not set (scripts/test.sh starts Label Studio)")
    binary = studio_bin()
    if binary is None:
        missing_service("no label-studio executable (scripts/test.sh installs .venv-studio)")
    from fleet.retry import RetryPolicy
    from labeling.bots import BotSpec, BotTeam
    from labeling.bridge import Bridge
    from labeling.config import BridgeConfig
    from labeling.hub_client import HubClient
    from labeling.ledger import Ledger
    from labeling.studio import Studio
    from labeling.throttle import Throttle

    server = StudioServer(binary, tmp_path / "ls")
    server.start()
    try:
        with restartable_hub(tmp_path / "hub") as proc_hub, httpx.Client(base_url=proc_hub.url, timeout=30) as c:
            trainer, labeler = proc_hub.token("trainer"), proc_hub.token("labeler")
            model = make_model_files(tmp_path / "m", "lab-v1", private_key=proc_hub.private_key(), num_classes=3)
            model.manifest.class_names[:] = CLASSES  # not signed yet: the names annotators see
            from fleet.signing import sign_manifest

            model.signed = sign_manifest(model.manifest, proc_hub.private_key())
            publish(proc_hub, model, trainer, promote=True)
            token = c.post("/v1/enroll", json={"device_id": "dev-1", "fleet_secret": proc_hub.fleet_secret}
                           ).json()["token"]
            hub = RealHub(url=proc_hub.url, client=c, admin=proc_hub.admin_headers, labeler_token=labeler,
                          webhook_secret=proc_hub.webhook_secret, class_names=CLASSES, model_version="lab-v1",
                          device=bearer(token))
            hub.add_cases(60, seed=3)

            studio = Studio(server.url, server.token, http=httpx.Client(timeout=10),
                            retry=RetryPolicy(attempts=3, base_s=0.2, cap_s=0.5, deadline_s=5))
            config = BridgeConfig(project_title="system", overlap=1, overlap_share=0.0, batch_size=10,
                                  throttle=Throttle(min_depth=40, max_depth=40), in_doubt_grace_s=0.5,
                                  webhook_url=f"{proc_hub.url}/v1/labeling/webhook",
                                  webhook_secret=proc_hub.webhook_secret)
            bridge = Bridge(studio, HubClient(proc_hub.url, labeler), Ledger(tmp_path / "ledger.sqlite"), config)
            bridge.project(CLASSES)

            def queued() -> list[str]:
                return [x["case"]["case_id"] for x in c.get("/v1/pool", params={"state": "queued", "limit": 1000},
                                                    headers=bearer(labeler)).json()["cases"]]

            # 1. Label Studio killed while a 40-task push is under way (in batches of 10), then restarted
            sync_cut_off_by_a_kill(server, bridge.sync_once, lambda: bool(queued()))
            server.start()
            for _ in range(3):
                report = bridge.sync_once(reconcile=True)
            assert not report.errors, report.errors
            tasks = list(studio.iter_tasks(bridge.project_id))
            case_ids = [t.case_id for t in tasks]
            assert len(case_ids) == len(set(case_ids)), "a task was duplicated"
            assert set(case_ids) == set(queued()), "a selected case has no task, or a task no selected case"

            team = BotTeam(server.url, studio, bridge.project_id, [BotSpec("ann", 1.0, 0.0)], hub.truth.get,
                           CLASSES)
            bot = team.bots[0]
            try:
                # 2. webhooks delivered: 6 annotations while all is well
                for _ in range(6):
                    assert bot.step()
                wait_for("6 webhooks in the hub's inbox", lambda: len(c.get(
                    "/v1/labeling/events", params={"after": 0, "limit": 1000}, headers=bearer(labeler)
                ).json()["events"]) >= 6, timeout=30)
                # 3. webhooks lost: the hub is down (kill -9) while 4 more annotations are made
                kill9(proc_hub)
                for _ in range(4):
                    assert bot.step()
                respawn(proc_hub)
                # 4. webhooks delivered twice: every stored body again, byte for byte and re-serialised
                events = c.get("/v1/labeling/events", params={"after": 0, "limit": 1000},
                               headers=bearer(labeler)).json()["events"]
                import json

                for ev in events:
                    body = json.dumps(ev["body"])
                    for raw in (body, body + " "):
                        r = c.post("/v1/labeling/webhook", content=raw,
                                   headers={"X-Flywheel-Webhook-Secret": proc_hub.webhook_secret,
                                            "Content-Type": "application/json"})
                        assert r.status_code == 204, r.text
                # 5. Label Studio killed again after more annotations, before the bridge pulls them
                for _ in range(5):
                    assert bot.step()
                server.stop(kill=True)
                assert bridge.sync_once(reconcile=True, push=False).errors
                server.start()
                for _ in range(3):
                    report = bridge.sync_once(reconcile=True, push=False)
                assert not report.errors, report.errors
            finally:
                team.close()
            annotations = {a.id: a for t in studio.iter_tasks(bridge.project_id) for a in t.annotations}
            assert len(annotations) == 15
            labels = c.get("/v1/labels", params={"limit": 10000}, headers=bearer(labeler)).json()["labels"]
            assert sorted(lb["annotation_id"] for lb in labels) == sorted(annotations), "an annotation missing or twice"
            for lb in labels:
                assert lb["label"]["label"] == hub.truth[lb["case_id"]]
            labeled = c.get("/v1/pool", params={"state": "labeled", "limit": 1000}, headers=bearer(labeler)).json()
            assert labeled["total"] == 15
            studio.close()
    finally:
        server.stop(kill=True)
    record("labeling_chaos", studio_restarts=2, hub_kills=1, webhooks_lost_while_hub_down=4,
           webhooks_redelivered=2 * len(events), annotations=15, labels_at_hub=len(labels),
           labels_duplicated=len(labels) - len({lb["annotation_id"] for lb in labels}))
