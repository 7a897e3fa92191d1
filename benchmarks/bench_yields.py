"""Per-trigger yields over a large pool: the database counting uploads and bytes (fleet.hub.yields, trigger names
read from each case's JSON in SQL) against every campaign case decoded and counted in Python, as the hub counted
before, in one run. ``/metrics``, ``GET /v1/yields``, the campaigns page and ``auto`` budgets all read them. And a
``/metrics`` scrape that counts them against one that reads them counted within the last minute
(``metrics_yields_max_age_s``), in the same run.

For each pool size, campaign cases are written in bulk into a fresh hub database (SQLite, and PostgreSQL when
``--pg-admin-url`` or FLYWHEEL_TEST_PG_ADMIN_URL names a server: a database is made for the run and dropped).
Each has one or two trigger hits, a classifier's prediction with 10 probabilities and a condition tag; one in
ten has an accepted label. Both sides must give the same report; the figure is the median of ``--repeat`` runs.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_yields.py [--cases 10000,100000,1000000] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import append, started_hub  # noqa: E402
from fleet.hub.db import read_session  # noqa: E402
from fleet.hub.models import CaseRow  # noqa: E402
from fleet.hub.yields import (  # noqa: E402
    ALL,
    DEFAULT_OPERATING,
    _operating_thresholds,
    _row,
    model_wrong,
    trigger_yields,
)
from fleet.protocol import YieldReport  # noqa: E402

TRIGGERS = ({"name": "entropy", "score": 0.9, "threshold": 0.5}, {"name": "novelty", "score": 0.7, "threshold": 0.5})


def python_yields(s: Any) -> YieldReport:
    """The baseline: every campaign case's columns and JSON read into Python and counted there."""
    q = sa.select(CaseRow.campaign_id, CaseRow.task, CaseRow.payload, CaseRow.image_size, CaseRow.label_status,
                  CaseRow.label, CaseRow.predicted_class, CaseRow.label_payload, CaseRow.model_version) \
        .where(sa.column("campaign_id").is_not(None))
    thresholds = _operating_thresholds(s)
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for cid, task, payload, size, status, label, predicted, label_payload, version in \
            s.execute(q.execution_options(yield_per=5_000)):
        labeled = status == "accepted"
        wrong = labeled and model_wrong(task, label, predicted, payload, label_payload,
                                        thresholds.get(version, DEFAULT_OPERATING))
        for name in {ALL} | {str(h.get("name")) for h in payload.get("triggers") or () if isinstance(h, dict)}:
            t = tally[(cid, name)]
            t[0] += 1
            t[1] += int(size)
            t[2] += int(labeled)
            t[3] += int(wrong)
    return YieldReport(yields=[_row(cid, name, *t) for (cid, name), t in
                               sorted(tally.items(), key=lambda kv: (kv[0][0], kv[0][1] != ALL, kv[0][1]))])


def fill(engine: sa.Engine, n: int) -> None:
    """``n`` campaign cases in three campaigns, written 10,000 a statement."""
    table = CaseRow.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        for start in range(0, n, 10_000):
            rows = []
            for i in range(start, min(n, start + 10_000)):
                labeled = i % 10 == 0
                rows.append({
                    "case_id": f"c{i:08d}", "device_id": f"d{i % 100}", "captured_at": 1.0, "received_at": 1.0 + i,
                    "model_version": "m1", "task": "classify", "predicted_class": i % 10, "uncertainty": 0.5,
                    "priority": 0.0, "campaign_id": f"camp{i % 3}", "campaign_version": 1,
                    "payload": {"triggers": list(TRIGGERS[: 1 + i % 2]), "tags": {"condition": "night"},
                                "prediction": {"task": "classify", "label": i % 10, "probs": [0.1] * 10}},
                    "embedding": None, "embedding_dim": None, "image_sha256": f"{i:064d}", "image_size": 2000 + i % 7,
                    "duplicate_of": None, "state": "labeled" if labeled else "unlabeled", "selection_id": None,
                    "label": (i % 10 if i % 20 else 3) if labeled else None, "label_payload": None,
                    "label_status": "accepted" if labeled else None})
            conn.execute(sa.insert(table), rows)


def hub_engine(url: str, tmp: Path) -> tuple[Any, sa.Engine]:
    """A started hub app on ``url`` (close the client it returns), and its engine."""
    client = started_hub(url, tmp)
    return client, client.app.state.hub.engine


def timed(fn: Any, engine: sa.Engine, repeat: int) -> tuple[float, YieldReport]:
    times, report = [], None
    for _ in range(repeat):
        with read_session(engine) as s:
            t = time.perf_counter()
            report = fn(s)
            times.append(time.perf_counter() - t)
    assert report is not None
    return statistics.median(times), report


def scrapes(client: Any, repeat: int) -> tuple[float, float]:
    """(median seconds of ``GET /metrics`` that counts the yields, median of one that reads them counted within
    ``metrics_yields_max_age_s``), ``repeat`` of each through the app."""
    hub = client.app.state.hub
    admin = {"Authorization": f"Bearer {hub.settings.admin_token.get_secret_value()}"}
    sides: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for counts in (True, False):
            if counts:
                hub.yields.clear()
            t = time.perf_counter()
            r = client.get("/metrics", headers=admin)
            sides[counts].append(time.perf_counter() - t)
            if r.status_code != 200 or "flywheel_trigger_uploads" not in r.text:
                raise SystemExit(f"GET /metrics answered {r.status_code}: {r.text[:300]}")
    return statistics.median(sides[True]), statistics.median(sides[False])


def run(backend: str, url: str, n: int, repeat: int, tmp: Path) -> tuple[float, float, float, float]:
    client, engine = hub_engine(url, tmp)
    try:
        fill(engine, n)
        sql_s, sql_report = timed(trigger_yields, engine, repeat)
        py_s, py_report = timed(python_yields, engine, repeat)
        counting_s, recent_s = scrapes(client, repeat)
    finally:
        client.__exit__(None, None, None)
        engine.dispose()
    if sql_report != py_report:
        raise SystemExit(f"{backend}, {n} cases: the two counts differ:\n{sql_report}\n{py_report}")
    return sql_s, py_s, counting_s, recent_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="10000,100000,1000000", help="pool sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs timed per side (the median is reported)")
    ap.add_argument("--pg-admin-url", default=os.environ.get("FLYWHEEL_TEST_PG_ADMIN_URL"),
                    help="a PostgreSQL server's admin URL (postgresql://USER@HOST:PORT/postgres)")
    ap.add_argument("--append", type=Path, help="append the table to this RESULTS.md")
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.cases.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            times = run("sqlite", f"sqlite:///{Path(tmp) / 'hub.sqlite'}", n, args.repeat, Path(tmp))
        rows.append(("SQLite", n, *times))
        print(f"SQLite, {n} cases: SQL {times[0]:.3f} s, Python {times[1]:.3f} s, /metrics {times[2]:.3f} s "
              f"counting, {times[3]:.3f} s within the max age", flush=True)
        if args.pg_admin_url:
            import psycopg

            name = f"bench_yields_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            try:
                base = sa.make_url(args.pg_admin_url).set(drivername="postgresql+psycopg", database=name)
                with tempfile.TemporaryDirectory() as tmp:
                    times = run("postgresql", base.render_as_string(hide_password=False), n, args.repeat,
                                Path(tmp))
            finally:
                with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
            rows.append(("PostgreSQL", n, *times))
            print(f"PostgreSQL, {n} cases: SQL {times[0]:.3f} s, Python {times[1]:.3f} s, /metrics {times[2]:.3f} s "
                  f"counting, {times[3]:.3f} s within the max age", flush=True)
    lines = ["| database | campaign cases | counted in SQL: s | every case in Python (before): s | SQL / Python | "
             "/metrics counting them: s | /metrics within the max age: s | recent / counting |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, n, sql_s, py_s, counting_s, recent_s in rows:
        lines.append(f"| {backend} | {n:,} | {sql_s:.3f} | {py_s:.3f} | {sql_s / py_s:.3f} | {counting_s:.3f} | "
                     f"{recent_s:.3f} | {recent_s / counting_s:.3f} |")
    body = "\n".join(lines) + (
        f"\n\nThe median of {args.repeat} runs of `trigger_yields` per side, on one read session; both sides gave the "
        "same report. One case in ten has an accepted label, which both sides read into Python to tell the model's "
        f"errors. Then the median of {args.repeat} scrapes of `GET /metrics` through the app each way: one that "
        "counts the yields (the worker's copy cleared first), and one that reads those counted within "
        "`metrics_yields_max_age_s` (60 s), as every scrape but one a minute does.\n")
    print(body)
    if args.append:
        append(args.append, "Per-trigger yields: counted in SQL vs every case in Python (bench_yields.py)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
