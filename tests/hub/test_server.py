"""The real server: `flywheel hub serve` as a process on loopback, driven over HTTP like the fleet does."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet.protocol import Case, Heartbeat
from tests.hub.conftest import png_bytes
from tests.support.cases import make_case
from tests.support.hub import REPO, RunningHub, start_hub
from tests.support.models import make_model_files

pytestmark = pytest.mark.integration


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> RunningHub:
    with start_hub(tmp_path / "hub", database_url=database_url) as hub:
        yield hub  # type: ignore[misc]


def _case(device: str, i: int) -> tuple[Case, bytes]:
    image = png_bytes(1000 + i)
    rng = np.random.default_rng(i)
    p = rng.dirichlet(np.ones(3))
    case = make_case(case_id=f"{device}-{i}", device_id=device, captured_at=1.0, model_version="m1",
                     probs=[float(x) for x in p], image=image, embedding=rng.normal(size=16))
    return case, image


def test_fleet_round_trip_over_real_http(server: RunningHub, tmp_path: Path) -> None:
    round_trip(server, tmp_path)


def test_fleet_round_trip_with_the_blobs_in_an_s3_bucket(database_url: str, tmp_path: Path) -> None:
    """The same, the hub configured by environment to keep images and models in a real S3-compatible server: every
    byte lands in the bucket, none on the hub's disk."""
    from tests.support.s3 import new_bucket, s3_client, s3_env

    bucket = new_bucket()
    with start_hub(tmp_path / "hub", database_url=database_url, extra_env=s3_env(bucket)) as server:
        round_trip(server, tmp_path)
        model = httpx.get(server.url + "/v1/models/m1/onnx", headers=server.admin_headers, timeout=30)
        assert model.status_code == 200 and model.content == (tmp_path / "m" / "m1.onnx").read_bytes()
    keys = [o["Key"] for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert len(keys) == 41 and all(k.startswith("blobs/") for k in keys)  # 40 images and the model
    blob_dir = tmp_path / "hub" / "blobs"
    assert not blob_dir.exists() or not [p for p in blob_dir.rglob("*") if p.is_file()]


def round_trip(server: RunningHub, tmp_path: Path) -> None:
    trainer = {"Authorization": f"Bearer {server.token('trainer')}"}
    files = make_model_files(tmp_path / "m", "m1", private_key=server.private_key())
    r = httpx.post(server.url + "/v1/models", headers=trainer, data={"manifest": files.signed.to_json()},
                   files={"onnx": ("m.onnx", files.onnx_path.read_bytes())})
    assert r.status_code == 201, r.text
    assert httpx.post(server.url + "/v1/models/m1/promote", headers=server.admin_headers).status_code == 200

    enrolled = httpx.post(server.url + "/v1/enroll", json={"device_id": "cam-1", "fleet_secret": server.fleet_secret})
    assert enrolled.status_code == 200
    dev = {"Authorization": f"Bearer {enrolled.json()['token']}"}

    def send(i: int) -> int:
        case, image = _case("cam-1", i)
        return httpx.post(server.url + "/v1/cases", headers=dev, data={"case": case.to_json()},
                          files={"image": ("f.png", image, "image/png")}, timeout=30).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, range(40)))
    assert codes == [201] * 40
    assert send(0) == 200  # idempotent

    hb = Heartbeat(device_id="cam-1", sent_at=1.0, boot_id="b1", model_version="m1", counters={"frames_seen": 10})
    r = httpx.post(server.url + "/v1/heartbeats", headers={**dev, "Content-Type": "application/json"},
                   content=hb.to_json())
    assert r.status_code == 204
    a = httpx.get(server.url + "/v1/assignment", headers=dev).json()
    assert a["active"]["version"] == "m1"

    labeler = {"Authorization": f"Bearer {server.token('labeler')}"}
    sel = httpx.post(server.url + "/v1/selections", headers=labeler, json={"budget": 5}).json()
    assert len(sel["cases"]) == 5
    img = httpx.get(sel["cases"][0]["image_url"])  # signed link, no bearer
    assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
    summary = httpx.get(server.url + "/v1/summary", headers=trainer).json()
    assert summary["models"]["m1"]["cases"] == 40 and summary["queues"]["queued"] == 5


def test_production_hub_refuses_default_secrets(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fleet.cli", "hub", "serve", "--data-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "refusing to start outside dev mode" in proc.stderr
