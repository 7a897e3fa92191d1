"""An operator watching `flywheel demo` on the hub's dashboard: while the demo turns, log in at the URL it
prints with the admin token it prints, open every page in headless Chromium (Debian's, never downloaded) and
check that it shows the demo's own fleet, campaign, queue and model lineage; screenshots are kept."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.browser import chromium_page
from tests.system.test_demo_annotate import Lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_dashboard_shows_the_demos_fleet_campaign_queue_and_lineage(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "fleet.cli", "demo", "--workspace", str(ws), "--labeler", "oracle", "--turns", "2",
           "--devices", "2", "--frames-per-device", "120", "--budget", "10", "--base-epochs", "3", "--epochs", "2",
           "--test-size", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    lines = Lines(proc)
    try:
        said = lines.wait_for("its dashboard:", 300)
        url, token = re.search(r"its dashboard: (\S+)/ui, log in with the admin token (\S+)", said).groups()  # type: ignore[union-attr]
        lines.wait_for("turn 1: flywheel", 600)  # the base model and one retrained model are in the registry
        lines.wait_for("canary of fw-1", 120)
        pages: dict[str, str] = {}
        with chromium_page() as page:
            page.goto(f"{url}/ui/fleet")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/ui/fleet")
            for name in ("fleet", "campaigns", "queue", "models", "models/fw-1-s0"):
                page.goto(f"{url}/ui/{name}")
                pages[name] = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
                shot = tmp_path / f"demo-dash-{name.replace('/', '-')}.png"
                page.screenshot(path=str(shot), full_page=True)
                if Path("/tmp").is_dir():
                    shutil.copy(shot, Path("/tmp") / shot.name)
        assert proc.wait(600) == 0, "".join(lines.seen[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert "dev-000" in pages["fleet"] and "dev-001" in pages["fleet"]
    assert "demo-edge-cases" in pages["campaigns"]
    assert "labeled" in pages["queue"].lower()
    assert "base-s0" in pages["models"] and "fw-1-s0" in pages["models"]
    lineage = pages["models/fw-1-s0"]
    assert "base-s0" in lineage and "snap-" in lineage  # its parent, and the labels it was trained on
