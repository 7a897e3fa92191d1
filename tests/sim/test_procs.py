"""The demo's servers (the hub, Label Studio): one that is interrupted while it starts is not left running."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest


def test_a_hub_interrupted_while_it_starts_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.signing import generate_keypair
    from fleet.sim import procs

    started: list[subprocess.Popen[Any]] = []
    real_popen = subprocess.Popen

    def popen(*a: Any, **k: Any) -> subprocess.Popen[Any]:
        started.append(real_popen(*a, **k))
        return started[-1]

    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt  # Ctrl-C while the demo waits for /healthz

    monkeypatch.setattr(procs.subprocess, "Popen", popen)
    monkeypatch.setattr(procs.httpx, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        procs.start_hub(tmp_path / "hub", generate_keypair())
    assert len(started) == 1 and started[0].poll() is not None  # stopped, not left serving


def test_label_studio_interrupted_while_it_starts_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.sim import studio

    fake = tmp_path / "label-studio"  # a server that never answers
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    started: list[subprocess.Popen[Any]] = []
    real_start = studio.start_logged

    def start_logged(*a: Any, **k: Any) -> subprocess.Popen[Any]:
        started.append(real_start(*a, **k))
        return started[-1]

    calls = []

    def whoami(url: str, token: str) -> bool:
        calls.append(url)
        if len(calls) > 1:
            raise KeyboardInterrupt  # Ctrl-C while the demo waits for it
        return False

    monkeypatch.setattr(studio, "start_logged", start_logged)
    monkeypatch.setattr(studio, "whoami_ok", whoami)
    monkeypatch.setattr(studio.time, "sleep", lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        studio.start_studio(tmp_path / "data", binary=fake)
    assert len(started) == 1 and started[0].poll() is not None  # stopped, not left running
