"""The device side of the hub's HTTP API (the "Devices" section of the hub contract).

The ``httpx.Client`` is passed in, so tests hand it an ``httpx.MockTransport``. Every failure is
mapped onto fleet.errors: network faults, 5xx, 408 and 429 are retryable; 401/403 are
:class:`Unauthorized`; any other 4xx is :class:`InvalidInput` carrying the hub's ``detail``; an answer
that does not follow the wire contract is a :class:`ProtocolError`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.errors import IntegrityError, InvalidInput, ServerBusy, TransportError, Unauthorized
from fleet.protocol import Assignment, Enrollment, Heartbeat, OtaReport, SignedManifest

if TYPE_CHECKING:
    import httpx

RETRYABLE_STATUS = frozenset({408, 425, 429})
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

    def enroll(self, device_id: str, fleet_secret: str, group: str = "default") -> Enrollment:
        body = {"device_id": device_id, "fleet_secret": fleet_secret, "group": group}
        resp = self._call("POST", "/v1/enroll", json=body, auth=False)
        return Enrollment.from_json(resp.content)

    def upload_case(self, case_json: str, image: bytes) -> dict[str, Any]:
        """POST one case; 201 (new) and 200 (already there) both count as delivered."""
        resp = self._call(
            "POST", "/v1/cases", data={"case": case_json}, files={"image": ("image.png", image, "image/png")}
        )
        try:
            out = resp.json()
        except ValueError:
            out = {}
        return out if isinstance(out, dict) else {}

    def send_heartbeat(self, heartbeat: Heartbeat) -> None:
        self._call("POST", "/v1/heartbeats", content=heartbeat.to_json(), headers=_JSON)

    def get_assignment(self) -> Assignment:
        """The device's assignment; ProtocolError if the hub's answer is malformed."""
        return Assignment.from_json(self._call("GET", "/v1/assignment").content)

    def get_manifest(self, version: str) -> SignedManifest:
        return SignedManifest.from_json(self._call("GET", f"/v1/models/{version}/manifest").content)

    def download_model(self, version: str, dest: Path, *, max_bytes: int = MAX_MODEL_BYTES) -> str:
        """Stream the ONNX bytes into ``dest`` (fsynced); return their sha256."""
        return self._download(f"/v1/models/{version}/onnx", dest, max_bytes=max_bytes)

    def download_novelty_bank(self, bank_id: str, dest: Path, *, max_bytes: int = 64 * 1024 * 1024) -> str:
        return self._download(f"/v1/novelty-banks/{bank_id}", dest, max_bytes=max_bytes)

    def send_ota_report(self, report: OtaReport) -> None:
        self._call("POST", "/v1/ota-reports", content=report.to_json(), headers=_JSON)

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
                if resp.status_code >= 300:
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
    code = resp.status_code
    if code < 300:
        return
    detail = _detail(resp)
    what = f"{method} {path}: hub answered {code}: {detail}"
    if code in (401, 403):
        raise Unauthorized(what)
    if code in RETRYABLE_STATUS or code >= 500:
        raise ServerBusy(what)
    raise InvalidInput(what)


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:300]
