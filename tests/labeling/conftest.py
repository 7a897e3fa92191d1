"""Fixtures for the labeling bridge: the real hub in-process (tests/labeling/realhub.py) and an in-memory Label
Studio for unit tests; a real Label Studio (from scripts/test.sh) for the integration tests, with the real hub
also served on loopback."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.retry import RetryPolicy
from labeling.bridge import Bridge
from labeling.config import BridgeConfig
from labeling.ledger import Ledger
from labeling.throttle import Throttle
from tests.labeling.fakestudio import FakeStudio
from tests.labeling.livestack import Live, build
from tests.labeling.realhub import LabelingHub, labeling_hub
from tests.support.services import missing_service

FAST_RETRY = RetryPolicy(attempts=4, base_s=0.0, cap_s=0.0, deadline_s=10.0)


class Clock:
    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LabelingHub]:
    """The real hub with model m1 (cat, dog, bird) active and 40 cases from ``dev-1``."""
    with labeling_hub(tmp_path, 40) as h:
        yield h


@pytest.fixture
def studio() -> FakeStudio:
    return FakeStudio()


def make_bridge(hub: LabelingHub, studio: object, clock: Clock, **overrides: object) -> Bridge:
    client = hub.bridge_client(retry=FAST_RETRY, sleep=lambda _: None)
    defaults: dict[str, object] = {
        "project_title": "unit", "overlap": 1, "overlap_share": 0.0,
        "throttle": Throttle(min_depth=6, max_depth=50, horizon_s=60, window_s=60), "in_doubt_grace_s": 0.0,
        "reconcile_every_s": 0.0,
    }
    defaults.update(overrides)
    return Bridge(studio, client, Ledger(":memory:", clock=clock), BridgeConfig(**defaults),  # type: ignore[arg-type]
                  clock=clock)


@pytest.fixture
def bridge(hub: LabelingHub, studio: FakeStudio, clock: Clock) -> Bridge:
    return make_bridge(hub, studio, clock)


# ---------------------------------------------------------------------------------------------
# integration: the real Label Studio started by scripts/test.sh
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ls_env() -> tuple[str, str]:
    url, token = os.environ.get("FLYWHEEL_TEST_LS_URL"), os.environ.get("FLYWHEEL_TEST_LS_TOKEN")
    if not url or not token:
        missing_service("FLYWHEEL_TEST_LS_URL / FLYWHEEL_TEST_LS_TOKEN not set (scripts/test.sh starts Label Studio)")
    return url, token


@pytest.fixture
def ls_project_title(ls_env: tuple[str, str]) -> Iterator[str]:
    """A fresh project title; the project is deleted after the test."""
    from labeling.studio import Studio

    title = f"test-{uuid.uuid4().hex[:10]}"
    yield title
    with Studio(*ls_env) as s:
        p = s.find_project(title)
        if p is not None:
            s.delete_project(p.id)


@pytest.fixture
def live(ls_env: tuple[str, str], ls_project_title: str, tmp_path: Path) -> Iterator[Live]:
    """The live stack (tests/labeling/livestack.py) on a fresh project, with 60 cases in the real hub."""
    with labeling_hub(tmp_path, 60, serve=True) as hub:
        lv = build(ls_env, ls_project_title, tmp_path, hub)
        yield lv
        lv.studio.close()


@pytest.fixture
def real_hub(tmp_path: Path) -> Iterator[LabelingHub]:
    """The real hub with model m1 active and no case yet, also on loopback (Label Studio reaches it there)."""
    with labeling_hub(tmp_path, serve=True) as hub:
        yield hub
