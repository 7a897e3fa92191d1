"""`flywheel demo --serve`: after a demo has stopped, its hub and Label Studio come back from the workspace, with the
same logins, so an operator can browse the dashboard and the annotations; Ctrl-C stops them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.services import missing_service
from tests.system.test_demo_annotate import Lines

DEMO = [sys.executable, "-m", "fleet.cli", "demo"]


def _refused(*args: str) -> tuple[int, str]:
    run = subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=120)
    return run.returncode, " ".join((run.stdout + run.stderr).replace("│", " ").split())


def short_demo(ws: Path) -> None:
    """A one-turn oracle demo small enough for a test, run to its end in ``ws``."""
    run = subprocess.run([*DEMO, "--workspace", str(ws), "--turns", "1", "--devices", "1", "--frames-per-device",
                          "60", "--budget", "10", "--labeler", "oracle", "--base-epochs", "1", "--epochs", "1",
                          "--seed-size", "60", "--test-size", "30", "--width", "8"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_serve_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    code, out = _refused("--serve")
    assert code == 2 and "--serve needs --workspace" in out, out
    code, out = _refused("--serve", "--workspace", str(tmp_path), "--turns", "3", "--labeler", "oracle")
    assert code == 2 and "takes only --workspace; received --turns, --labeler" in out, out
    code, out = _refused("--serve", "--workspace", str(tmp_path / "nowhere"))
    assert code == 1 and f"workspace {tmp_path / 'nowhere'} does not exist" in out and "Traceback" not in out, out
    code, out = _refused("--serve", "--workspace", str(tmp_path))
    assert code == 1 and "holds no demo-state.json; expected the --workspace of a flywheel demo" in out, out
    assert not (tmp_path / "nowhere").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_demo_serves_its_dashboard_and_label_studio_again(tmp_path: Path) -> None:
    """A short demo, then --serve: the hub answers with the run's admin token and holds the run's models, the
    dashboard shows them in a browser, Label Studio starts again on the demo's data with the login the demo saved,
    a second --serve is refused while this one runs, and Ctrl-C stops both servers (exit 0)."""
    from fleet.sim.studio import find_studio_bin
    from tests.support.browser import chromium_page

    binary = find_studio_bin()
    if binary is None:
        missing_service("no label-studio executable (scripts/test.sh installs one into .venv-studio)")
    ws = tmp_path / "ws"
    short_demo(ws)
    state_path = ws / "demo-state.json"
    state = json.loads(state_path.read_text())
    versions = {state["base_version"], state["arms"]["flywheel"]["version"]}
    # the demo labeled with the oracle; give its state the Label Studio login a demo with its own server saves, so
    # that --serve starts one on the workspace's data as it would after a Label Studio demo
    login = {"port": None, "token": "f" * 40, "password": "fw-serve-test"}
    state["studio"] = {"project": "Flywheel demo (served)", "server": login}
    state_path.write_text(json.dumps(state))

    env = {**os.environ, "FLYWHEEL_STUDIO_BIN": str(binary)}
    proc = subprocess.Popen([*DEMO, "--serve", "--workspace", str(ws)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = Lines(proc)
        url = re.search(r"dashboard: (\S+)/ui", lines.wait_for("dashboard: ", 120)).group(1)  # type: ignore[union-attr]
        token = lines.wait_for("admin token: ", 30).split(": ", 1)[1].strip()
        studio = lines.wait_for("Label Studio: http", 300)
        ls_url = re.search(r"Label Studio: (\S+) ", studio).group(1)  # type: ignore[union-attr]
        assert "log in as admin@flywheel.demo, password fw-serve-test" in studio, studio
        lines.wait_for("serving until Ctrl-C", 30)
        assert url == f"http://127.0.0.1:{state['hub']['port']}" and token == state["hub"]["keys"]["admin"]
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert models.status_code == 200 and versions <= {m["version"] for m in models.json()["models"]}, models.text
        me = httpx.get(f"{ls_url}/api/current-user/whoami", headers={"Authorization": f"Token {login['token']}"},
                       timeout=30)
        assert me.status_code == 200 and me.json()["email"] == "admin@flywheel.demo", me.text
        with chromium_page(width=1280, height=900) as page:  # the operator's view of the run
            page.goto(f"{url}/ui/login")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/ui/fleet")
            page.goto(f"{url}/ui/models")
            table = page.locator("#models").inner_text()
            page.screenshot(path=str(tmp_path / "served-models.png"), full_page=True)
        assert all(v in table for v in versions), table
        code, out = _refused("--serve", "--workspace", str(ws))  # its servers are up: a second is refused
        assert code == 1 and f"the demo in {ws} is still running" in out, out
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        lines.wait_for("stopped", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    for gone in (url, ls_url):
        with pytest.raises(httpx.ConnectError):
            httpx.get(gone, timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_stops_what_a_killed_serve_left_running(tmp_path: Path) -> None:
    """--serve killed hard (its hub lives on, orphaned): a second --serve is refused and says how to stop it;
    --resume of the finished demo stops it, resumes nothing, and --serve works again."""
    ws = tmp_path / "ws"
    short_demo(ws)
    url = f"http://127.0.0.1:{json.loads((ws / 'demo-state.json').read_text())['hub']['port']}"

    def serve() -> tuple[subprocess.Popen[str], Lines]:
        proc = subprocess.Popen([*DEMO, "--serve", "--workspace", str(ws)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines = Lines(proc)
        lines.wait_for("serving until Ctrl-C", 120)
        return proc, lines

    proc, _ = serve()
    again: subprocess.Popen[str] | None = None
    try:
        proc.kill()  # the --serve process alone, not its hub (another process group)
        proc.wait(timeout=30)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200  # the hub, orphaned
        code, out = _refused("--serve", "--workspace", str(ws))
        assert code == 1 and f"the demo in {ws} is still running (flywheel hub serve)" in out, out
        assert f"`flywheel demo --resume --workspace {ws}` stops them" in out, out
        resumed = subprocess.run([*DEMO, "--resume", "--workspace", str(ws)], capture_output=True, text=True,
                                 timeout=120)
        said = " ".join((resumed.stdout + resumed.stderr).split())
        assert resumed.returncode == 0 and "finished all 1 turn(s); nothing to resume" in said, said
        assert "stopping flywheel hub serve" in said, said
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
        again, lines = serve()  # the workspace serves again
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=60) == 0
        lines.wait_for("stopped", 10)
    finally:
        for p in (proc, again):
            if p is not None and p.poll() is None:
                p.kill()
        subprocess.run([*DEMO, "--resume", "--workspace", str(ws)], capture_output=True, timeout=120)
