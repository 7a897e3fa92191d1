"""The trainer's HTTP client for the hub (httpx): snapshots, blobs, the model registry, rollouts.

Pass ``transport=httpx.MockTransport(...)`` in tests. Responses map onto fleet.errors: 5xx and 429
become :class:`ServerBusy` and broken connections :class:`TransportError` (both retried a few times);
401/403 become :class:`Unauthorized`; other 4xx become :class:`InvalidInput` carrying the hub's detail.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from fleet.errors import (
    FlywheelError,
    IntegrityError,
    InvalidInput,
    RetryableError,
    ServerBusy,
    TransportError,
    Unauthorized,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "FLYWHEEL_TOKEN"


class HubClient:
    """A thin, retrying client for the hub's trainer endpoints (see .notes/HUB_API.md, "Trainer")."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self._retries = retries
        self._sleep = sleep

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- snapshots and blobs -----------------------------------------------------------------

    def create_snapshot(self, name: str | None = None) -> dict[str, Any]:
        """POST /v1/snapshots -> {snapshot_id, version, n_labels, manifest_sha256}."""
        body = {"name": name} if name else {}
        data: dict[str, Any] = self._request("POST", "/v1/snapshots", json=body).json()
        return data

    def snapshot_manifest(self, snapshot_id: str) -> tuple[bytes, str | None]:
        """GET /v1/snapshots/{id}/manifest -> (raw JSONL bytes, the sha256 the hub states in X-Manifest-Sha256)."""
        resp = self._request("GET", f"/v1/snapshots/{snapshot_id}/manifest")
        return resp.content, resp.headers.get("X-Manifest-Sha256")

    def blobs_bulk(self, sha256s: list[str]) -> tuple[dict[str, bytes], list[str]]:
        """POST /v1/blobs/bulk -> ({sha256: bytes}, missing); raises NotImplementedError if the hub lacks it."""
        resp = self._request("POST", "/v1/blobs/bulk", json={"sha256s": sha256s}, allow=(404, 405))
        if resp.status_code in (404, 405) and not resp.headers.get("content-type", "").startswith("application/x-tar"):
            raise NotImplementedError("the hub does not serve /v1/blobs/bulk")
        missing = [s for s in resp.headers.get("X-Missing", "").replace(";", ",").split(",") if s.strip()]
        found: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[member.name.rsplit("/", 1)[-1].removesuffix(".png")] = fh.read()
        except tarfile.TarError as exc:
            raise IntegrityError(f"/v1/blobs/bulk answered a broken tar archive ({exc})") from exc
        return found, [m.strip() for m in missing]

    def blob(self, sha256: str) -> bytes | None:
        """GET /v1/blobs/{sha256} -> the bytes, or None when the hub answers 404."""
        resp = self._request("GET", f"/v1/blobs/{sha256}", allow=(404,))
        return None if resp.status_code == 404 else resp.content

    # --- models and rollouts -----------------------------------------------------------------

    def upload_model(self, onnx: bytes, signed_manifest_json: str) -> dict[str, Any]:
        """POST /v1/models (multipart onnx + manifest) -> {version, status}."""
        files = {
            "onnx": ("model.onnx", onnx, "application/octet-stream"),
            "manifest": ("manifest.json", signed_manifest_json.encode(), "application/json"),
        }
        data: dict[str, Any] = self._request("POST", "/v1/models", files=files).json()
        return data

    def start_rollout(
        self, version: str, stages: Iterable[float], stage_seconds: float | None = None
    ) -> dict[str, Any]:
        """POST /v1/rollouts -> {rollout_id, ...}."""
        body: dict[str, Any] = {"version": version, "stages": list(stages)}
        if stage_seconds is not None:
            body["stage_seconds"] = stage_seconds
        data: dict[str, Any] = self._request("POST", "/v1/rollouts", json=body).json()
        return data

    def list_models(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", "/v1/models").json()
        return data

    # --- plumbing ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, allow: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        last: FlywheelError | None = None
        for attempt in range(self._retries):
            try:
                resp = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = TransportError(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}")
            else:
                if resp.status_code in allow or resp.is_success:
                    return resp
                try:
                    _raise_for(resp, method, path)
                except RetryableError as exc:
                    last = exc
            if attempt + 1 < self._retries:
                delay = 0.25 * 2**attempt
                log.warning("%s; retrying in %.2fs", last, delay)
                self._sleep(delay)
        assert last is not None
        raise last


def _raise_for(resp: httpx.Response, method: str, path: str) -> None:
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        detail = resp.text
    where = f"{method} {path} -> {resp.status_code}"
    if resp.status_code == 429 or resp.status_code >= 500:
        raise ServerBusy(f"{where}: {detail}")
    if resp.status_code in (401, 403):
        raise Unauthorized(f"{where}: {detail} (is --token / {TOKEN_ENV} a trainer-scope token?)")
    if resp.status_code == 422 and path == "/v1/models":
        raise IntegrityError(f"{where}: {detail}")
    raise InvalidInput(f"{where}: {json.dumps(detail) if not isinstance(detail, str) else detail}")
