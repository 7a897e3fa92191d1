"""Helpers for integration tests and the benchmark: a Label Studio server of one's own (network faults between
the bridge and it come from tests/support/faults.py)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fleet.sim.procs import free_port
from fleet.sim.studio import STUDIO_ENV


def studio_bin() -> str | None:
    """The label-studio executable: FLYWHEEL_TEST_LS_BIN, or the repository's .venv-studio."""
    env = os.environ.get("FLYWHEEL_TEST_LS_BIN")
    if env and Path(env).exists():
        return env
    local = Path(__file__).resolve().parents[2] / ".venv-studio" / "bin" / "label-studio"
    return str(local) if local.exists() else None


@dataclass
class StudioServer:
    """A Label Studio process on loopback with a known admin and legacy token; restartable on its data dir."""

    binary: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(20))
    user: str = "admin@flywheel.test"
    password: str = field(default_factory=lambda: "fw-" + secrets.token_urlsafe(12))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 300.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [self.binary, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir / "data"), "--username", self.user, "--password", self.password,
             "--user-token", self.token, "--enable-legacy-api-token"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **STUDIO_ENV}, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"label-studio exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/api/current-user/whoami", headers={"Authorization": f"Token {self.token}"},
                              timeout=5)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"label-studio did not answer within {timeout_s}s: {self.log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, n: int = 30) -> str:
        path = self.data_dir / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def sync_cut_off_by_a_kill(server: StudioServer, sync: Callable[[], Any], pushing: Callable[[], bool]) -> Any:
    """Run ``sync`` (one bridge sync) while Label Studio is SIGKILLed as soon as ``pushing()`` says the hub
    has selected cases for it; the sync's report must show the push was cut off."""
    killed: list[float] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while not pushing() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop(kill=True)
        killed.append(time.monotonic())

    k = threading.Thread(target=killer)
    k.start()
    report = sync()
    k.join()
    assert killed and report.errors, "the push should have been cut off"
    return report
