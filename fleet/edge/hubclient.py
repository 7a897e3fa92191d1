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

from fleet.errors import (
    FlywheelError,
    IntegrityError,
    InvalidInput,
    ProtocolError,
    ServerBusy,
    TransportError,
    Unauthorized,
)
from fleet.protocol import Assignment, Enrollment, Heartbeat, OtaReport, SignedManifest

if TYPE_CHECKING:
    import httpx

RETRYABLE_STATUS = frozenset({408, 425, 429})
NO_ROUTE_STATUS = frozenset({404, 405})  # what a hub without an endpoint answers (405: a GET route shares the path)
BATCH_STATUSES = frozenset({"created", "already", "duplicate", "rejected"})
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
        body = {"device_id": device_id, "fleet_secret": fleet_secret, "group": group}
        if enrollment_token:
            body["enrollment_token"] = enrollment_token
        headers = {"Authorization": f"Bearer {current_token}"} if current_token else None
        resp = self._call("POST", "/v1/enroll", json=body, auth=False, headers=headers)
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

    def upload_cases(self, items: list[tuple[str, bytes]]) -> list[dict[str, Any] | FlywheelError] | None:
        """POST several cases at once (``/v1/cases/batch``); one outcome per item, in order.

        An outcome is the answer the single upload would give for a delivered case (``already`` set
        when the hub had it), or the error it would raise for a refused one (:class:`InvalidInput`,
        :class:`Unauthorized` or :class:`ServerBusy`, from the item's own status). None: this hub has
        no batch endpoint (an older hub), so send the items one by one. A failure of the whole
        request raises as every call does; an answer that does not follow the contract is a
        :class:`ProtocolError` (nothing can be told about any item).
        """
        import httpx

        path = "/v1/cases/batch"
        files: list[tuple[str, Any]] = []
        for i, (case_json, image) in enumerate(items):
            files += [(f"case_{i}", (None, case_json.encode("utf-8"), "application/json")),
                      (f"image_{i}", (f"image_{i}.png", image, "image/png"))]
        try:
            resp = self.http.request("POST", path, headers=self._headers(True, None), files=files)
        except httpx.TransportError as exc:
            raise TransportError(f"POST {path}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code in NO_ROUTE_STATUS:
            return None
        _raise_for_status("POST", path, resp)
        return _batch_outcomes(path, resp, items)

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
    raise error_for_status(code, f"{method} {path}: hub answered {code}: {_detail(resp)}")


def error_for_status(code: int, what: str) -> FlywheelError:
    """The error a refusal with HTTP status ``code`` maps onto (retryable, unauthorized, or invalid)."""
    if code in (401, 403):
        return Unauthorized(what)
    if code in RETRYABLE_STATUS or code >= 500:
        return ServerBusy(what)
    return InvalidInput(what)


def _batch_outcomes(path: str, resp: httpx.Response, items: list[tuple[str, bytes]]
                    ) -> list[dict[str, Any] | FlywheelError]:
    try:
        results = resp.json()["results"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError(f"POST {path}: expected a JSON object with 'results'; received "
                            f"{resp.text[:200]!r}") from None
    if not isinstance(results, list) or len(results) != len(items):
        raise ProtocolError(f"POST {path}: expected {len(items)} results; received {str(results)[:200]}")
    out: list[dict[str, Any] | FlywheelError] = []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or r.get("status") not in BATCH_STATUSES:
            raise ProtocolError(f"POST {path}: result {i} must be an object with status one of "
                                f"{sorted(BATCH_STATUSES)}; received {str(r)[:200]}")
        if r["status"] != "rejected":
            out.append({"case_id": r.get("case_id"), "duplicate_of": r.get("duplicate_of"),
                        "already": r["status"] == "already"})
            continue
        raw = r.get("error")
        err: dict[str, Any] = raw if isinstance(raw, dict) else {}
        code = err.get("status")
        if not isinstance(code, int) or not 400 <= code <= 599:
            raise ProtocolError(f"POST {path}: rejected result {i} needs error.status, an HTTP status; "
                                f"received {str(r)[:200]}")
        out.append(error_for_status(code, f"POST {path} item {i} (case {r.get('case_id')}): hub answered "
                                          f"{code}: {str(err.get('detail'))[:500]}"))
    return out


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:300]
