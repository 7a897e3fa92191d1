"""A live stack for integration tests: a real Label Studio (from scripts/test.sh), the real hub (in-process for
the bridge, and on loopback so Label Studio posts real webhooks to it and loads its signed images), a
fault-injecting transport between the bridge and Label Studio, and a bridge wired to both."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleet.retry import RetryPolicy
from labeling.bots import BotSpec, BotTeam
from labeling.bridge import Bridge
from labeling.config import BridgeConfig
from labeling.ledger import Ledger
from labeling.studio import Studio
from labeling.throttle import Throttle
from tests.labeling.realhub import CLASSES, LabelingHub
from tests.support.faults import FaultTransport

QUICK = RetryPolicy(attempts=5, base_s=0.2, cap_s=1.0, deadline_s=30.0)


@dataclass
class Live:
    url: str
    token: str
    hub: LabelingHub
    studio: Studio
    faults: FaultTransport
    bridge: Bridge
    tmp: Path

    def team(self, *specs: BotSpec) -> BotTeam:
        return BotTeam(self.url, self.studio, self.bridge.project_id, list(specs), self.hub.truth.get, CLASSES)

    def labels_by_annotation(self) -> dict[int, dict]:  # type: ignore[type-arg]
        return {lb["annotation_id"]: lb for lb in self.hub.live_labels()}

    def ls_annotations(self) -> dict[int, object]:
        return {a.id: a for t in self.studio.iter_tasks(self.bridge.project_id) for a in t.annotations}

    def wait_for_webhooks(self, n: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.hub.events()) < n and time.monotonic() < deadline:
            time.sleep(0.1)


def build(ls_env: tuple[str, str], title: str, tmp: Path, hub: LabelingHub, **config: object) -> Live:
    url, token = ls_env
    faults = FaultTransport()
    studio = Studio(url, token, http=httpx.Client(transport=faults, timeout=30), retry=QUICK)
    client = hub.bridge_client(retry=QUICK)
    settings: dict[str, object] = {
        "project_title": title, "overlap": 1, "overlap_share": 0.0, "in_doubt_grace_s": 0.5,
        "throttle": Throttle(min_depth=8, max_depth=200, horizon_s=60, window_s=60),
        "webhook_url": f"{hub.public_url}/v1/labeling/webhook", "webhook_secret": hub.webhook_secret,
    }
    settings.update(config)
    bridge = Bridge(studio, client, Ledger(tmp / "ledger.sqlite"), BridgeConfig(**settings))  # type: ignore[arg-type]
    return Live(url, token, hub, studio, faults, bridge, tmp)
