"""The hub worker's cap on glibc malloc arenas: taken by the C library, and in effect for new threads."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fleet.hub import memory
from fleet.hub.settings import HubSettings

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt arenas are glibc's")

_ARENAS = textwrap.dedent("""
    import ctypes, ctypes.util, sys, threading
    from fleet.hub.memory import limit_malloc_arenas
    cap = int(sys.argv[1])
    if cap:
        assert limit_malloc_arenas(cap)
    barrier = threading.Barrier(9)
    keep = []
    def work():
        keep.append([bytes(4096) for _ in range(64)])  # above pymalloc's size: glibc malloc serves these
        barrier.wait()
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    barrier.wait()  # all eight threads hold memory at once
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_stats()  # one "Arena N:" block per arena, on stderr
    barrier.wait()
    for t in threads:
        t.join()
""")


def _arenas(cap: int) -> int:
    out = subprocess.run([sys.executable, "-c", _ARENAS, str(cap)], capture_output=True, text=True, check=True,
                         timeout=60)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


@glibc
def test_the_cap_bounds_the_arenas_of_threads_started_after_it() -> None:
    assert _arenas(2) <= 2
    assert _arenas(0) > 2  # without it, eight busy threads on this machine get more


def test_no_cap_asked_changes_nothing() -> None:
    assert memory.limit_malloc_arenas(0) is False


def test_the_worker_factory_applies_the_setting_before_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fleet.hub import app as app_module

    seen: list[int] = []
    monkeypatch.setattr(memory, "limit_malloc_arenas", lambda n: seen.append(n) or True)
    monkeypatch.setenv("FLYWHEEL_HUB_DEV", "1")
    monkeypatch.setenv("FLYWHEEL_HUB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_HUB_MALLOC_ARENAS", "3")
    app_module.create_app_from_env()
    assert seen == [3]
    assert HubSettings(dev=True).malloc_arenas == 3


def test_a_bad_arena_count_is_refused_with_what_was_received(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("FLYWHEEL_HUB_MALLOC_ARENAS", "-1")
    with pytest.raises(ValidationError, match="malloc_arenas") as info:
        HubSettings(dev=True)
    assert "input_value='-1'" in str(info.value)
