"""Soak: many simulated devices speak the real device API to a real hub on loopback for a fixed time.

Each device is a lightweight asyncio client (not an agent process): it enrolls, then loops on the
device protocol the agent uses: upload a case (multipart Case JSON + PNG; now and then the same case
again, as an uplink retry after a lost answer), send cumulative heartbeats, poll its assignment and
fetch the assigned model's manifest. Every loop is bounded in time and in count. While it runs, the
hub's resident memory (the server and its workers, from /proc) is sampled; at the end the hub's case
count is checked against what the devices were told was stored.

Pass criteria (exit status 1 otherwise): zero 5xx, zero transport errors, zero unexpected statuses,
every acknowledged case stored exactly once, and the hub's RSS after warm-up growing by less than
``--max-growth`` (mean of the last fifth of the samples against the mean of the first fifth after
warm-up) and flat by the end: a least-squares slope over the second half of the samples of at most
``--max-late-slope`` MiB per minute.

    .venv/bin/python benchmarks/bench_soak.py --devices 200 --minutes 10 --append benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_soak.py --devices 50 --seconds 40          # the CI-sized run
    .venv/bin/python benchmarks/bench_soak.py --database-url postgresql+psycopg://flywheel@127.0.0.1:5432/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fleet.protocol import Case, Classification, InputSpec, ModelManifest, TriggerHit, encode_embedding  # noqa: E402

MODEL_VERSION = "soak-v1"
CYCLE = 60  # heartbeat every 3rd action, assignment every 5th, manifest every 20th
P99_TARGET_MS = 1000  # issue 19: the 200-device soak's request p99
KEEPALIVE_S = 4.0  # under uvicorn's 5 s keep-alive timeout


@dataclass
class SoakResult:
    devices: int
    seconds: float
    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    transport_errors: int = 0
    unexpected: int = 0
    error_samples: list[str] = field(default_factory=list)
    cases_stored: int = 0  # 201 answers
    cases_repeated: int = 0  # retries answered "already"
    cases_at_hub: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (t seconds, MiB)
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_growth: float = 0.0
    rss_late_slope: float = 0.0  # MiB per minute, least squares over the second half of the samples
    backend: str = "sqlite"
    workers: int = 1

    @property
    def errors(self) -> int:
        return self.server_errors + self.transport_errors + self.unexpected

    def ok(self, max_growth: float, max_late_slope: float = float("inf")) -> bool:
        return (self.errors == 0 and self.cases_at_hub == self.cases_stored and self.rss_growth < max_growth
                and self.rss_late_slope <= max_late_slope)


# ---------------------------------------------------------------------------------------------
# memory of the hub process tree, from /proc (psutil is not a dependency)
# ---------------------------------------------------------------------------------------------


def tree_rss_kib(pid: int) -> int:
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += tree_rss_kib(int(child))
    except OSError:
        pass
    return total


# ---------------------------------------------------------------------------------------------
# the simulated fleet
# ---------------------------------------------------------------------------------------------


def _png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Fleet:
    """``devices`` asyncio clients against ``url`` until ``deadline`` (monotonic); results in ``result``."""

    def __init__(self, url: str, fleet_secret: str, devices: int, seconds: float, *, period_s: float = 1.0,
                 seed: int = 0, max_actions: int = 100_000, image_pool: int = 0) -> None:
        self.url = url
        self.fleet_secret = fleet_secret
        self.n = devices
        self.seconds = seconds
        self.period_s = period_s
        self.max_actions = max_actions
        self.rng = random.Random(seed)
        # every case a new image, as a fleet's frames are; image_pool > 0: drawn from that many (most uploads are
        # then images the hub already holds, which it stores by reference)
        self.np_rng = np.random.default_rng(seed)
        self.pngs = [_png(self.np_rng) for _ in range(image_pool)]
        self.result = SoakResult(devices=devices, seconds=seconds)
        self.latencies: dict[str, list[float]] = {}
        self.statuses: Counter[str] = Counter()

    async def run(self) -> SoakResult:
        import httpx

        # one client, so one connection, per device, as each agent has its own: a single client shared by the
        # whole fleet spends most of the load generator's CPU assigning requests to its pooled connections (a
        # scan of every queued request against every connection), which delays the answers it measures. Idle
        # connections expire on the client first (uvicorn closes them after 5 s): otherwise a request sent just
        # as the server closes its keep-alive connection fails with a ReadError.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_S)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=self.url, timeout=30.0,
                                                                         limits=limits))
                       for _ in range(self.n)]
            tokens = []
            for i, client in enumerate(clients):  # enroll in order, so a slow start does not count as load
                tokens.append(await self._enroll(client, f"soak-{i:04d}"))
            deadline = time.monotonic() + self.seconds
            await asyncio.gather(*(self._device(clients[i], f"soak-{i:04d}", t, deadline, i)
                                   for i, t in enumerate(tokens) if t))
        r = self.result
        r.statuses = dict(sorted(self.statuses.items()))
        r.requests = sum(self.statuses.values())
        for kind, xs in self.latencies.items():
            xs.sort()
            r.latency_ms[f"{kind}_p50"] = round(1000 * xs[len(xs) // 2], 1)
            r.latency_ms[f"{kind}_p99"] = round(1000 * xs[min(len(xs) - 1, int(len(xs) * 0.99))], 1)
        # every request under load: enrollment runs before the load starts
        loaded = sorted(x for kind, xs in self.latencies.items() if kind != "enroll" for x in xs)
        if loaded:
            r.latency_ms["all_p50"] = round(1000 * loaded[len(loaded) // 2], 1)
            r.latency_ms["all_p99"] = round(1000 * loaded[min(len(loaded) - 1, int(len(loaded) * 0.99))], 1)
        return r

    async def _call(self, client: Any, kind: str, method: str, path: str, expect: tuple[int, ...],
                    **kw: Any) -> Any:
        import httpx

        self.result.by_kind[kind] = self.result.by_kind.get(kind, 0) + 1
        t0 = time.perf_counter()
        try:
            resp = await client.request(method, path, **kw)
        except httpx.TransportError as exc:
            self.result.transport_errors += 1
            self.statuses["transport"] += 1
            self._sample(f"{kind}: {type(exc).__name__}: {exc}")
            return None
        self.latencies.setdefault(kind, []).append(time.perf_counter() - t0)
        self.statuses[str(resp.status_code)] += 1
        if resp.status_code >= 500:
            self.result.server_errors += 1
            self._sample(f"{kind}: {resp.status_code} {resp.text[:200]}")
        elif resp.status_code not in expect:
            self.result.unexpected += 1
            self._sample(f"{kind}: {resp.status_code} {resp.text[:200]}")
        return resp

    def _sample(self, text: str) -> None:
        if len(self.result.error_samples) < 20:
            self.result.error_samples.append(text)

    async def _enroll(self, client: Any, device_id: str) -> str | None:
        r = await self._call(client, "enroll", "POST", "/v1/enroll", (200,),
                             json={"device_id": device_id, "fleet_secret": self.fleet_secret})
        return None if r is None or r.status_code != 200 else str(r.json()["token"])

    async def _device(self, client: Any, device_id: str, token: str, deadline: float, index: int) -> None:
        rng = random.Random(index)
        headers = {"Authorization": f"Bearer {token}"}
        boot = uuid.uuid4().hex
        counters = Counter[str]()
        sent: list[tuple[str, bytes]] = []
        await asyncio.sleep(rng.random() * self.period_s)  # spread the fleet over one period
        # and over the heartbeat and assignment cycles, as a running fleet is: were every device at action 0
        # together, the first period would carry a heartbeat, an assignment poll and a manifest from each
        phase = rng.randrange(CYCLE)
        for step in range(self.max_actions):
            tick = step + phase
            if time.monotonic() >= deadline:
                break
            t_next = time.monotonic() + self.period_s * (0.5 + rng.random())
            counters["frames_seen"] += 20
            if sent and rng.random() < 0.05:  # an uplink retry: the same case again
                text, png = rng.choice(sent)
                r = await self._post_case(client, headers, text, png)
                if r is not None and r.status_code == 200:
                    self.result.cases_repeated += 1
            else:
                text, png = self._case(device_id, rng)
                r = await self._post_case(client, headers, text, png)
                if r is not None and r.status_code == 201:
                    self.result.cases_stored += 1
                    counters["flagged"] += 1
                    counters["uploaded"] += 1
                    if len(sent) < 8:
                        sent.append((text, png))
            if tick % 3 == 0:
                hb = {"device_id": device_id, "sent_at": time.time(), "boot_id": boot, "model_version": MODEL_VERSION,
                      "counters": dict(counters), "spool_bytes": 0, "spool_items": 0,
                      "human_compared": counters["frames_seen"] // 2, "human_disagreed": counters["frames_seen"] // 9}
                await self._call(client, "heartbeat", "POST", "/v1/heartbeats", (204,), json=hb, headers=headers)
            if tick % 5 == 0:
                r = await self._call(client, "assignment", "GET", "/v1/assignment", (200,), headers=headers)
                if r is not None and r.status_code == 200 and tick % 20 == 0:
                    active = (r.json().get("active") or {}).get("version")
                    if active:
                        await self._call(client, "manifest", "GET", f"/v1/models/{active}/manifest", (200,),
                                         headers=headers)
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def _post_case(self, client: Any, headers: dict[str, str], text: str, png: bytes) -> Any:
        return await self._call(client, "case", "POST", "/v1/cases", (200, 201), headers=headers,
                                data={"case": text}, files={"image": ("frame.png", png, "image/png")})

    def _case(self, device_id: str, rng: random.Random) -> tuple[str, bytes]:
        png = self.pngs[rng.randrange(len(self.pngs))] if self.pngs else _png(self.np_rng)
        p = np.asarray([rng.random() + 0.01 for _ in range(3)])
        p = p / p.sum()
        emb = np.asarray([rng.gauss(0, 1) for _ in range(16)], np.float32)
        case = Case(case_id=uuid.uuid4().hex, device_id=device_id, captured_at=time.time(),
                    model_version=MODEL_VERSION, prediction=Classification(int(p.argmax()), [float(x) for x in p]),
                    image_sha256=hashlib.sha256(png).hexdigest(), image_size=len(png), priority=rng.random(),
                    scores={"entropy": float(-(p * np.log(p)).sum())},
                    triggers=[TriggerHit(name="entropy", value=0.9, threshold=0.5)], tags={"soak": "1"},
                    embedding=encode_embedding(emb))
        return case.to_json(), png


# ---------------------------------------------------------------------------------------------
# the run: hub, model, fleet, memory sampler
# ---------------------------------------------------------------------------------------------


def register_model(url: str, trainer: str, keypair: Any) -> None:
    """A signed model for the cases to name (the hub checks signatures and hashes, not the graph)."""
    import httpx

    from fleet.signing import load_private_key, sign_manifest

    onnx = b"soak-model-bytes" * 64
    manifest = ModelManifest(version=MODEL_VERSION, onnx_sha256=hashlib.sha256(onnx).hexdigest(), onnx_size=len(onnx),
                             input=InputSpec(height=16, width=16, channels=1, mean=[0.5], std=[0.25]),
                             class_names=["a", "b", "c"], embedding_dim=16, created_at=time.time())
    signed = sign_manifest(manifest, load_private_key(keypair.private_pem))
    h = {"Authorization": f"Bearer {trainer}"}
    r = httpx.post(url + "/v1/models", headers=h, files={"onnx": ("m.onnx", onnx)}, data={"manifest": signed.to_json()},
                   timeout=30)
    r.raise_for_status()


def count_cases(url: str, labeler: str) -> int:
    import httpx

    h = {"Authorization": f"Bearer {labeler}"}
    total = 0
    for state in ("unlabeled", "queued", "labeled", "held", "duplicate"):
        r = httpx.get(url + "/v1/pool", params={"state": state, "limit": 1}, headers=h, timeout=60)
        r.raise_for_status()
        total += int(r.json()["total"])
    return total


def soak(devices: int, seconds: float, *, workdir: Path, database_url: str | None = None, workers: int = 1,
         period_s: float = 1.0, sample_s: float = 2.0, warmup: float = 0.2,
         extra_env: dict[str, str] | None = None, image_pool: int = 0) -> SoakResult:
    """Run the whole soak; the hub is stopped before this returns. ``extra_env``: the hub's own settings (say an
    S3 blob store)."""
    import httpx

    from fleet.signing import generate_keypair
    from fleet.sim.procs import start_hub, stop_process

    keypair = generate_keypair()
    hub = start_hub(workdir / "hub", keypair, database_url=database_url, workers=workers, extra_env=extra_env)
    try:
        register_model(hub.url, hub.token("trainer"), keypair)
        httpx.post(f"{hub.url}/v1/models/{MODEL_VERSION}/promote", headers=hub.admin_headers,
                   timeout=30).raise_for_status()
        labeler = hub.token("labeler")
        fleet = Fleet(hub.url, hub.fleet_secret, devices, seconds, period_s=period_s, image_pool=image_pool)
        samples: list[tuple[float, float]] = []

        async def sampler(stop: asyncio.Event) -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((round(time.monotonic() - t0, 1), tree_rss_kib(hub.process.pid) / 1024))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), sample_s)

        async def main() -> SoakResult:
            stop = asyncio.Event()
            task = asyncio.create_task(sampler(stop))
            try:
                return await fleet.run()
            finally:
                stop.set()
                await task

        result = asyncio.run(main())
        result.cases_at_hub = count_cases(hub.url, labeler)
        result.backend = "postgresql" if database_url and database_url.startswith("postgresql") else "sqlite"
        result.workers = workers
        result.rss_mib = samples
        _memory(result, warmup)
        if hub.process.poll() is not None:
            result.unexpected += 1
            result.error_samples.append(f"the hub exited with {hub.process.returncode}")
        return result
    finally:
        stop_process(hub.process)


def _memory(r: SoakResult, warmup: float) -> None:
    """Growth: mean RSS of the last fifth of the samples against the first fifth after warm-up."""
    values = [m for _, m in r.rss_mib]
    if len(values) < 5:
        return
    steady = values[int(len(values) * warmup):]
    k = max(1, len(steady) // 5)
    r.rss_warm_mib = round(statistics.fmean(steady[:k]), 1)
    r.rss_end_mib = round(statistics.fmean(steady[-k:]), 1)
    r.rss_peak_mib = round(max(values), 1)
    r.rss_growth = round(r.rss_end_mib / r.rss_warm_mib - 1.0, 4) if r.rss_warm_mib else 0.0
    late = r.rss_mib[len(r.rss_mib) // 2:]
    if len(late) >= 3 and late[-1][0] > late[0][0]:
        t = np.array([x for x, _ in late]) / 60.0
        r.rss_late_slope = round(float(np.polyfit(t, np.array([m for _, m in late]), 1)[0]), 2)


def report(r: SoakResult, max_growth: float, max_late_slope: float = float("inf")) -> str:
    verdict = "PASS" if r.ok(max_growth, max_late_slope) else "FAIL"
    rate = r.requests / r.seconds if r.seconds else 0.0
    lat = ", ".join(f"{k} {v:g} ms" for k, v in sorted(r.latency_ms.items()))
    return (
        f"{verdict}: {r.devices} simulated devices for {r.seconds:.0f} s against one hub ({r.backend}, "
        f"{r.workers} worker(s)) on loopback.\n\n"
        f"| requests | req/s | 5xx | transport errors | unexpected statuses | cases stored (201) | retries answered "
        f"'already' | cases at hub | cases lost | hub RSS after warm-up | at end | peak | growth | "
        f"slope, 2nd half |\n"
        f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {r.requests} | {rate:.0f} | {r.server_errors} | {r.transport_errors} | {r.unexpected} | "
        f"{r.cases_stored} | {r.cases_repeated} | {r.cases_at_hub} | {r.cases_stored - r.cases_at_hub} | "
        f"{r.rss_warm_mib} MiB | {r.rss_end_mib} MiB | {r.rss_peak_mib} MiB | {100 * r.rss_growth:+.1f}% | "
        f"{r.rss_late_slope:+.2f} MiB/min |\n\n"
        f"Requests by kind: {json.dumps(r.by_kind, sort_keys=True)}; statuses: {json.dumps(r.statuses)}. "
        f"Latency: {lat}. RSS samples (s, MiB), every ~{max(1, len(r.rss_mib) // 12)}th: "
        f"{[(t, round(m, 1)) for t, m in r.rss_mib[:: max(1, len(r.rss_mib) // 12)]]}.\n"
        + _latency_verdict(r)
    )


def _latency_verdict(r: SoakResult) -> str:
    p99 = r.latency_ms.get("all_p99")
    if p99 is None:
        return ""
    met = "met" if p99 <= P99_TARGET_MS else "**not met**"
    return (f"\nEvery request under load (all kinds but enrollment, which runs before the load): p50 "
            f"{r.latency_ms['all_p50']:g} ms, p99 {p99:g} ms; issue 19's target p99 <= {P99_TARGET_MS:,} ms: {met}.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=200)
    dur = ap.add_mutually_exclusive_group()
    dur.add_argument("--minutes", type=float)
    dur.add_argument("--seconds", type=float)
    ap.add_argument("--period", type=float, default=2.0, help="mean seconds between one device's actions")
    ap.add_argument("--workers", type=int, default=1, help="hub worker processes")
    ap.add_argument("--image-pool", type=int, default=0,
                    help="draw case images from this many (default 0: every case a new image, as a fleet's frames)")
    ap.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite in the work dir)")
    ap.add_argument("--s3-endpoint", default=None, help="Keep the hub's blobs in an S3-compatible server at this URL "
                    "(a fresh bucket; credentials from boto3's chain) instead of its data folder")
    ap.add_argument("--max-growth", type=float, default=0.20, help="allowed RSS growth after warm-up")
    ap.add_argument("--max-late-slope", type=float, default=1.0,
                    help="allowed RSS slope over the second half of the run, MiB/min (steady memory)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the full result here")
    ap.add_argument("--append", type=Path, default=None, help="append a section to this RESULTS.md")
    args = ap.parse_args(argv)
    if args.devices < 1:
        ap.error(f"--devices must be >= 1; received {args.devices}")
    seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None else 10)
    if not 1 <= seconds <= 4 * 3600:
        ap.error(f"the soak must last 1 s to 4 h; received {seconds:g} s")
    extra_env = None
    if args.s3_endpoint:
        import secrets

        import boto3

        bucket = f"flywheel-soak-{secrets.token_hex(4)}"
        boto3.client("s3", endpoint_url=args.s3_endpoint).create_bucket(Bucket=bucket)
        extra_env = {"FLYWHEEL_HUB_BLOB_STORE": "s3", "FLYWHEEL_HUB_S3_BUCKET": bucket,
                     "FLYWHEEL_HUB_S3_ENDPOINT_URL": args.s3_endpoint}
    with tempfile.TemporaryDirectory(prefix="flywheel-soak-") as tmp:
        work = args.workdir or Path(tmp)
        r = soak(args.devices, seconds, workdir=work, database_url=args.database_url, workers=args.workers,
                 period_s=args.period, extra_env=extra_env, image_pool=args.image_pool)
    text = report(r, args.max_growth, args.max_late_slope)
    print(text)
    if r.error_samples:
        print("errors:", *r.error_samples, sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(asdict(r), indent=2))
    if args.append:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import append

        append(args.append, f"Soak: {r.devices} devices, {seconds / 60:g} min, {args.workers} worker(s)"
               + (", blobs in S3" if args.s3_endpoint else "")
               + (f", images from a pool of {args.image_pool}" if args.image_pool else ", a new image per case"), text)
    return 0 if r.ok(args.max_growth, args.max_late_slope) else 1


if __name__ == "__main__":
    raise SystemExit(main())
