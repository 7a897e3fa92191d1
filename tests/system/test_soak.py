"""A short soak in CI: 50 simulated devices (asyncio clients speaking the real device API) for ~40 s
against a real hub: zero errors, every acknowledged case stored once, steady memory after warm-up.

The long soak is ``benchmarks/bench_soak.py --devices 200 --minutes 10`` (see its docstring).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from .support import fresh_pg_database, record

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_soak.py"
DEVICES = int(os.environ.get("FLYWHEEL_SYSTEM_SOAK_DEVICES", "50"))
SECONDS = float(os.environ.get("FLYWHEEL_SYSTEM_SOAK_S", "40"))


def _load():
    spec = importlib.util.spec_from_file_location("bench_soak", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_soak", module)
    spec.loader.exec_module(module)
    return module


def test_short_soak_has_no_errors_and_steady_memory(tmp_path: Path) -> None:
    """On the scale-out setup: two hub workers, PostgreSQL, the blobs in an S3 bucket."""
    from tests.support.s3 import new_bucket, s3_env
    from tests.support.services import missing_service

    bench = _load()
    bucket = new_bucket()
    with fresh_pg_database() as db_url:
        if db_url is None:
            missing_service("FLYWHEEL_TEST_PG_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")
        r = bench.soak(DEVICES, SECONDS, workdir=tmp_path, database_url=db_url, workers=2, period_s=1.0,
                       extra_env=s3_env(bucket))
    text = bench.report(r, 0.20)
    print(text)
    assert r.server_errors == 0 and r.transport_errors == 0 and r.unexpected == 0, r.error_samples
    assert r.cases_stored > DEVICES and r.cases_at_hub == r.cases_stored, text
    assert r.by_kind.get("heartbeat", 0) > 0 and r.by_kind.get("assignment", 0) > 0
    assert len(r.rss_mib) >= 10 and r.rss_growth < 0.20, r.rss_mib
    record("soak_short", devices=DEVICES, seconds=SECONDS, backend=r.backend, workers=2, blobs="s3",
           requests=r.requests,
           errors=r.errors, cases_stored=r.cases_stored, cases_lost=r.cases_stored - r.cases_at_hub,
           retries_already=r.cases_repeated, rss_warm_mib=r.rss_warm_mib, rss_end_mib=r.rss_end_mib,
           rss_growth=r.rss_growth)
