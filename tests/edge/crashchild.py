"""Child processes for the kill -9 tests: they write in a loop until killed.

    python -m tests.edge.crashchild spool DB MAX_BYTES SEED
        put cases (random sizes and priorities), ack and drop some; print "put|ack|drop <case_id>" after
        each commit
    python -m tests.edge.crashchild ota ROOT PUBLIC_KEY HUB_URL TOKEN VERSIONS SEED
        follow assignments that alternate between the models VERSIONS (comma-separated) registered at the hub
        on HUB_URL (dev-1's TOKEN), downloading them from it, forever
"""

from __future__ import annotations

import json
import random
import sys


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


def ota_child(root: str, public_key: str, hub_url: str, token: str, versions: str, seed: int) -> None:
    import httpx

    from fleet.edge.hubclient import HubClient
    from fleet.edge.modelstore import ModelStore
    from fleet.edge.ota import OtaManager
    from fleet.protocol import Assignment

    client = HubClient(httpx.Client(base_url=hub_url, timeout=30), token=token)
    names = sorted(versions.split(","))
    shas = {v: client.get_manifest(v).manifest.onnx_sha256 for v in names}
    ota = OtaManager(ModelStore(root, public_key), client, device_id="dev-1")
    ota.startup()
    rng = random.Random(seed)
    while True:
        version = rng.choice(names)
        challenger = rng.choice([None, *names])
        ch = None if challenger is None else {"version": challenger, "onnx_sha256": shas[challenger]}
        ota.apply(Assignment.from_dict({"device_id": "dev-1", "active": {"version": version,
                                                                         "onnx_sha256": shas[version]},
                                        "challenger": ch}))
        print(f"active {ota.models.versions[0]}", flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "spool":
        spool_child(args[0], int(args[1]), int(args[2]))
    elif mode == "ota":
        ota_child(args[0], args[1], args[2], args[3], args[4], int(args[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
