"""Hub ingest throughput: N concurrent simulated devices posting cases to a real hub on loopback.

Starts ``flywheel hub serve`` (SQLite, and PostgreSQL when a URL is given or FLYWHEEL_TEST_PG_URL is
set), registers a signed model, enrolls N devices, then has each device post cases back to back
(multipart: Case JSON + a 28x28 PNG, like the agent's uplink) with one httpx client per device.
Each backend is measured twice against the same hub: one case per request (``POST /v1/cases``, the
baseline) and ``--batch`` cases per request (``POST /v1/cases/batch``, as the uplink sends them);
the ratio of the two is the figure that survives a busy machine. After a warm-up it measures
sustained cases/s, p50/p99 latency per request and per case (request time / cases in it), the error
count and the hub's CPU per case, and appends rows to benchmarks/RESULTS.md. The hub and the load
generator share this machine's CPUs.

    .venv/bin/python benchmarks/bench_hub_ingest.py --devices 32 --duration 15 --batch 16
    .venv/bin/python benchmarks/bench_hub_ingest.py --backend postgres --pg-url postgresql+psycopg://...
    .venv/bin/python benchmarks/bench_hub_ingest.py --backend postgres --workers 1 2 4 --s3-endpoint http://...

``--workers 1 2 4`` runs each count against a fresh database (and, with ``--s3-endpoint``, a fresh bucket of an
S3-compatible server for the blobs): the "vs fewest workers" column is the scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.protocol import Case, Classification, TriggerHit, encode_embedding  # noqa: E402

TARGETS = {"sqlite": 500.0, "postgres": 1000.0}


def png(rng: np.random.Generator, size: int = 28) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def multipart_body(cases: list[tuple[Case, bytes]], boundary: str, *, batch: bool) -> bytes:
    """The same multipart bytes httpx would send: ``case``/``image``, or ``case_i``/``image_i`` for a batch."""
    b = boundary.encode()
    out = []
    for i, (case, image) in enumerate(cases):
        suffix = f"_{i}".encode() if batch else b""
        out += [b"--", b, b'\r\nContent-Disposition: form-data; name="case', suffix, b'"\r\n\r\n',
                case.to_json().encode(), b"\r\n",
                b"--", b, b'\r\nContent-Disposition: form-data; name="image', suffix, b'"; filename="frame.png"\r\n',
                b"Content-Type: image/png\r\n\r\n", image, b"\r\n"]
    return b"".join([*out, b"--", b, b"--\r\n"])


def build_bodies(device: str, n: int, seed: int, batch: int) -> list[bytes]:
    """[boundary, body, body, ...]: ``n`` cases, one per body (batch 0) or ``batch`` per body."""
    boundary = uuid.uuid4().hex
    cases = build_cases(device, n, seed)
    if batch == 0:
        return [boundary.encode(), *(multipart_body([c], boundary, batch=False) for c in cases)]
    return [boundary.encode(), *(multipart_body(cases[i : i + batch], boundary, batch=True)
                                 for i in range(0, len(cases) - batch + 1, batch))]


def build_cases(device: str, n: int, seed: int) -> list[tuple[Case, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = png(rng)
        p = rng.dirichlet(np.ones(10) * 0.5)
        case = Case(case_id=f"{device}-{i}-{uuid.uuid4().hex[:6]}", device_id=device, captured_at=time.time(),
                    model_version="bench-m1", prediction=Classification(int(np.argmax(p)), [float(x) for x in p]),
                    image_sha256=hashlib.sha256(image).hexdigest(), image_size=len(image), priority=0.5,
                    scores={"entropy": float(-(p * np.log(p + 1e-12)).sum())},
                    triggers=[TriggerHit("entropy", 0.9, 0.5)], tags={"condition": "night"},
                    embedding=encode_embedding(rng.normal(size=32)))
        out.append((case, image))
    return out


# ---------------------------------------------------------------------------------------------
# load generator (its own process, so its CPU use is not the hub's)
# ---------------------------------------------------------------------------------------------


async def _device(url: str, token: str, bodies: list[bytes], batch: int, start_at: float, warm_until: float,
                  stop_at: float, out: dict[str, Any]) -> None:
    import httpx

    boundary, requests = bodies[0].decode(), bodies[1:]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    path = "/v1/cases/batch" if batch else "/v1/cases"
    per_request = batch or 1
    async with httpx.AsyncClient(base_url=url, timeout=60.0, headers=headers) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        i = 0
        while time.time() < stop_at and i < len(requests):
            t0 = time.perf_counter()
            now = time.time()
            try:
                r = await client.post(path, content=requests[i])
                if batch:
                    ok = (sum(x["status"] == "created" for x in r.json()["results"])
                          if r.status_code == 200 else 0)
                else:
                    ok = int(r.status_code == 201)
            except (httpx.HTTPError, ValueError, KeyError):
                ok = 0
            dt = time.perf_counter() - t0
            i += 1
            if now >= warm_until and time.time() <= stop_at:
                out["lat"].append(dt)
                out["ok"] += ok
                out["err"] += per_request - ok


def _client_proc(url: str, jobs: list[tuple[str, list[bytes]]], batch: int, start_at: float, warm_until: float,
                 stop_at: float, q: Any) -> None:
    out: dict[str, Any] = {"lat": [], "ok": 0, "err": 0}

    async def main() -> None:
        await asyncio.gather(*(_device(url, tok, bodies, batch, start_at, warm_until, stop_at, out)
                               for tok, bodies in jobs))

    asyncio.run(main())
    q.put(out)


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU seconds of every live process in process group ``pgid`` (the hub and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ...
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_load(url: str, tokens: dict[str, str], args: argparse.Namespace, pgid: int | None = None, *,
             batch: int = 0, seed: int = 0) -> dict[str, Any]:
    """Measure one mode: ``batch`` 0 posts one case per request, otherwise ``batch`` cases per request."""
    per_device = int(args.max_rate * (args.warmup + args.duration) / args.devices) + 10 + batch
    jobs = [(tokens[d], build_bodies(d, per_device, seed=seed + i, batch=batch)) for i, d in enumerate(sorted(tokens))]
    start_at = time.time() + 1.0
    warm_until, stop_at = start_at + args.warmup, start_at + args.warmup + args.duration
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    chunks = [jobs[i :: args.client_procs] for i in range(args.client_procs)]
    procs = [ctx.Process(target=_client_proc, args=(url, c, batch, start_at, warm_until, stop_at, q))
             for c in chunks]
    for p in procs:
        p.start()
    cpu0 = cpu1 = 0.0
    if pgid is not None:
        time.sleep(max(0.0, warm_until - time.time()))
        cpu0 = group_cpu_seconds(pgid)
        time.sleep(max(0.0, stop_at - time.time()))
        cpu1 = group_cpu_seconds(pgid)
    parts = [q.get(timeout=args.warmup + args.duration + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = np.asarray([x for part in parts for x in part["lat"]])
    ok, err = sum(p["ok"] for p in parts), sum(p["err"] for p in parts)

    def pct(q: float, per: int = 1) -> float:
        return float(np.percentile(lat, q) * 1000 / per) if len(lat) else float("nan")

    return {"mode": f"batch {batch}" if batch else "single", "rate": ok / args.duration, "ok": ok, "errors": err,
            "requests": len(lat),
            "hub_cpu_ms_per_case": (cpu1 - cpu0) * 1000 / ok if ok and pgid is not None else float("nan"),
            "p50_ms": pct(50), "p99_ms": pct(99),
            "case_p50_ms": pct(50, batch or 1), "case_p99_ms": pct(99, batch or 1)}


# ---------------------------------------------------------------------------------------------
# hub setup
# ---------------------------------------------------------------------------------------------


def setup_hub(hub: Any, n_devices: int, tmp: Path) -> dict[str, str]:
    import httpx

    from tests.support.models import make_model_files

    trainer = {"Authorization": f"Bearer {hub.token('trainer')}"}
    files = make_model_files(tmp, "bench-m1", private_key=hub.private_key(), num_classes=10, embedding_dim=32,
                             height=28, width=28)
    r = httpx.post(hub.url + "/v1/models", headers=trainer, data={"manifest": files.signed.to_json()},
                   files={"onnx": ("m.onnx", files.onnx_path.read_bytes())}, timeout=60)
    r.raise_for_status()
    httpx.post(hub.url + "/v1/models/bench-m1/promote", headers=hub.admin_headers).raise_for_status()
    tokens = {}
    for i in range(n_devices):
        d = f"bench-dev-{i:03d}"
        e = httpx.post(hub.url + "/v1/enroll", json={"device_id": d, "fleet_secret": hub.fleet_secret}, timeout=30)
        e.raise_for_status()
        tokens[d] = e.json()["token"]
    return tokens


def fresh_pg_database(pg_url: str) -> tuple[str, Any]:
    import psycopg
    import sqlalchemy as sa

    u = sa.make_url(pg_url)
    name = f"flywheel_bench_{uuid.uuid4().hex[:8]}"
    admin = u.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return u.set(database=name).render_as_string(hide_password=False), drop


def s3_env(endpoint: str | None) -> dict[str, str]:
    """The hub's settings for blobs in a fresh bucket of the S3-compatible server at ``endpoint`` (none: disk)."""
    if not endpoint:
        return {}
    import secrets

    import boto3

    bucket = f"flywheel-ingest-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return {"FLYWHEEL_HUB_BLOB_STORE": "s3", "FLYWHEEL_HUB_S3_BUCKET": bucket, "FLYWHEEL_HUB_S3_ENDPOINT_URL": endpoint}


def bench(backend: str, args: argparse.Namespace, workers: int) -> list[dict[str, Any]]:
    from tests.support.hub import start_hub

    with tempfile.TemporaryDirectory(prefix="bench-hub-") as d:
        tmp = Path(d)
        drop = None
        url = None
        if backend == "postgres":
            url, drop = fresh_pg_database(args.pg_url)
        try:
            with start_hub(tmp / "hub", database_url=url, workers=workers,
                           extra_env={"FLYWHEEL_HUB_DB_POOL_SIZE": str(args.pool_size),
                                      **s3_env(args.s3_endpoint)}) as hub:
                tokens = setup_hub(hub, args.devices, tmp)
                results = [run_load(hub.url, tokens, args, pgid=hub.process.pid)]  # the baseline
                if args.batch:
                    results.append(run_load(hub.url, tokens, args, pgid=hub.process.pid, batch=args.batch,
                                            seed=10_000))
        finally:
            if drop:
                drop()
    for r in results:
        r.update(backend=backend, workers=workers, devices=args.devices, blobs="S3" if args.s3_endpoint else "disk",
                 ratio=r["rate"] / results[0]["rate"] if results[0]["rate"] else float("nan"))
    return results


def append_results(rows: list[dict[str, Any]], args: argparse.Namespace, load_before: str = "?") -> None:
    path = REPO / "benchmarks" / "RESULTS.md"
    cmd = "python benchmarks/bench_hub_ingest.py " + " ".join(sys.argv[1:])
    lines = []
    if not path.exists() or "## Hub ingest" not in path.read_text():
        lines += ["", "## Hub ingest (`benchmarks/bench_hub_ingest.py`)", "",
                  "Sustained cases/s from N concurrent simulated devices (one httpx client each, multipart Case "
                  "JSON + 28x28 PNG + 32-d embedding) against `flywheel hub serve` on loopback; the hub and the load "
                  "generator share the machine's CPUs. Latency is per request as the device sees it.", ""]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"## Hub ingest, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (`bench_hub_ingest.py`)", "",
              f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}, load average before {load_before}, at the end {load}: `{cmd}`", "",
              "| backend | blobs | workers | devices | upload | cases/s | vs single | vs fewest workers | target | "
              "request p50 / p99 ms | per case p50 / p99 ms | errors | hub CPU ms/case |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['blobs']} | {r['workers']} | {r['devices']} | {r['mode']} | "
                     f"{r['rate']:.0f} | {r['ratio']:.2f}x | {r['scale']:.2f}x | >= {TARGETS[r['backend']]:.0f} | "
                     f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
                     f"{r['case_p50_ms']:.2f} / {r['case_p99_ms']:.2f} | {r['errors']} | "
                     f"{r['hub_cpu_ms_per_case']:.2f} |")
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[],
                    help="hub worker processes, one run for each count given, to show scaling (default 1 SQLite, 2 "
                         "PostgreSQL)")
    ap.add_argument("--s3-endpoint", default=None,
                    help="Keep the hub's blobs in an S3-compatible server at this URL (a fresh bucket each run)")
    ap.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    ap.add_argument("--pool-size", type=int, default=20, help="database connections per worker")
    ap.add_argument("--max-rate", type=float, default=3000.0, help="cases prepared per second of run")
    ap.add_argument("--batch", type=int, default=16,
                    help="cases per request for the batch run (0: only the one-case-per-request baseline)")
    ap.add_argument("--pg-url", default=os.environ.get("FLYWHEEL_TEST_PG_URL"))
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if "postgres" in backends and not args.pg_url:
        print("no --pg-url and FLYWHEEL_TEST_PG_URL is unset: skipping PostgreSQL "
              "(source scripts/services.sh && start_postgres)", file=sys.stderr)
        backends.remove("postgres")
    rows = []
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    for b in backends:
        first: dict[str, float] = {}  # upload mode -> cases/s with the fewest workers
        for workers in sorted(args.workers or [1 if b == "sqlite" else 2]):
            for r in bench(b, args, workers):
                first.setdefault(r["mode"], r["rate"])
                r["scale"] = r["rate"] / first[r["mode"]] if first[r["mode"]] else float("nan")
                rows.append(r)
                print(json.dumps(r))
    if rows and not args.no_write:
        append_results(rows, args, load_before)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
