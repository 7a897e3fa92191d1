"""``kill -9`` the hub while real agents upload, restart it on the same port: every flagged case exists once.

The hub runs on PostgreSQL when scripts/test.sh started one (FLYWHEEL_TEST_PG_URL), else on SQLite.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.models import make_model_files

from .support import (
    agents_running,
    all_cases,
    assert_each_frame_once,
    flagging_spec,
    fresh_pg_database,
    kill9,
    make_agent,
    publish,
    record,
    respawn,
    restartable_hub,
    wait_for,
    write_shard,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N_AGENTS = 3
FRAMES = 360
KILLS = 2


def test_hub_killed_mid_upload_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    with fresh_pg_database() as db_url, restartable_hub(tmp_path / "hub", database_url=db_url) as hub:
        trainer = hub.token("trainer")
        labeler = hub.token("labeler")
        publish(hub, make_model_files(tmp_path / "models", "crash-v1", private_key=hub.private_key()), trainer,
                promote=True)
        expected: dict[str, set[str]] = {}
        agents = []
        for i in range(N_AGENTS):
            dev = f"crash-dev-{i}"
            a = make_agent(tmp_path / dev, hub, dev, spec=flagging_spec(), fps=60, timeout_s=1.0,
                           backoff_max_s=0.5, drain_timeout_s=90)
            expected[dev] = set(write_shard(a.root / "shard.npz", FRAMES, seed=100 + i, flag_every=3))
            agents.append(a)
        n_expected = sum(len(v) for v in expected.values())

        with agents_running(agents) as procs:
            downtime = []
            for k in range(KILLS):
                # let some cases land (and more be in flight), then pull the plug on the server
                floor = (k + 1) * n_expected // (KILLS + 2)
                wait_for(f"{floor} cases at the hub before kill {k + 1}",
                         lambda floor=floor: len(all_cases(hub, labeler)) >= floor, timeout=90, every=0.1)
                kill9(hub)
                t0 = time.monotonic()
                time.sleep(1.5)  # agents keep flagging and spooling; uploads fail and back off
                respawn(hub)
                downtime.append(time.monotonic() - t0)
            codes = procs.wait(timeout=180)
        assert all(c == 0 for c in codes.values()), {a.device_id: a.log_tail() for a in agents}

        cases = all_cases(hub, labeler)
        assert_each_frame_once(cases, expected)
        by_id = {c.case_id for c in cases}
        retried = 0
        for a in agents:
            s = a.summary()
            assert s["frames"] == FRAMES and s["flagged"] == len(expected[a.device_id]) == s["spooled"], s
            assert s["uploaded"] == s["spooled"] and s["spool_items"] == 0 and s["evicted"] == 0, s
            retried += a.log.read_text().count("hub unavailable")
        record("hub_kill9", backend="postgresql" if db_url else "sqlite", agents=N_AGENTS, hub_kills=KILLS,
               downtime_s=[round(d, 1) for d in downtime], cases_flagged=n_expected, cases_at_hub=len(cases),
               cases_lost=n_expected - len(cases), duplicates=len(cases) - len(by_id), upload_retry_bursts=retried)
