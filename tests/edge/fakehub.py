"""An in-memory hub speaking the device half of the HTTP contract, behind an ``httpx.MockTransport``.

Faults are injected per request: ``fail`` decides, for each request, whether to answer with a
connection error or a status code instead of the real answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import httpx

from fleet.edge.hubclient import HubClient
from fleet.protocol import BatchReceipt, Case, CaseReceipt, Heartbeat, OtaReport


class FakeHub:
    def __init__(self, *, device_id: str = "dev-1", token: str = "device-token", public_key: str = "",
                 fleet_secret: str = "fleet-secret") -> None:
        self.device_id = device_id
        self.token = token
        self.public_key = public_key
        self.fleet_secret = fleet_secret
        self.lock = threading.Lock()
        self.cases: dict[str, tuple[Case, bytes]] = {}
        self.case_posts: list[str] = []  # every accepted POST /v1/cases, duplicates included
        self.heartbeats: list[Heartbeat] = []
        self.ota_reports: list[OtaReport] = []
        self.assignment: Any = {"device_id": device_id, "active": None, "campaigns": []}
        self.models: dict[str, tuple[str, bytes]] = {}  # version -> (signed manifest JSON, onnx bytes)
        self.banks: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.enrolled: set[str] = set()  # device ids enrolled so far (the fleet secret enrolls new ones only)
        # fault injection: return an exception to raise, an int status, or None to answer normally
        self.fail: Callable[[httpx.Request], Exception | int | None] = lambda request: None
        # per-case refusal (single and batch alike): a 4xx status to refuse the case with, or None to take it
        self.reject: Callable[[Case], int | None] = lambda case: None
        self.batch = True  # False: an older hub without POST /v1/cases/batch (answers 404)
        self.max_batch_cases = 64
        self.batch_sizes: list[int] = []  # cases per accepted batch request

    # -- helpers for tests --------------------------------------------------------------------

    def publish(self, signed_json: str, onnx: bytes) -> None:
        version = json.loads(signed_json)["manifest"]["version"]
        self.models[version] = (signed_json, onnx)

    def assign(self, active: Any = None, challenger: Any = None, campaigns: list[Any] | None = None) -> None:
        def ref(m: Any) -> Any:
            if m is None or isinstance(m, dict):
                return m
            return {"version": m.version, "onnx_sha256": m.onnx_sha256}

        self.assignment = {
            "device_id": self.device_id, "active": ref(active), "challenger": ref(challenger),
            "campaigns": campaigns or [],
        }

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self, token: str | None = None) -> HubClient:
        http = httpx.Client(base_url="http://hub.test", transport=self.transport())
        return HubClient(http, token=self.token if token is None else token)

    # -- the API ------------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        with self.lock:
            self.requests.append(f"{request.method} {path}")
        fault = self.fail(request)
        if isinstance(fault, Exception):
            raise fault
        if isinstance(fault, int):
            return httpx.Response(fault, json={"detail": "injected fault"})
        if path == "/v1/enroll":  # like the hub: the fleet secret enrolls new ids; the device's token, itself
            body = json.loads(request.content)
            own = request.headers.get("Authorization") == f"Bearer {self.token}"
            if not own and body.get("fleet_secret") != self.fleet_secret:
                return httpx.Response(401, json={"detail": "bad fleet secret"})
            if not own and body["device_id"] in self.enrolled:
                return httpx.Response(409, json={"detail": f"device {body['device_id']!r} is already enrolled"})
            self.enrolled.add(body["device_id"])
            return httpx.Response(200, json={"device_id": body["device_id"], "token": self.token,
                                             "fleet_public_key": self.public_key, "hub_time": 0.0})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"detail": "unknown token"})
        if path == "/v1/cases" and request.method == "POST":
            return self._case(request)
        if path == "/v1/cases/batch" and request.method == "POST" and self.batch:
            return self._batch(request)
        if path == "/v1/heartbeats":
            with self.lock:
                self.heartbeats.append(Heartbeat.from_json(request.content))
            return httpx.Response(204)
        if path == "/v1/ota-reports":
            with self.lock:
                self.ota_reports.append(OtaReport.from_json(request.content))
            return httpx.Response(204)
        if path == "/v1/assignment":
            body = self.assignment if isinstance(self.assignment, str) else json.dumps(self.assignment)
            return httpx.Response(200, content=body, headers={"Content-Type": "application/json"})
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["v1", "models"] and parts[2] in self.models:
            manifest, onnx = self.models[parts[2]]
            if parts[3] == "manifest":
                return httpx.Response(200, content=manifest, headers={"Content-Type": "application/json"})
            if parts[3] == "onnx":
                return httpx.Response(200, content=onnx, headers={"Content-Type": "application/octet-stream"})
        if len(parts) == 3 and parts[:2] == ["v1", "novelty-banks"] and parts[2] in self.banks:
            return httpx.Response(200, content=self.banks[parts[2]])
        return httpx.Response(404, json={"detail": f"no route {request.method} {path}"})

    def _case(self, request: httpx.Request) -> httpx.Response:
        fields = parse_multipart(request)
        status, receipt = self._store(fields["case"], fields["image"])
        if receipt.status == "rejected":
            return httpx.Response(status, json={"detail": receipt.error})
        return httpx.Response(status, content=receipt.to_json(), headers={"Content-Type": "application/json"})

    def _batch(self, request: httpx.Request) -> httpx.Response:
        fields = parse_multipart(request)
        n = len(fields) // 2
        if not fields or set(fields) != {f"{k}_{i}" for i in range(n) for k in ("case", "image")}:
            return httpx.Response(422, json={"detail": f"expected case_i/image_i pairs; received {sorted(fields)}"})
        if n > self.max_batch_cases:
            return httpx.Response(413, json={"detail": f"a batch carries at most {self.max_batch_cases} cases"})
        results = [self._store(fields[f"case_{i}"], fields[f"image_{i}"])[1] for i in range(n)]
        with self.lock:
            self.batch_sizes.append(n)
        return httpx.Response(200, content=BatchReceipt(results).to_json(),
                              headers={"Content-Type": "application/json"})

    def _store(self, case_json: bytes, png: bytes) -> tuple[int, CaseReceipt]:
        """One case, as the hub takes it from either endpoint: (status, receipt)."""
        import hashlib

        case = Case.from_json(case_json)
        if hashlib.sha256(png).hexdigest() != case.image_sha256:
            return 400, CaseReceipt(case.case_id, "rejected", error_status=400,
                                    error="image sha256 does not match the case")
        refused = self.reject(case)
        if refused is not None:
            return refused, CaseReceipt(case.case_id, "rejected", error_status=refused,
                                        error=f"case refused with {refused} by the test")
        with self.lock:
            self.case_posts.append(case.case_id)
            if case.case_id in self.cases:
                return 200, CaseReceipt(case.case_id, "already")
            self.cases[case.case_id] = (case, png)
        return 201, CaseReceipt(case.case_id, "created")


def parse_multipart(request: httpx.Request) -> dict[str, bytes]:
    ctype = request.headers["Content-Type"].encode()
    msg = BytesParser(policy=default_policy).parsebytes(b"Content-Type: " + ctype + b"\r\n\r\n" + request.read())
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[str(name)] = part.get_payload(decode=True)
    return out
