"""Start a real hub process (``flywheel hub serve``) for tests of the parts that talk to it over HTTP.

Use the ``running_hub`` fixture (add ``from tests.support.hub import running_hub  # noqa: F401`` to a
conftest) or :func:`start_hub` as a context manager. It listens on a free loopback port, with fresh
strong secrets and a fresh signing key pair, and is killed afterwards::

    def test_agent_enrolls(running_hub: RunningHub) -> None:
        r = httpx.post(running_hub.url + "/v1/enroll", json={"device_id": "d1",
                       "fleet_secret": running_hub.fleet_secret})
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet.signing import KeyPair, generate_keypair, load_private_key
from fleet.sim import procs

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningHub(procs.HubProcess):
    """The demo's hub process plus the signing key pair its registry trusts."""

    keypair: KeyPair = field(kw_only=True)

    def private_key(self) -> Any:
        return load_private_key(self.keypair.private_pem)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def start_hub(data_dir: Path, *, database_url: str | None = None, workers: int = 1,
              extra_env: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[RunningHub]:
    """Run ``flywheel hub serve`` as a subprocess (the demo's own launcher) until the block exits."""
    pair = generate_keypair()
    proc = procs.start_hub(data_dir, pair, database_url=database_url, workers=workers, extra_env=extra_env,
                           timeout=timeout)
    hub = RunningHub(url=proc.url, admin_token=proc.admin_token, fleet_secret=proc.fleet_secret,
                     webhook_secret=proc.webhook_secret, keypair=pair, data_dir=data_dir, process=proc.process,
                     log_path=proc.log_path, env=proc.env)
    try:
        yield hub
    finally:
        stop(hub.process)  # the process a test restarted, if it did


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the hub's process group (uvicorn and its workers), then SIGKILL if it lingers."""
    procs.stop_process(proc, grace=grace)


@pytest.fixture
def running_hub(tmp_path: Path) -> Iterator[RunningHub]:
    """A real hub on SQLite in ``tmp_path/hub``; yields URL, admin token, fleet secret and signing keys."""
    with start_hub(tmp_path / "hub") as hub:
        yield hub
