"""Shared helpers for the benchmarks: the machine's description and appending to RESULTS.md."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path


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
