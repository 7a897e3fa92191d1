"""`flywheel demo --serve`'s parts without servers: what it says of a workspace it cannot serve, and a server that
stops on its own while it serves (the whole command is tests/system/test_demo_serve.py)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from fleet.sim.serve import Served, demo_state, wait


def test_a_workspace_without_a_readable_demo_state_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no demo-state.json; expected the --workspace of a flywheel demo"):
        demo_state(tmp_path)
    (tmp_path / "demo-state.json").write_text("{not json")
    with pytest.raises(ValueError, match="demo-state.json is not JSON"):
        demo_state(tmp_path)
    (tmp_path / "demo-state.json").write_text('{"format": "something/9"}')
    with pytest.raises(ValueError, match="has format 'something/9'; expected 'flywheel.demo-state/1'"):
        demo_state(tmp_path)


def test_a_server_that_stops_on_its_own_ends_the_wait_with_its_name_and_log(tmp_path: Path) -> None:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    done.wait()
    try:
        hub = types.SimpleNamespace(process=running, log_path=tmp_path / "hub.log")
        studio = types.SimpleNamespace(process=done, log_path=tmp_path / "label-studio.log")
        served = Served(hub, studio)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=r"Label Studio \(exit code 3; its log: .*label-studio.log\) stopped"):
            wait(served, poll_s=0.01)
        running.kill()
        running.wait()
        with pytest.raises(RuntimeError, match=r"the hub \(exit code -9; its log: .*hub.log\) stopped"):
            wait(served, poll_s=0.01)
    finally:
        if running.poll() is None:
            running.kill()
