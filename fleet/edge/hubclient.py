"""The device side of the hub's HTTP API (fleet.protocol.device).

The ``httpx.Client`` is passed in, so tests hand it a transport. Every answer maps onto fleet.errors
through :func:`fleet.errors.error_for_response`, as in every client (network faults, 408, 425, 429 and
5xx are retryable, with the hub's ``Retry-After``); an answer that does not follow the wire contract is a
:class:`ProtocolError`. The uplink retries what is retryable (:class:`fleet.edge.pacing.Backoff`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.errors import (
    FlywheelError,
    IntegrityError,
    ProtocolError,
    TransportError,
    Unauthorized,
    error_for_response,
    error_for_status,
)
from fleet.protocol import (
    Assignment,
    BatchReceipt,
    CampaignRefusal,
    CaseReceipt,
    Enrollment,
    EnrollRequest,
    Heartbeat,
    OtaReport,
    SignedManifest,
)

if TYPE_CHECKING:
    import httpx

MAX_MODEL_BYTES = 512 * 1024 * 1024


class HubClient:
    """Calls the hub as one device. Thread-safe (httpx.Client is)."""

    def __init__(self, http: httpx.Client, *, token: str | None = None) -> None:
        self.http = http
        self.token = token

    @classmethod
    def connect(
        cls, base_url: str, *, token: str | None = None, timeout_s: float = 10.0, transport: Any = None
    ) -> HubClient:
        import httpx

        http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport)
        return cls(http, token=token)

    def close(self) -> None:
        self.http.close()

    # -- endpoints ----------------------------------------------------------------------------

    def enroll(self, device_id: str, fleet_secret: str, group: str = "default", *, current_token: str | None = None,
               enrollment_token: str = "") -> Enrollment:
        """Enroll ``device_id``: with the fleet secret (a new id), an admin's ``enrollment_token``, or, to
        enroll an enrolled device again, its ``current_token`` (sent as the bearer)."""
        body = EnrollRequest(device_id, fleet_secret=fleet_secret, enrollment_token=enrollment_token, group=group)
        headers = {**_JSON, "Authorization": f"Bearer {current_token}"} if current_token else _JSON
        resp = self._call("POST", "/v1/enroll", content=body.to_json(), auth=False, headers=headers)
        return Enrollment.from_json(resp.content)

    def upload_case(self, case_json: str, image: bytes) -> CaseReceipt:
        """POST one case; ``created`` (201) and ``already`` (200) both count as delivered."""
        resp = self._call(
            "POST", "/v1/cases", data={"case": case_json}, files={"image": ("image.png", image, "image/png")}
        )
        return CaseReceipt.from_json(resp.content)

    def upload_cases(self, items: list[tuple[str, bytes]]) -> list[CaseReceipt | FlywheelError]:
        """POST several cases at once (``/v1/cases/batch``); one outcome per item, in order.

        An outcome is the receipt the single upload would give for a delivered case, or the error it
        would raise for a refused one (from the item's own status). A failure of the whole request raises
        as every call does; an answer that does not follow the contract is a :class:`ProtocolError`
        (nothing can be told about any item).
        """
        path = "/v1/cases/batch"
        files: list[tuple[str, Any]] = []
        for i, (case_json, image) in enumerate(items):
            files += [(f"case_{i}", (None, case_json.encode("utf-8"), "application/json")),
                      (f"image_{i}", (f"image_{i}.png", image, "image/png"))]
        resp = self._call("POST", path, files=files)
        results = BatchReceipt.from_json(resp.content).results
        if len(results) != len(items):
            raise ProtocolError(f"POST {path}: expected {len(items)} results; received {len(results)}")
        return [r if r.status != "rejected" else
                error_for_status(int(r.error_status or 422), f"POST {path} item {i} (case {r.case_id}): hub answered "
                                 f"{r.error_status}: {(r.error or '')[:500]}", retry_after=r.retry_after)
                for i, r in enumerate(results)]

    def send_heartbeat(self, heartbeat: Heartbeat) -> None:
        self._call("POST", "/v1/heartbeats", content=heartbeat.to_json(), headers=_JSON)

    def get_assignment(self) -> Assignment:
        """The device's assignment, with campaigns cut to the trigger kinds this agent evaluates (it tells the hub
        which, ``?triggers=``); ProtocolError if the hub's answer is malformed."""
        from trigger import TRIGGERS

        return Assignment.from_json(self._call("GET", "/v1/assignment",
                                               params={"triggers": ",".join(sorted(TRIGGERS))}).content)

    def get_manifest(self, version: str) -> SignedManifest:
        return SignedManifest.from_json(self._call("GET", f"/v1/models/{version}/manifest").content)

    def download_model(self, version: str, dest: Path, *, max_bytes: int = MAX_MODEL_BYTES) -> str:
        """Stream the ONNX bytes into ``dest`` (fsynced); return their sha256."""
        return self._download(f"/v1/models/{version}/onnx", dest, max_bytes=max_bytes)

    def download_novelty_bank(self, bank_id: str, dest: Path, *, max_bytes: int = 64 * 1024 * 1024) -> str:
        return self._download(f"/v1/novelty-banks/{bank_id}", dest, max_bytes=max_bytes)

    def send_ota_report(self, report: OtaReport) -> None:
        self._call("POST", "/v1/ota-reports", content=report.to_json(), headers=_JSON)

    def send_campaign_refusal(self, refusal: CampaignRefusal) -> None:
        self._call("POST", "/v1/campaign-refusals", content=refusal.to_json(), headers=_JSON)

    # -- plumbing -----------------------------------------------------------------------------

    def _headers(self, auth: bool, extra: dict[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if auth:
            if not self.token:
                raise Unauthorized("this device is not enrolled: run 'flywheel agent enroll' first")
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _call(self, method: str, path: str, *, auth: bool = True, headers: dict[str, str] | None = None,
              **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            resp = self.http.request(method, path, headers=self._headers(auth, headers), **kwargs)
        except httpx.TransportError as exc:  # connect, read, write, timeout, protocol
            raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        _raise_for_status(method, path, resp)
        return resp

    def _download(self, path: str, dest: Path, *, max_bytes: int) -> str:
        import httpx

        h = hashlib.sha256()
        size = 0
        try:
            with self.http.stream("GET", path, headers=self._headers(True, None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for_status("GET", path, resp)
                with dest.open("wb") as fh:
                    for chunk in resp.iter_bytes(1 << 16):
                        size += len(chunk)
                        if size > max_bytes:
                            raise IntegrityError(f"GET {path}: more than {max_bytes} bytes; refusing")
                        h.update(chunk)
                        fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
        except httpx.TransportError as exc:
            raise TransportError(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        return h.hexdigest()


_JSON = {"Content-Type": "application/json"}


def _raise_for_status(method: str, path: str, resp: httpx.Response) -> None:
    err = error_for_response(resp, f"{method} {path}")
    if err is not None:
        raise err
