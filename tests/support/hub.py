"""Start a real hub process (``flywheel hub serve``) for tests of the parts that talk to it over HTTP.

Use the ``running_hub`` fixture (add ``from tests.support.hub import running_hub  # noqa: F401`` to a
conftest) or :func:`start_hub` as a context manager. It listens on a free loopback port, with fresh
strong secrets and a fresh signing key pair, and is killed afterwards::

    def test_agent_enrolls(running_hub: RunningHub) -> None:
        r = httpx.post(running_hub.url + "/v1/enroll", json={"device_id": "d1",
                       "fleet_secret": running_hub.fleet_secret})
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet.signing import KeyPair, generate_keypair, load_private_key

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningHub:
    url: str
    admin_token: str
    fleet_secret: str
    webhook_secret: str
    keypair: KeyPair
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def private_key(self) -> Any:
        return load_private_key(self.keypair.private_pem)

    def token(self, scope: str, name: str | None = None) -> str:
        """Mint a labeler/trainer/admin token through the API."""
        import httpx

        r = httpx.post(self.url + "/v1/tokens", headers=self.admin_headers,
                       json={"scope": scope, "name": name or f"{scope}-{secrets.token_hex(4)}"})
        r.raise_for_status()
        return str(r.json()["token"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def start_hub(data_dir: Path, *, database_url: str | None = None, workers: int = 1,
              extra_env: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[RunningHub]:
    """Run ``flywheel hub serve`` as a subprocess until the block exits."""
    import httpx

    data_dir.mkdir(parents=True, exist_ok=True)
    pair = generate_keypair()
    port = free_port()
    secrets_ = {name: secrets.token_urlsafe(24) for name in ("admin", "fleet", "url", "webhook")}
    env = {
        **os.environ,
        "FLYWHEEL_HUB_ADMIN_TOKEN": secrets_["admin"],
        "FLYWHEEL_HUB_FLEET_SECRET": secrets_["fleet"],
        "FLYWHEEL_HUB_URL_SECRET": secrets_["url"],
        "FLYWHEEL_HUB_WEBHOOK_SECRET": secrets_["webhook"],
        "FLYWHEEL_HUB_SIGNING_PUBLIC_KEY": pair.public_b64,
        "FLYWHEEL_HUB_PUBLIC_URL": f"http://127.0.0.1:{port}",
        **(extra_env or {}),
    }
    env.pop("FLYWHEEL_HUB_DEV", None)
    cmd = [sys.executable, "-m", "fleet.cli", "hub", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--workers", str(workers), "--log-level", "warning"]
    if database_url:
        cmd += ["--database-url", database_url]
    log_path = data_dir / "hub.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    hub = RunningHub(url=f"http://127.0.0.1:{port}", admin_token=secrets_["admin"], fleet_secret=secrets_["fleet"],
                     webhook_secret=secrets_["webhook"], keypair=pair, data_dir=data_dir, process=proc,
                     log_path=log_path, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"hub exited with {proc.returncode}:\n{hub.log()}")
            try:
                if httpx.get(hub.url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"hub did not answer /healthz within {timeout}s:\n{hub.log()}")
            time.sleep(0.1)
        yield hub
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the hub's process group (uvicorn and its workers), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


@pytest.fixture
def running_hub(tmp_path: Path) -> Iterator[RunningHub]:
    """A real hub on SQLite in ``tmp_path/hub``; yields URL, admin token, fleet secret and signing keys."""
    with start_hub(tmp_path / "hub") as hub:
        yield hub
