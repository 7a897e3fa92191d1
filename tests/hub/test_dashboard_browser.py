"""The dashboard in a real browser: headless Chromium (Debian's, through playwright's ``executable_path``; no
browser is ever downloaded) against a real ``flywheel hub serve`` holding a small loop's data. It logs in
through the form, opens every page, checks what each shows, and saves a screenshot of each (copied to
``/tmp/dash-<page>.png`` for a person to look at)."""

from __future__ import annotations

import io
import re
import shutil
import time
import types
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from fleet.protocol import Box, TriggerHit
from tests.hub.conftest import FakeClock, HubHarness
from tests.hub.test_dashboard import DEVICES, populate
from tests.support.cases import make_detect_case
from tests.support.detectors import draw_squares, make_detector_files
from tests.support.hub import start_hub
from tests.support.services import missing_service

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def _detect_case(hub: HubHarness, device: str) -> str:
    """A detector's case, uploaded by ``device`` through ``POST /v1/cases``: a frame with two squares and the
    boxes the model drew around them."""
    from PIL import Image

    frame = draw_squares(96, 128, [(10, 12, 50, 60, (255, 0, 0)), (70, 40, 118, 88, (0, 255, 0))])
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    png = buf.getvalue()
    boxes = [Box(10 / 128, 12 / 96, 50 / 128, 60 / 96, 0, 0.91), Box(70 / 128, 40 / 96, 118 / 128, 88 / 96, 1, 0.48)]
    case = make_detect_case(case_id="det-case-1", device_id=device, model_version="det1", boxes=boxes, image=png,
                            scores={"box_margin": 0.04}, triggers=[TriggerHit("box_ambiguity", 0.96, 0.9)], tags={})
    r = hub.post_case(case, png)
    assert r.status_code == 201, r.text
    return case.case_id


def test_the_dashboard_in_chromium(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        missing_service("Debian's chromium is not installed (scripts/test.sh installs it)")
    shots = tmp_path / "shots"
    shots.mkdir()
    with start_hub(tmp_path / "hub") as hub, httpx.Client(base_url=hub.url, timeout=30) as client:
        settings = types.SimpleNamespace(admin_token=SecretStr(hub.admin_token),
                                         fleet_secret=SecretStr(hub.fleet_secret))
        h = HubHarness(client=client, app=None, settings=settings, keypair=hub.keypair, clock=FakeClock(time.time()),
                       tmp=tmp_path)
        h.register_model("m1", promote=True)
        loop = populate(h, advance=lambda seconds: None)  # a real hub keeps its own time
        files = make_detector_files(tmp_path / "models", "det1", private_key=hub.private_key(),
                                    height=96, width=128)
        r = client.post("/v1/models", headers=h.trainer, data={"manifest": files.signed.to_json()},
                        files={"onnx": ("det1.onnx", files.onnx_path.read_bytes(), "application/octet-stream")})
        assert r.status_code == 201, r.text
        det_case = _detect_case(h, DEVICES[0])
        h.register_model("m4", seed=4)  # the south group gets a model of its own
        r = client.post("/v1/rollouts", json={"version": "m4", "stages": [1.0], "group": "south"}, headers=h.trainer)
        assert r.status_code == 201, r.text
        assert client.post(f"/v1/rollouts/{r.json()['rollout_id']}/advance", headers=h.trainer).status_code == 200
        refusal = {"device_id": "cam-north-2", "campaign_id": "night-rare", "version": 2, "refused_at": time.time(),
                   "reason": "novelty bank bank-m1: sha256 " + "0" * 64 + ", expected " + "f" * 64}
        assert client.post("/v1/campaign-refusals", json=refusal, headers=h.devices["cam-north-2"]).status_code == 204

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})

                def shot(name: str) -> None:
                    path = shots / f"dash-{name}.png"
                    page.screenshot(path=str(path), full_page=True)
                    shutil.copy(path, f"/tmp/dash-{name}.png")

                # no cookie: every page sends the browser to the login
                page.goto(f"{hub.url}/ui/models")
                assert page.url == f"{hub.url}/ui/login"
                # a wrong token: the form again, with the error, and no cookie
                page.fill("input[name=token]", "not-the-token")
                page.click("button[type=submit]")
                assert page.locator("[role=alert]").inner_text().startswith("That is not an admin token")
                assert page.context.cookies() == []
                shot("login-error")
                # the admin token: a session cookie the page's scripts cannot read
                page.fill("input[name=token]", hub.admin_token)
                page.click("button[type=submit]")
                page.wait_for_url(f"{hub.url}/ui/fleet")
                (cookie,) = page.context.cookies()
                assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
                    "flywheel_ui", True, "Strict", "/ui")
                assert hub.admin_token not in cookie["value"] and hub.admin_token not in page.url

                rows = page.locator("#devices tbody tr")
                assert rows.count() == 3
                south = rows.filter(has_text="cam-south-1").inner_text()
                assert "54.0 KiB" in south and "30.0%" in south and "s ago" in south
                assert page.locator("svg.chart rect").count() >= 1
                groups = page.locator("#groups tbody tr")
                assert groups.filter(has_text="south").inner_text().split("\t")[:5] == [
                    "south", "1", "m4", "its own", "m1"]
                north = groups.filter(has_text="north").inner_text().split("\t")[:4]
                assert north == ["north", "2", "m1", "the fleet's"]
                shot("fleet")
                # the search box: the devices whose id or group holds the text, and a way back to all of them
                page.fill("form.search input[name=q]", "SOUTH")
                page.click("form.search button")
                page.wait_for_url(f"{hub.url}/ui/fleet?q=SOUTH")
                assert rows.count() == 1 and "cam-south-1" in rows.inner_text()
                assert page.locator(".pager").inner_text().strip() == "1 device holding “SOUTH”"
                shot("fleet-search")
                page.click("form.search >> text=show all")
                page.wait_for_url(f"{hub.url}/ui/fleet")
                assert rows.count() == 3

                page.click("nav >> text=Campaigns")
                assert page.locator("#triggers").inner_text().split("\n")[1:3] == ["entropy\t9", "novelty\t4"]
                assert "night-rare v2\t6" in page.locator("#by-campaign").inner_text()
                assert "night-rare" in page.locator("#campaigns").inner_text()
                assert "night-rare\tall triggers\t6\t4\t2\t50.0%" in page.locator("#yields").inner_text()
                assert page.locator("svg.chart[aria-label='Uploads per day (UTC)'] rect").count() >= 1
                refused = page.locator("#refusals tbody tr").inner_text().split("\t")
                assert refused[:4] == ["night-rare", "2", "cam-north-2", "1"] and "novelty bank bank-m1" in refused[5]
                shot("campaigns")

                page.click("nav >> text=Queue")
                tiles = page.locator("#queue-tiles").inner_text()
                assert "5\nLABELED" in tiles.upper() and "5\nIN THE POOL" in tiles.upper()
                assert page.locator("svg.chart[aria-label^='Labels per hour'] rect").count() >= 1
                shot("queue")

                page.click("nav >> text=Models")
                models = page.locator("#models").inner_text()
                assert "m2\tretired\tm1\thub-snapshot:" in models and "m3\tcanary\tm2" in models
                # the labeled accuracy says how many labels it is over (0% of 1 label is not 0% of 40)
                assert re.search(r"\t\d+\.\d%\s+of \d+\t", models), models
                assert "canary disagreement rose 12% -> 31%" in page.locator("table.rollouts").inner_text()
                assert page.locator("svg.chart[aria-label='Accuracy per model version'] rect").count() >= 1
                shot("models")

                page.click("#models >> text=m2")
                page.wait_for_url(f"{hub.url}/ui/models/m2")
                lineage = page.locator("#lineage").inner_text()
                assert loop.snapshot in lineage and "cam-north-1 (2)" in lineage and "ann@example.com" in lineage
                assert page.locator("#entries tbody tr").count() == 5
                assert "rolled_back" in page.locator("table.rollouts").inner_text()
                shot("model")

                page.click(f"#entries >> text={loop.labeled[0]}")
                page.wait_for_url(f"{hub.url}/ui/cases/{loop.labeled[0]}")
                page.wait_for_function("() => document.querySelector('.frame img').naturalWidth > 0")
                facts = page.locator("#facts").inner_text()
                assert "Influenced\nm2, m3" in facts and "entropy\t0.800\t0.700" in facts
                shot("case")

                page.goto(f"{hub.url}/ui/cases/{det_case}")
                page.wait_for_function("() => document.querySelector('.frame img').naturalWidth === 128")
                assert page.locator(".frame svg rect").count() == 2
                assert page.locator(".box-label").all_inner_texts() == ["red 0.91", "green 0.48"]
                assert "2 boxes: red 0.91, green 0.48" in page.locator("#facts").inner_text()
                shot("case-detect")

                page.click("text=Log out")
                page.wait_for_url(f"{hub.url}/ui/login")
                assert page.context.cookies() == []
                page.goto(f"{hub.url}/ui/fleet")
                assert page.url == f"{hub.url}/ui/login"
            finally:
                browser.close()
    for png in shots.iterdir():
        assert png.stat().st_size > 5_000, png
