"""An annotator's view is part of the product: a pushed task opened in Label Studio's own UI, in headless
Chromium (Debian's, driven by playwright through ``executable_path``; no browser is ever downloaded)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from labeling.bridge import Bridge
from labeling.config import BridgeConfig
from labeling.hub_client import HubClient
from labeling.ledger import Ledger
from labeling.login import user_token
from labeling.studio import Studio
from labeling.throttle import Throttle
from tests.labeling.livestack import CLASSES, Live
from tests.labeling.realhub import serve_real_hub
from tests.support.services import missing_service

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
NOTES = Path(__file__).resolve().parents[2] / ".notes"


@contextmanager
def annotator_page(ls_url: str, studio: Studio) -> Iterator[Any]:
    """A headless Chromium page logged in to Label Studio as a fresh annotator."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        missing_service("Debian's chromium is not installed (scripts/test.sh installs it)")
    email, password = f"viewer-{uuid.uuid4().hex[:6]}@bots.flywheel.local", "viewer-password-1"
    user_token(ls_url, email, password, invite_token=studio.invite_token())
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{ls_url}/user/login/")
            page.fill("input[name=email]", email)
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
            yield page
        finally:
            browser.close()


def wait_for_labeling_image(page: Any) -> None:
    """Wait until the labeling pane's image has really loaded (Label Studio fetches the signed URL
    cross-origin and shows it from a blob), at labeling size, not as a grid thumbnail."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 0 "
        "&& i.width >= 300)", timeout=60_000)


def open_task(ls_url: str, studio: Studio, project_id: int, task_id: int, class_names: list[str],
              shot: Path) -> list[Any]:
    """Log in as an annotator, open the task's labeling page, wait until the image and the choices have
    rendered, save a screenshot; returns ``[name, checked, shown]`` for each choice."""
    with annotator_page(ls_url, studio) as page:
        page.goto(f"{ls_url}/projects/{project_id}/data?task={task_id}")
        try:
            for name in class_names:  # Label Studio names each choice's radio after its value
                page.locator(f"input[type=radio][name={name!r}]").first.wait_for(state="attached", timeout=60_000)
            wait_for_labeling_image(page)
        except Exception:
            page.screenshot(path=str(shot.with_name("failed-" + shot.name)))
            raise
        page.wait_for_timeout(500)
        page.screenshot(path=str(shot))
        radios: list[Any] = page.eval_on_selector_all(
            "label input[type=radio][name]",
            "els => els.map(e => [e.name, e.checked, e.closest('label').getBoundingClientRect().height > 0])")
    assert shot.stat().st_size > 10_000
    return radios


def test_an_annotator_sees_the_image_the_choices_and_the_models_guess(live: Live, tmp_path: Path) -> None:
    live.bridge.sync_once()
    first = min(live.bridge.ledger.tasks("open"), key=lambda t: t.score or 0.0)
    case = live.hub.cases[first.case_id]
    shot = tmp_path / "annotator_view.png"
    radios = open_task(live.url, live.studio, live.bridge.project_id, int(first.task_id or 0), CLASSES, shot)
    assert ("GET", f"/v1/cases/{case.case_id}/image", 200) in live.hub.history  # straight from the hub
    assert {name for name, _, shown in radios if shown} >= set(CLASSES), radios
    checked = [name for name, on, _ in radios if on and name in CLASSES]
    assert checked == [CLASSES[case.predicted_class]], radios  # the model's guess, pre-selected
    if NOTES.is_dir():
        shutil.copy(shot, NOTES / "annotator_view.png")


def test_the_real_hubs_images_render_for_annotators(ls_env: tuple[str, str], ls_project_title: str,
                                                    tmp_path: Path) -> None:
    """Label Studio loads task images cross-origin: the hub's image link must allow any origin."""
    pytest.importorskip("fastapi")
    with serve_real_hub(tmp_path) as real:
        real.add_cases(4)
        studio = Studio(*ls_env)
        bridge = Bridge(studio, HubClient(real.url, real.labeler_token), Ledger(":memory:"),
                        BridgeConfig(project_title=ls_project_title, overlap=1, overlap_share=0.0,
                                     throttle=Throttle(min_depth=2, max_depth=2)))
        bridge.sync_once()
        task = bridge.ledger.tasks("open")[0]
        r = httpx.get(task.image_url or "", headers={"Origin": ls_env[0]}, timeout=10)
        assert r.status_code == 200
        if r.headers.get("access-control-allow-origin") not in ("*", ls_env[0]):
            pytest.xfail("the hub's GET /v1/cases/{id}/image sends no Access-Control-Allow-Origin header, so "
                         "Label Studio's UI cannot show the image (fix in fleet/hub/routes/cases.py)")
        shot = tmp_path / "annotator_view_real_hub.png"
        radios = open_task(ls_env[0], studio, bridge.project_id, int(task.task_id or 0), real.class_names, shot)
        assert {name for name, _, shown in radios if shown} >= set(real.class_names), radios
        studio.close()
