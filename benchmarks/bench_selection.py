"""Selection over a large pool (issue 19.3): the time and peak memory of one 1,000-case selection.

For each pool size (default 10k, 100k and 1M unlabeled cases; 64-d float16 embeddings; informativeness uniform
in [0, 1]) beside a labeled set (default 100k cases), a SQLite hub database is built once by bulk insert, with
one active model that captured every case. Then, for each similarity backend (FAISS, and numpy as the baseline
in the same run), a fresh process starts the hub in-process and times ``POST /v1/selections`` (budget 1000,
``uncertainty+diversity``) twice: cold (the worker indexes the labeled set, fleet.hub.labeled_set) and warm
(the index is kept; the labels are the same). Its peak resident memory (``ru_maxrss``) is reported.

Targets (issue 19.3): at 1M cases with 100k labeled, <= 30 s and <= 2 GiB peak hub memory.

    .venv/bin/python benchmarks/bench_selection.py --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import append  # noqa: E402

DIM = 64
VERSION = "bench-m1"
BUDGET = 1000
STRATEGY = "uncertainty+diversity"


def build(db: Path, n_pool: int, n_labeled: int, *, seed: int = 0, chunk: int = 50_000) -> float:
    """The hub database: an active model and ``n_pool`` unlabeled + ``n_labeled`` labeled cases; seconds taken."""
    import sqlalchemy as sa

    from fleet.hub.db import make_engine, migrate
    from fleet.hub.models import CaseRow, ModelVersion
    from fleet.protocol import Case, Classification, TriggerHit

    t0 = time.monotonic()
    engine = make_engine(f"sqlite:///{db}", pool_size=1)
    migrate(engine)
    now = time.time()
    manifest = {"version": VERSION, "task": "classify", "class_names": ["a", "b", "c"], "embedding_dim": DIM}
    with engine.begin() as conn:
        conn.execute(sa.insert(ModelVersion.__table__).values(  # type: ignore[attr-defined]
            version=VERSION, status="active", onnx_sha256="0" * 64, onnx_size=1,
            signed_manifest={"manifest": manifest, "signature": "", "key_id": ""}, class_names=["a", "b", "c"],
            embedding_dim=DIM, metrics={}, created_at=now, uploaded_at=now, status_changed_at=now, activated_at=now))
    template = Case(case_id="CASEID", device_id="bench-dev", captured_at=now, model_version=VERSION,
                    prediction=Classification(0, [0.5, 0.3, 0.2]), image_sha256="f" * 64, image_size=100,
                    triggers=[TriggerHit("entropy", 1.0, 0.5)]).to_dict()
    template["embedding"] = None
    text = json.dumps(template)
    rng = np.random.default_rng(seed)
    table = CaseRow.__table__  # type: ignore[attr-defined]
    total = n_pool + n_labeled
    with engine.begin() as conn:
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            emb = rng.normal(size=(n, DIM)).astype("<f2")
            unc = rng.random(n)
            rows = []
            for j in range(n):
                i = start + j
                cid = f"c{i:09d}"
                sha = f"{i:064x}"
                rows.append({
                    "case_id": cid, "device_id": "bench-dev", "captured_at": now, "received_at": now + i * 1e-6,
                    "model_version": VERSION, "task": "classify", "predicted_class": 0, "uncertainty": float(unc[j]),
                    "priority": 0.5, "campaign_id": None, "campaign_version": None,
                    "payload": json.loads(text.replace("CASEID", cid).replace("f" * 64, sha)),
                    "embedding": emb[j].tobytes(), "embedding_dim": DIM, "image_sha256": sha, "image_size": 100,
                    "duplicate_of": None, "state": "labeled" if i >= n_pool else "unlabeled", "selection_id": None,
                    "label": 0 if i >= n_pool else None, "label_payload": None, "label_status": None})
            conn.execute(sa.insert(table), rows)
    engine.dispose()
    return time.monotonic() - t0


def child(db: Path, backend: str) -> dict[str, object]:
    """In this (fresh) process: the hub in-process on ``db``, one selection cold and one warm."""
    from starlette.testclient import TestClient

    from fleet.hub.app import create_app
    from fleet.hub.settings import HubSettings
    from fleet.signing import generate_keypair

    data = db.parent / f"hub-{uuid.uuid4().hex[:6]}"
    data.mkdir()
    settings = HubSettings(dev=True, data_dir=data, database_url=f"sqlite:///{db}", similarity_search=backend,
                           signing_public_key=generate_keypair().public_b64, migrate_on_start=False,
                           max_selection_budget=10_000)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: dict[str, object] = {"backend": backend}
    with TestClient(create_app(settings)) as client:
        admin = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
        r = client.post("/v1/tokens", json={"scope": "labeler", "name": f"bench-{uuid.uuid4().hex[:8]}"}, headers=admin)
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        for run in ("cold", "warm"):
            t0 = time.monotonic()
            r = client.post("/v1/selections", json={"budget": BUDGET, "strategy": STRATEGY, "seed": 0,
                                                    "exclude_queued": False},
                            headers={"Authorization": f"Bearer {token}"})
            out[f"{run}_s"] = round(time.monotonic() - t0, 2)
            assert r.status_code == 200, r.text[:500]
            body = r.json()
            out["selected"], out["pool_size"] = len(body["cases"]), body["pool_size"]  # queued stay in the pool
    out["rss_start_mib"] = round(rss0)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--labeled", type=int, default=100_000)
    p.add_argument("--backends", nargs="+", default=["faiss", "numpy"])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--append", type=Path, default=None, help="Append the figures to this RESULTS.md.")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="faiss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.backend)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="fw-select-", dir=args.workdir) as tmp:
        for n in args.sizes:
            db = Path(tmp) / f"pool-{n}.db"
            built = build(db, n, args.labeled)
            row: dict[str, object] = {"pool": n, "labeled": args.labeled, "build_s": round(built, 1),
                                      "db_mib": round(db.stat().st_size / 2**20)}
            for backend in args.backends:
                run = subprocess.run([sys.executable, __file__, "--child", str(db), "--backend", backend],
                                     capture_output=True, text=True, timeout=3600)
                if run.returncode != 0:
                    raise SystemExit(f"selection at {n} cases ({backend}) failed:\n{run.stderr[-3000:]}")
                row[backend] = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            results.append(row)
            db.unlink()
    lines = ["| pool | labeled | backend | cold selection | warm selection | peak RSS | cases selected | "
             "vs numpy (cold) |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        base = r.get("numpy")
        for backend in args.backends:
            x = r[backend]
            assert isinstance(x, dict)
            ratio = f"{x['cold_s'] / base['cold_s']:.2f}x" if isinstance(base, dict) and base["cold_s"] else "-"
            lines.append(f"| {r['pool']:,} | {r['labeled']:,} | {backend} | {x['cold_s']} s | {x['warm_s']} s | "
                         f"{x['peak_rss_mib']} MiB | {x['selected']} | {ratio} |")
    big = [r for r in results if r["pool"] >= 1_000_000]
    verdicts = []
    for r in big:
        x = r[args.backends[0]]
        assert isinstance(x, dict)
        ok = float(x["cold_s"]) <= 30 and float(x["peak_rss_mib"]) <= 2048  # type: ignore[arg-type]
        verdicts.append(f"{r['pool']:,} cases with {args.backends[0]}: cold {x['cold_s']} s, peak "
                        f"{x['peak_rss_mib']} MiB: target <= 30 s and <= 2 GiB {'met' if ok else 'NOT met'}")
    body = "\n".join(lines) + ("\n\n" + "; ".join(verdicts) + "." if verdicts else "") + (
        f"\n\nSetup: a SQLite hub database per pool size (bulk insert, {DIM}-d float16 embeddings, informativeness "
        f"uniform, one active model that captured every case), the hub in-process in a fresh process per backend; "
        f"`POST /v1/selections` budget {BUDGET}, `{STRATEGY}`, which ranks the pool by informativeness in the "
        f"database and clusters the top {20_000:,} (`MAX_POOL`); cold = the worker indexes the labeled set first, "
        f"warm = the same request again with the index kept. Peak RSS is the whole process's (Python, the hub, "
        f"numpy, FAISS). Build times and database sizes: "
        + ", ".join(f"{r['pool']:,}: {r['build_s']} s, {r['db_mib']} MiB" for r in results) + ".\n")
    print(body)
    if args.append:
        append(args.append, "Selection over a large pool (issue 19.3)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
