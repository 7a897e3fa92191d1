"""Hub snapshots of ``detect`` labels for the trainer's tests, written with the wire contract's types.

The hub does not ingest detect cases yet (fleet/hub/ingest.py takes classify predictions only), so it cannot make a
snapshot of boxes. Until it does, these helpers write the snapshot's wire files themselves with
fleet.protocol's types (SnapshotHeader, SnapshotEntry and encode_manifest: the bytes the hub's
GET /v1/snapshots/{id}/manifest sends) and serve them, with the images, through httpx.MockTransport, because the
trainer's loader (training.snapshot.pull_snapshot) reads snapshots over HTTP only. Once the hub takes detect cases,
the tests should send them to the real hub in-process (tests/support/inproc.py) and this module should go.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile

import httpx

from fleet.protocol import BlobRequest, Box, Detection, SnapshotEntry, SnapshotHeader, SnapshotPublic, encode_manifest
from fleet.sim.scenes import digit_scenes
from tests.support.cases import make_case
from tests.support.data import png_bytes
from training.hub_client import HubClient

SNAPSHOT = "snap-1"


def detect_entries(n: int) -> tuple[list[SnapshotEntry], dict[str, bytes]]:
    """``n`` digit scenes (32x32) as accepted detect cases from ``dev-1`` tagged ``condition=fog``, and their PNGs
    by sha256; each box's class is its digit's parity (0 or 1)."""
    s = digit_scenes(n, seed=5, size=32)
    entries, blobs = [], {}
    for i in range(n):
        png = png_bytes(s.images[i])
        blobs[hashlib.sha256(png).hexdigest()] = png
        boxes = [Box(*map(float, b), label=int(c % 2)) for b, c in zip(s.boxes[i], s.labels[i], strict=True)]
        seen = make_case(case_id=f"c{i}", device_id="dev-1", model_version="det-0", probs=[0.5, 0.5], image=png,
                         captured_at=1.0, tags={"condition": "fog"})
        case = dataclasses.replace(seen, prediction=Detection([dataclasses.replace(b, score=0.5) for b in boxes]))
        entries.append(SnapshotEntry(case=case, label=Detection(boxes), status="accepted"))
    return entries, blobs


def snapshot_client(entries: list[SnapshotEntry], blobs: dict[str, bytes], *,
                    class_names: tuple[str, ...] = ("car", "person")) -> HubClient:
    """A trainer's client of a hub that holds one snapshot, :data:`SNAPSHOT` of ``entries`` (POST /v1/snapshots
    announces it), and its images (POST /v1/blobs/bulk)."""
    header = SnapshotHeader(snapshot_id=SNAPSHOT, version=1, task="detect", class_names=list(class_names),
                            n_entries=len(entries), created_at=1.0)
    manifest = encode_manifest(header, entries)
    sha = hashlib.sha256(manifest).hexdigest()

    def handle(request: httpx.Request) -> httpx.Response:
        route = (request.method, request.url.path)
        if route == ("POST", "/v1/snapshots"):
            made = SnapshotPublic(snapshot_id=SNAPSHOT, version=1, n_labels=len(entries), manifest_sha256=sha,
                                  created_at=1.0)
            return httpx.Response(201, content=made.to_json(), headers={"content-type": "application/json"})
        if route == ("GET", f"/v1/snapshots/{SNAPSHOT}/manifest"):
            return httpx.Response(200, content=manifest, headers={"X-Manifest-Sha256": sha})
        if route == ("POST", "/v1/blobs/bulk"):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for wanted in BlobRequest.from_json(request.read()).sha256s:
                    info = tarfile.TarInfo(f"{wanted}.png")
                    info.size = len(blobs[wanted])
                    tar.addfile(info, io.BytesIO(blobs[wanted]))
            return httpx.Response(200, content=buf.getvalue(), headers={"content-type": "application/x-tar"})
        return httpx.Response(404, json={"detail": f"no route {request.method} {request.url.path}"})

    return HubClient("http://hub", "tok", transport=httpx.MockTransport(handle), sleep=lambda _: None)
