"""Several ``flywheel hub serve`` workers (separate processes) on one PostgreSQL database and one S3 bucket, behind
one address (a round-robin layer-4 balancer): ``kill -9`` one worker while real agents upload through the
balancer, and every flagged case exists exactly once; a selection and a rollout started on one worker are what
the other serves (issue 19.2)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fleet.protocol import Assignment, PoolPage, RolloutPublic, Selection
from fleet.signing import generate_keypair
from fleet.sim import procs
from tests.support.hub import RunningHub
from tests.support.models import make_model_files
from tests.support.s3 import new_bucket, s3_client, s3_env
from tests.support.services import missing_service
from tests.support.tcpproxy import TcpProxy

from .support import (
    agents_running,
    all_cases,
    assert_each_frame_once,
    bearer,
    flagging_spec,
    fresh_pg_database,
    kill9,
    make_agent,
    publish,
    record,
    wait_for,
    write_shard,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

N_WORKERS = 2
N_AGENTS = 3
FRAMES = 300


@contextmanager
def hub_workers(tmp: Path, database_url: str, bucket: str, n: int) -> Iterator[tuple[RunningHub, list[RunningHub]]]:
    """``n`` hub workers sharing secrets, database and bucket, and the balancer in front of them as one hub (its
    URL is the one every worker signs its links with)."""
    pair = generate_keypair()
    keys = {name: secrets.token_urlsafe(24) for name in procs.HUB_SECRETS}
    ports = [procs.free_port() for _ in range(n)]
    workers: list[RunningHub] = []
    with TcpProxy("127.0.0.1", *ports) as balancer:
        front = f"http://127.0.0.1:{balancer.port}"
        env = {**s3_env(bucket), "FLYWHEEL_HUB_PUBLIC_URL": front}
        try:
            for i, port in enumerate(ports):  # one after the other: the first migrates the database
                p = procs.start_hub(tmp / f"worker-{i}", pair, database_url=database_url, port=port, keys=keys,
                                    extra_env=env)
                workers.append(RunningHub(url=p.url, admin_token=p.admin_token, fleet_secret=p.fleet_secret,
                                          webhook_secret=p.webhook_secret, keypair=pair, data_dir=p.data_dir,
                                          process=p.process, log_path=p.log_path, env=p.env, keys=p.keys))
            w0 = workers[0]
            yield RunningHub(url=front, admin_token=w0.admin_token, fleet_secret=w0.fleet_secret,
                             webhook_secret=w0.webhook_secret, keypair=pair, data_dir=w0.data_dir,
                             process=w0.process, log_path=w0.log_path, env=w0.env, keys=w0.keys), workers
        finally:
            for w in workers:
                procs.stop_process(w.process)


def test_a_worker_killed_mid_upload_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    with fresh_pg_database() as db_url:
        if db_url is None:
            missing_service("FLYWHEEL_TEST_PG_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")
        bucket = new_bucket()
        with hub_workers(tmp_path, db_url, bucket, N_WORKERS) as (hub, workers):
            trainer, labeler = hub.token("trainer"), hub.token("labeler")
            publish(hub, make_model_files(tmp_path / "models", "w-v1", private_key=hub.private_key()), trainer,
                    promote=True)
            expected: dict[str, set[str]] = {}
            agents = []
            for i in range(N_AGENTS):
                dev = f"worker-dev-{i}"
                a = make_agent(tmp_path / dev, hub, dev, spec=flagging_spec(), fps=60, timeout_s=1.0,
                               backoff_max_s=0.5, drain_timeout_s=120)
                expected[dev] = set(write_shard(a.root / "shard.npz", FRAMES, seed=300 + i, flag_every=3))
                agents.append(a)
            n_expected = sum(len(v) for v in expected.values())
            with agents_running(agents) as running:
                wait_for("a third of the cases at the hub", lambda: len(all_cases(hub, labeler)) >= n_expected // 3,
                         timeout=120, every=0.1)
                kill9(workers[1])  # a power cut of one worker, mid-upload; the balancer passes it over
                killed_at = len(all_cases(hub, labeler))
                codes = running.wait(timeout=240)
            assert all(c == 0 for c in codes.values()), {a.device_id: a.log_tail() for a in agents}

            cases = all_cases(hub, labeler)
            assert_each_frame_once(cases, expected)
            by_id = {c.case_id for c in cases}
            for a in agents:
                s = a.summary()
                assert s["uploaded"] == s["spooled"] == len(expected[a.device_id]) and s["spool_items"] == 0, s
            # the images are in the bucket, not on either worker's disk
            keys = [o["Key"] for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
                    for o in page.get("Contents", [])]
            assert len(keys) >= len({c.image_sha256 for c in cases})
            assert not any(any((w.data_dir / "blobs").rglob("*")) for w in workers)
            assert killed_at < n_expected  # the kill came mid-upload: the rest went in through the other worker
            record("hub_workers_kill9", workers=N_WORKERS, agents=N_AGENTS, cases_flagged=n_expected,
                   cases_at_hub=len(cases), cases_when_killed=killed_at, cases_lost=n_expected - len(cases),
                   duplicates=len(cases) - len(by_id))


def test_a_selection_and_a_rollout_started_on_one_worker_are_seen_by_the_other(tmp_path: Path) -> None:
    with fresh_pg_database() as db_url:
        if db_url is None:
            missing_service("FLYWHEEL_TEST_PG_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")
        with hub_workers(tmp_path, db_url, new_bucket(), N_WORKERS) as (hub, (a, b)):
            trainer, labeler = hub.token("trainer"), hub.token("labeler")
            publish(a, make_model_files(tmp_path / "models", "w-v1", private_key=hub.private_key()), trainer,
                    promote=True)
            agent = make_agent(tmp_path / "dev", hub, "sel-dev", spec=flagging_spec(), fps=0)
            write_shard(agent.root / "shard.npz", 60, seed=7, flag_every=2)
            with agents_running([agent]) as running:
                assert running.wait(timeout=120) == {"sel-dev": 0}, agent.log_tail()

            r = httpx.post(a.url + "/v1/selections", headers=bearer(labeler), timeout=30,
                           json={"budget": 5, "strategy": "uncertainty", "seed": 0})
            assert r.status_code == 200, r.text
            picked = {c.case.case_id for c in Selection.from_json(r.content).cases}
            r = httpx.get(b.url + "/v1/pool", params={"state": "queued", "limit": 100}, headers=bearer(labeler))
            assert {c.case.case_id for c in PoolPage.from_json(r.content).cases} == picked and len(picked) == 5

            publish(a, make_model_files(tmp_path / "models", "w-v2", private_key=hub.private_key(), seed=3,
                                        parent="w-v1"), trainer)
            r = httpx.post(a.url + "/v1/rollouts", headers=bearer(trainer), timeout=30,
                           json={"version": "w-v2", "stages": [1.0]})
            assert r.status_code in (200, 201), r.text
            rollout = RolloutPublic.from_json(r.content)
            seen = RolloutPublic.from_json(httpx.get(f"{b.url}/v1/rollouts/{rollout.rollout_id}",
                                                     headers=bearer(trainer), timeout=30).content)
            assert seen.state == "running" and seen.version == "w-v2"
            r = httpx.post(b.url + "/v1/enroll", timeout=30,
                           json={"device_id": "probe-dev", "fleet_secret": hub.fleet_secret, "group": "default"})
            assert r.status_code == 200, r.text
            token = r.json()["token"]
            deadline = time.monotonic() + 30
            while True:  # worker b assigns the candidate (every device is in its only stage)
                got = Assignment.from_json(httpx.get(b.url + "/v1/assignment", headers=bearer(token)).content)
                if got.active is not None and got.active.version == "w-v2" or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert got.active is not None and got.active.version == "w-v2" and got.rollout_id == rollout.rollout_id
