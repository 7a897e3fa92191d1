"""An annotator's view is part of the product: a pushed task opened in Label Studio's own UI, in headless
Chromium (Debian's, driven by playwright through ``executable_path``; no browser is ever downloaded)."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from labeling.login import user_token
from labeling.studio import Studio
from tests.labeling.livestack import CLASSES, Live
from tests.support.browser import chromium_page, studio_login

pytestmark = pytest.mark.integration

NOTES = Path(__file__).resolve().parents[2] / ".notes"


@contextmanager
def annotator_page(ls_url: str, studio: Studio) -> Iterator[Any]:
    """A headless Chromium page logged in to Label Studio as a fresh annotator."""
    email, password = f"viewer-{uuid.uuid4().hex[:6]}@bots.flywheel.local", "viewer-password-1"
    user_token(ls_url, email, password, invite_token=studio.invite_token())
    with chromium_page() as page:
        studio_login(page, ls_url, email, password)
        yield page


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
        # the model's guess is applied after the page renders, late on a busy machine; if it never comes, the
        # caller's assertion says so
        from playwright.sync_api import TimeoutError as PageTimeout

        with contextlib.suppress(PageTimeout):
            page.wait_for_function("() => document.querySelector('label input[type=radio][name]:checked')",
                                   timeout=15_000)
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
    case_id = first.case_id
    # Label Studio's UI loads task images cross-origin: the hub's signed link must allow any origin
    r = httpx.get(first.image_url or "", headers={"Origin": live.url}, timeout=10)
    assert r.status_code == 200 and r.headers.get("access-control-allow-origin") in ("*", live.url)
    shot = tmp_path / "annotator_view.png"
    radios = open_task(live.url, live.studio, live.bridge.project_id, int(first.task_id or 0), CLASSES, shot)
    assert ("GET", f"/v1/cases/{case_id}/image", 200) in live.hub.history()  # straight from the hub
    assert {name for name, _, shown in radios if shown} >= set(CLASSES), radios
    checked = [name for name, on, _ in radios if on and name in CLASSES]
    assert checked == [CLASSES[live.hub.predicted(case_id)]], radios  # the model's guess, pre-selected
    if NOTES.is_dir():
        shutil.copy(shot, NOTES / "annotator_view.png")
