"""The trainer across two machines, as the README documents it: two ``torchrun`` launchers, one a node, with a
static rendezvous on the first (here both on loopback, gloo on CPU), each with its own disk (``--out`` and
``--cache-dir`` of its own, as two hosts have), both reading the same snapshot of a real hub straight from its
object store (the real S3 server) and streaming it from mapped files (``--stream``); rank 0 alone evaluates,
exports and publishes, and the other node writes nothing of the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.data import digits_arrays
from tests.support.hub import REPO
from tests.support.s3 import new_bucket, s3_env, s3_url

from .support import bearer, digits_snapshot, restartable_hub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_on_two_nodes_trains_one_model_from_a_hub_snapshot_and_publishes_it(tmp_path: Path) -> None:
    bucket = new_bucket()
    with restartable_hub(tmp_path / "hub", extra_env=s3_env(bucket)) as hub:
        trainer, snap, _ = digits_snapshot(hub, tmp_path, "mn", 80)
        x, y = digits_arrays()
        key = tmp_path / "fleet.key"
        key.write_bytes(hub.keypair.private_pem)
        port = _free_port()
        procs = []
        for rank in (0, 1):
            node = tmp_path / f"node{rank}"
            base = node / "base.npz"  # each node has its own copy of the replay set, as two hosts would
            base.parent.mkdir(parents=True)
            np.savez(base, x_train=x[100:700], y_train=y[100:700], x_test=x[1500:1700], y_test=y[1500:1700])
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "training", "--data", f"hub:{hub.url}", "--snapshot", snap, "--base", f"npz:{base}",
                   "--replay-ratio", "0.5", "--out", str(node / "run"), "--cache-dir", str(node / "cache"),
                   "--stream", "--object-store", f"s3://{bucket}/blobs/",
                   "--epochs", "2", "--width", "4", "--threads", "1", "--version", "mn-v1", "--parent", "mn-m0",
                   "--sign-key", str(key), "--publish", hub.url, "--no-progress", "--no-int8"]
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FLYWHEEL_TOKEN": trainer,
                   "AWS_ENDPOINT_URL": s3_url()}
            procs.append(subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=400))
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
        report = json.loads((tmp_path / "node0" / "run" / "report.json").read_text())
        assert report["training"]["world_size"] == 2 and report["status"] == "published", report["status"]
        assert report["data"]["snapshot"]["id"] == snap and 0 < report["data"]["new"]["n"] <= 80, report["data"]
        assert report["data"]["snapshot"]["read_from"] == f"s3://{bucket}/blobs/" and report["data"]["streamed"]
        epoch = report["data"]["epoch_size"]
        assert [h["images"] for h in report["training"]["history"]] == [epoch, epoch]  # the two nodes' shards
        assert outs[0][0].count("mn-v1") >= 1 and "mn-v1" not in outs[1][0]  # rank 0 alone reports
        assert not (tmp_path / "node1" / "run").exists()  # the other node wrote nothing of the run
        for node in ("node0", "node1"):  # each read the snapshot itself, from the bucket, and decoded it to disk
            assert len(list((tmp_path / node / "cache" / "decoded").glob(f"{snap}-*.npy"))) == 2
        models = httpx.get(hub.url + "/v1/models", headers=bearer(trainer), timeout=30).json()["models"]
        assert {m["version"]: m["status"] for m in models}.get("mn-v1") in ("candidate", "canary", "active")
