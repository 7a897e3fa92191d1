from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.edge.spool import Spool
from fleet.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]


def put(spool: Spool, case_id: str, priority: float, size: int = 100) -> bool:
    return spool.put(case_id, priority, json.dumps({"id": case_id}), b"\0" * size).stored


def test_peek_orders_by_priority_then_age_and_ack_removes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 20)
    for cid, p in [("a", 0.2), ("b", 0.9), ("c", 0.2), ("d", 0.5)]:
        put(spool, cid, p)
    assert [i.case_id for i in spool.peek(4)] == ["b", "d", "a", "c"]
    assert [i.case_id for i in spool.peek(2, exclude=["b"])] == ["d", "a"]
    assert spool.ack("b") and not spool.ack("b")
    assert spool.drop("d")
    st_ = spool.check()
    assert (st_.items, st_.offered, st_.acked, st_.dropped, st_.evicted) == (2, 4, 1, 1, 0)


def test_full_spool_evicts_lowest_priority_never_a_higher_newcomer(tmp_path: Path) -> None:
    item = len(json.dumps({"id": "x0"})) + 1000
    spool = Spool(tmp_path / "s.db", max_bytes=3 * item)
    for cid, p in [("x1", 0.3), ("x2", 0.1), ("x3", 0.5)]:
        assert put(spool, cid, p, 1000)
    # a higher-priority newcomer evicts the lowest (x2)
    r = spool.put("x4", 0.4, json.dumps({"id": "x4"}), b"\0" * 1000)
    assert r.stored and r.evicted == ("x2",)
    # a lower-priority newcomer is the one dropped; so is an equal one (ties keep what is stored)
    assert not put(spool, "x5", 0.05, 1000)
    assert not put(spool, "x6", 0.3, 1000)
    stats = spool.check()
    assert stats.evicted == 3 and stats.items == 3
    assert {i.case_id for i in spool.peek(10)} == {"x1", "x3", "x4"}
    # a big newcomer evicts as many low ones as it needs, and they are all lower than it
    r = spool.put("big", 0.9, json.dumps({"id": "big"}), b"\0" * (2 * item - 20))
    assert r.stored and set(r.evicted) == {"x1", "x4"}
    assert spool.check().evicted == 5
    # larger than the whole cap: dropped and counted
    assert not put(spool, "huge", 1.0, 4 * item)
    assert spool.check().evicted == 6


def test_counters_and_items_survive_reopen_and_duplicates_are_absorbed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 20)
    put(spool, "a", 0.5)
    put(spool, "b", 0.6)
    spool.ack("a")
    r = spool.put("b", 0.6, "{}", b"x")
    assert r.duplicate and not r.stored
    spool.close()
    again = Spool(tmp_path / "s.db", max_bytes=1 << 20)
    stats = again.check()
    assert (stats.items, stats.acked, stats.offered) == (1, 1, 2)
    assert again.peek(1)[0].image == b"\0" * 100


def test_bad_priority_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 20)
    for bad in (float("nan"), -0.1, 1.5):
        with pytest.raises(InvalidInput, match="priority must be a finite number in"):
            spool.put("a", bad, "{}", b"x")


def test_an_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "s.db").write_bytes(b"this is not sqlite" * 100)
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 20)
    assert spool.check().items == 0
    assert list(tmp_path.glob("s.db.corrupt-*"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "put", "put", "ack"]), st.floats(0, 1), st.integers(1, 3000)),
                max_size=60))
def test_cap_is_never_exceeded_and_eviction_respects_priority(tmp_path_factory: pytest.TempPathFactory,
                                                              ops: list[tuple[str, float, int]]) -> None:
    spool = Spool(tmp_path_factory.mktemp("h") / "s.db", max_bytes=8000)
    priorities: dict[str, float] = {}
    for n, (op, prio, size) in enumerate(ops):
        if op == "ack":
            for item in spool.peek(1):
                spool.ack(item.case_id)
            continue
        cid = f"c{n}"
        r = spool.put(cid, prio, "{}", b"\0" * size)
        priorities[cid] = prio
        assert all(priorities[v] < prio for v in r.evicted)
        stats = spool.check()
        assert stats.bytes <= 8000
    spool.close()


# -- kill -9 ---------------------------------------------------------------------------------


def run_and_kill(args: list[str], rng: random.Random, *, min_lines: int = 5) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.edge.crashchild", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    lines = []
    for _ in range(min_lines):  # it is running and writing
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        lines.append(line.strip())
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return lines + [ln.strip() for ln in out.splitlines() if ln.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("max_bytes", [1 << 30, 60_000])  # no evictions / constant evictions
def test_kill_9_during_spool_writes_leaves_a_consistent_spool(tmp_path: Path, max_bytes: int) -> None:
    rng = random.Random(max_bytes)
    db = tmp_path / "spool.db"
    lines: list[str] = []
    for round_ in range(6):
        lines += run_and_kill(["spool", str(db), str(max_bytes), str(round_)], rng)
        spool = Spool(db, max_bytes=max_bytes)
        stats = spool.check()  # quick_check, byte accounting, counters add up, cap held
        items = spool.peek(100_000)
        assert len(items) == stats.items == len({i.case_id for i in items})
        for item in items:
            body = json.loads(item.case_json)
            assert body["case_id"] == item.case_id
            assert len(set(item.image)) == 1  # the image bytes are whole
            assert item.nbytes == len(item.case_json.encode()) + len(item.image)
        if max_bytes == 1 << 30:
            # nothing is evicted: every put the child saw commit is still there unless it saw it acked or
            # dropped, give or take the one call in flight at each kill (an ack takes up to 2 items)
            seen = {op: {ln.split()[1] for ln in lines if ln.startswith(op + " ")} for op in ("put", "ack", "drop")}
            present = {i.case_id for i in items}
            assert len(seen["put"] - seen["ack"] - seen["drop"] - present) <= 2 * (round_ + 1)
            assert not (present & (seen["ack"] | seen["drop"]))
            assert len(present - seen["put"]) <= round_ + 1
        spool.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_spool_and_its_folder_are_private(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "data" / "spool.db", max_bytes=10_000)
        put(spool, "c1", 0.5)
    finally:
        os.umask(old)
    spool.close()
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    files = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("spool.db")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files]
