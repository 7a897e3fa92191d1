"""Shared helpers for the benchmarks: the machine's description, appending to RESULTS.md, and a hub started in
this process."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, load {load:.1f} at start, Python {platform.python_version()}"


def command() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


def append(path: Path, title: str, body: str) -> None:
    with path.open("a") as fh:
        fh.write(f"\n## {title} - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
        fh.write(f"`{command()}`\n\nMachine: {machine()}.\n\n{body.rstrip()}\n")


def started_hub(database_url: str, data_dir: Path) -> Any:
    """A dev-mode hub app on ``database_url``, started (its migrations run) behind Starlette's test client, which
    is returned: close it with ``__exit__``. Its hub is ``client.app.state.hub``."""
    from starlette.testclient import TestClient

    from fleet.hub.app import create_app
    from fleet.hub.settings import HubSettings
    from fleet.signing import generate_keypair

    settings = HubSettings(dev=True, data_dir=data_dir, database_url=database_url,
                           signing_public_key=generate_keypair().public_b64, public_url="http://hub.bench")
    client = TestClient(create_app(settings))
    client.__enter__()
    return client
