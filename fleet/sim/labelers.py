"""Who labels the hub's selection in the demo: Label Studio with simulated annotators, or an oracle."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from typing import Any, Protocol

import httpx

from fleet.sim.fleet import World

log = logging.getLogger(__name__)


class Labeler(Protocol):
    name: str

    @property
    def headers(self) -> dict[str, str]: ...

    def label(self, budget: int, turn: int) -> int:
        """Have the hub select up to ``budget`` cases, label them, and return how many were labeled."""
        ...

    def close(self) -> None: ...


class OracleLabeler:
    """Labels the hub's selection with the ground truth, through the hub's labels API (one 'annotator')."""

    name = "built-in oracle labeler (ground truth)"

    def __init__(self, hub_url: str, token: str, world: World, *, strategy: str) -> None:
        self.url, self.world, self.strategy = hub_url, world, strategy
        self._headers = {"Authorization": f"Bearer {token}"}
        self._next_id = 1
        self.client = httpx.Client(base_url=hub_url, headers=self._headers, timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return self._headers

    def label(self, budget: int, turn: int) -> int:
        r = self.client.post("/v1/selections", json={"budget": budget, "strategy": self.strategy})
        r.raise_for_status()
        done = 0
        for case in r.json()["cases"]:
            frame = (case.get("tags") or {}).get("frame")
            if frame not in self.world.truth:
                log.warning("case %s has no known frame (%r); released", case["case_id"], frame)
                self.client.post(f"/v1/cases/{case['case_id']}/release").raise_for_status()
                continue
            body: dict[str, Any] = {
                "case_id": case["case_id"], "label": int(self.world.truth[frame]), "annotator": "oracle",
                "source": "oracle", "task_id": self._next_id, "annotation_id": self._next_id,
                "created_at": time.time(), "status": "accepted",
            }
            self._next_id += 1
            self.client.post("/v1/labels", json=body).raise_for_status()
            done += 1
        return done

    def close(self) -> None:
        self.client.close()


def studio_available() -> str | None:
    """None when the Label Studio server can be started here, else why not."""
    if importlib.util.find_spec("label_studio_sdk") is None:
        return "the labeling extra (label-studio-sdk) is not installed"
    if shutil.which("label-studio") is None and importlib.util.find_spec("label_studio") is None:
        return "the studio extra (the Label Studio server) is not installed"
    return None
