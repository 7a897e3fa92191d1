"""Child processes for the kill -9 tests: they write in a loop until killed.

    python -m tests.edge.crashchild spool DB MAX_BYTES SEED
        put cases (random sizes and priorities), ack and drop some; print "put|ack|drop <case_id>" after
        each commit
    python -m tests.edge.crashchild ota ROOT PUBLIC_KEY MODELS_DIR SEED
        follow assignments that alternate between the published models, forever
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def spool_child(db: str, max_bytes: int, seed: int) -> None:
    from fleet.edge.spool import Spool

    rng = random.Random(seed)
    spool = Spool(db, max_bytes=max_bytes)
    n = 0
    while True:
        n += 1
        case_id = f"s{seed}-{n}"
        body = json.dumps({"case_id": case_id, "pad": "x" * rng.randint(10, 400)})
        image = bytes([n % 251]) * rng.randint(100, 6000)
        result = spool.put(case_id, round(rng.random(), 3), body, image)
        if result.stored:
            print(f"put {case_id}", flush=True)
        if rng.random() < 0.2:
            for item in spool.peek(2):
                if spool.ack(item.case_id):
                    print(f"ack {item.case_id}", flush=True)
        if rng.random() < 0.05:
            for item in spool.peek(1):
                if spool.drop(item.case_id):
                    print(f"drop {item.case_id}", flush=True)


def ota_child(root: str, public_key: str, models_dir: str, seed: int) -> None:
    import httpx

    from fleet.edge.hubclient import HubClient
    from fleet.edge.modelstore import ModelStore
    from fleet.edge.ota import OtaManager
    from fleet.protocol import Assignment

    published = {}
    for p in sorted(Path(models_dir).glob("*.json")):
        signed = json.loads(p.read_text())
        published[signed["manifest"]["version"]] = (p.read_text(), p.with_suffix(".onnx").read_bytes())

    def handle(request: httpx.Request) -> httpx.Response:
        _, _, _, version, what = request.url.path.split("/")
        manifest, onnx = published[version]
        return httpx.Response(200, content=manifest if what == "manifest" else onnx)

    client = HubClient(httpx.Client(base_url="http://hub", transport=httpx.MockTransport(handle)), token="t")
    ota = OtaManager(ModelStore(root, public_key), client, device_id="dev-1")
    ota.startup()
    rng = random.Random(seed)
    versions = sorted(published)
    while True:
        version = rng.choice(versions)
        sha = json.loads(published[version][0])["manifest"]["onnx_sha256"]
        challenger = rng.choice([None, *versions])
        ch = None
        if challenger is not None:
            ch = {"version": challenger, "onnx_sha256": json.loads(published[challenger][0])["manifest"]["onnx_sha256"]}
        ota.apply(Assignment.from_dict({"device_id": "dev-1", "active": {"version": version, "onnx_sha256": sha},
                                        "challenger": ch}))
        print(f"active {ota.models.versions[0]}", flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "spool":
        spool_child(args[0], int(args[1]), int(args[2]))
    elif mode == "ota":
        ota_child(args[0], args[1], args[2], int(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
