"""An in-memory stand-in for the hub's trainer endpoints, served through httpx.MockTransport."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from fleet.protocol import (
    SCHEMA_VERSION,
    BankPublic,
    RolloutCreate,
    RolloutPublic,
    SignedManifest,
    SnapshotHeader,
    SnapshotPublic,
)
from tests.support.cases import make_case
from trigger import NoveltyBank


@dataclass
class FakeHub:
    """Cases with PNG blobs; records every request so tests can assert what was (not) posted."""

    cases: list[dict[str, Any]] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    bulk: bool = True
    fail_first: dict[str, int] = field(default_factory=dict)  # path -> how many 503s to answer first
    requests: list[tuple[str, str]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    banks: dict[str, bytes] = field(default_factory=dict)  # model version -> the .npz it was sent
    snapshots: dict[str, bytes] = field(default_factory=dict)
    announce_sha: str | None = None  # overrides the manifest sha the hub announces
    class_names: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])
    task: str = "classify"  # the snapshot's task; a detect case's label is a Detection as a dict

    def add_case(self, case_id: str, label: int | dict[str, Any], png: bytes,
                 tags: dict[str, str] | None = None) -> str:
        sha = hashlib.sha256(png).hexdigest()
        self.blobs[sha] = png
        self.cases.append({"case_id": case_id, "label": label, "tags": tags or {}, "image_sha256": sha,
                           "image_size": len(png), "model_version": "m0", "device_id": "dev-1", "captured_at": 1.0})
        return sha

    def posted(self, path: str) -> int:
        return sum(1 for m, p in self.requests if m == "POST" and p == path)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        path = request.url.path
        self.requests.append((request.method, path))
        if self.fail_first.get(path, 0) > 0:
            self.fail_first[path] -= 1
            return httpx.Response(503, json={"detail": "busy"})
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(401, json={"detail": "no token"})
        if request.method == "POST" and path == "/v1/snapshots":
            sid = f"snap-{len(self.snapshots) + 1}"
            body = self._manifest(sid, len(self.snapshots) + 1)
            self.snapshots[sid] = body
            sha = self.announce_sha or hashlib.sha256(body).hexdigest()
            return httpx.Response(201, content=SnapshotPublic(snapshot_id=sid, version=len(self.snapshots),
                                                              n_labels=len(self.cases), manifest_sha256=sha,
                                                              created_at=1.0).to_json())
        if request.method == "GET" and path.startswith("/v1/snapshots/") and path.endswith("/manifest"):
            sid = path.split("/")[3]
            if sid not in self.snapshots:
                return httpx.Response(404, json={"detail": f"no snapshot {sid}"})
            headers = {"content-type": "application/x-ndjson",
                       "X-Manifest-Sha256": self.announce_sha or hashlib.sha256(self.snapshots[sid]).hexdigest()}
            return httpx.Response(200, content=self.snapshots[sid], headers=headers)
        if request.method == "POST" and path == "/v1/blobs/bulk":
            if not self.bulk:
                return httpx.Response(404, json={"detail": "Not Found"})
            wanted = json.loads(request.content)["sha256s"]
            buf = io.BytesIO()
            missing = []
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for sha in wanted:
                    if sha not in self.blobs:
                        missing.append(sha)
                        continue
                    info = tarfile.TarInfo(f"{sha}.png")
                    info.size = len(self.blobs[sha])
                    tar.addfile(info, io.BytesIO(self.blobs[sha]))
            return httpx.Response(200, content=buf.getvalue(),
                                  headers={"content-type": "application/x-tar", "X-Missing": ",".join(missing)})
        if request.method == "GET" and path.startswith("/v1/blobs/"):
            sha = path.rsplit("/", 1)[1]
            if sha not in self.blobs:
                return httpx.Response(404, json={"detail": "no such blob"})
            return httpx.Response(200, content=self.blobs[sha], headers={"content-type": "image/png"})
        if request.method == "POST" and path == "/v1/models":
            parts = _multipart(request)
            signed = SignedManifest.from_json(parts["manifest"])
            onnx = parts["onnx"]
            if hashlib.sha256(onnx).hexdigest() != signed.manifest.onnx_sha256:
                return httpx.Response(400, json={"detail": "sha256 mismatch"})
            self.models[signed.manifest.version] = {"onnx": onnx, "manifest": signed}
            return httpx.Response(201, json={"version": signed.manifest.version, "status": "candidate"})
        if request.method == "PUT" and path.startswith("/v1/models/") and path.endswith("/novelty-bank"):
            version = path.split("/")[3]
            if version not in self.models:
                return httpx.Response(404, json={"detail": "unknown version"})
            bank = NoveltyBank.from_bytes(request.content)
            self.banks[version] = request.content
            return httpx.Response(201, content=BankPublic(
                bank_id=f"model-{version}", sha256=bank.sha256, size=len(request.content), n=len(bank), dim=bank.dim,
                created_at=1.0, model_version=version).to_json())
        if request.method == "POST" and path == "/v1/rollouts":
            body = RolloutCreate.from_json(request.content)
            if body.version not in self.models:
                return httpx.Response(404, json={"detail": "unknown version"})
            self.rollouts.append({"version": body.version, "stages": body.stages, "stage_seconds": body.stage_seconds})
            started = RolloutPublic(rollout_id=f"r{len(self.rollouts)}", kind="staged", version=body.version,
                                    state="running", stages=body.stages, stage=0, fraction=body.stages[0],
                                    stage_seconds=body.stage_seconds, created_at=0.0, stage_started_at=0.0)
            return httpx.Response(201, content=started.to_json())
        return httpx.Response(404, json={"detail": f"no route {request.method} {path}"})


    def _manifest(self, snapshot_id: str, version: int) -> bytes:
        """The hub's manifest (fleet.protocol.dataset): a header line, then an entry a case. Each entry is
        written from the test's dict as it stands, so a test can put a malformed label in it."""
        header = SnapshotHeader(snapshot_id=snapshot_id, version=version, task=self.task,
                                class_names=self.class_names, n_entries=len(self.cases), created_at=1.0)
        lines = [header.to_json()]
        k = len(self.class_names)
        for c in self.cases:
            label = c["label"] if isinstance(c["label"], dict) else {"task": "classify", "label": c["label"]}
            probs = [1.0 / k] * k
            case = replace(make_case(case_id=c["case_id"], device_id=c["device_id"], model_version=c["model_version"],
                                     probs=probs, image=b"png", captured_at=c["captured_at"], tags=c["tags"]),
                           image_sha256=c["image_sha256"], image_size=c["image_size"])  # as uploaded
            lines.append(json.dumps({"case": case.to_dict(), "label": label,
                                     "status": "accepted", "schema": SCHEMA_VERSION}))
        return ("\n".join(lines) + "\n").encode()


def _multipart(request: httpx.Request) -> dict[str, bytes]:
    """Split a multipart/form-data body into {field name: bytes}."""
    ctype = request.headers["content-type"]
    boundary = ctype.split("boundary=", 1)[1].encode()
    out = {}
    for part in request.content.split(b"--" + boundary):
        if b"\r\n\r\n" not in part:
            continue
        head, _, body = part.partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        out[name] = body.removesuffix(b"\r\n")
    return out
