"""The trainer's HTTP client for the hub (httpx): snapshots, blobs, the model registry, rollouts.

Pass ``transport=httpx.MockTransport(...)`` in tests. Answers map onto fleet.errors through
:func:`fleet.errors.error_for_response` and retryable faults are retried by :class:`fleet.retry.RetryPolicy`,
as in every client.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from fleet.errors import IntegrityError, TransportError, Unauthorized, error_for_response
from fleet.protocol import (
    BankPublic,
    BlobRequest,
    Message,
    ModelList,
    ModelPublic,
    ModelReceipt,
    RolloutCreate,
    RolloutList,
    RolloutPublic,
    SnapshotCreate,
    SnapshotList,
    SnapshotPublic,
)
from fleet.retry import RetryPolicy

log = logging.getLogger(__name__)

TOKEN_ENV = "FLYWHEEL_TOKEN"


class HubClient:
    """A thin, retrying client for the hub's trainer endpoints (fleet.protocol.dataset and .registry list them)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self._retry = retry or RetryPolicy(attempts=3, base_s=0.25, cap_s=2.0, deadline_s=60.0)
        self._sleep = sleep

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- snapshots and blobs -----------------------------------------------------------------

    def create_snapshot(self, name: str | None = None) -> SnapshotPublic:
        """POST /v1/snapshots: freeze the hub's accepted and gold labels."""
        resp = self._request("POST", "/v1/snapshots", **_json_body(SnapshotCreate(name=name)))
        return SnapshotPublic.from_json(resp.content)

    def list_snapshots(self) -> list[SnapshotPublic]:
        """GET /v1/snapshots: every snapshot, oldest first, with its manifest's sha256."""
        return SnapshotList.from_json(self._request("GET", "/v1/snapshots").content).snapshots

    def snapshot_manifest(self, snapshot_id: str) -> tuple[bytes, str | None]:
        """GET /v1/snapshots/{id}/manifest -> (raw JSONL bytes, the sha256 the hub states in X-Manifest-Sha256)."""
        resp = self._request("GET", f"/v1/snapshots/{snapshot_id}/manifest")
        return resp.content, resp.headers.get("X-Manifest-Sha256")

    def blobs_bulk(self, sha256s: list[str]) -> tuple[dict[str, bytes], list[str]]:
        """POST /v1/blobs/bulk -> ({sha256: bytes}, missing)."""
        resp = self._request("POST", "/v1/blobs/bulk", **_json_body(BlobRequest(sha256s)))
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

    # --- models and rollouts -----------------------------------------------------------------

    def upload_model(self, onnx: bytes, signed_manifest_json: str) -> ModelReceipt:
        """POST /v1/models (multipart onnx + manifest): the version registered, or ``already`` there."""
        files = {
            "onnx": ("model.onnx", onnx, "application/octet-stream"),
            "manifest": ("manifest.json", signed_manifest_json.encode(), "application/json"),
        }
        return ModelReceipt.from_json(self._request("POST", "/v1/models", files=files).content)

    def put_novelty_bank(self, version: str, data: bytes) -> BankPublic:
        """PUT /v1/models/{version}/novelty-bank: the model's novelty bank (``.npz`` bytes of a NoveltyBank)."""
        resp = self._request("PUT", f"/v1/models/{version}/novelty-bank", content=data,
                             headers={"Content-Type": "application/octet-stream"})
        return BankPublic.from_json(resp.content)

    def start_rollout(self, version: str, stages: Iterable[float], stage_seconds: float | None = None) -> RolloutPublic:
        """POST /v1/rollouts: roll ``version`` out over ``stages`` (fractions of the fleet)."""
        body = RolloutCreate(version=version, stages=list(stages), stage_seconds=stage_seconds)
        body.validate()  # a bad request is refused here, with the same message the hub would give
        resp = self._request("POST", "/v1/rollouts", **_json_body(body))
        return RolloutPublic.from_json(resp.content)

    def list_models(self) -> list[ModelPublic]:
        """GET /v1/models: every registered version, oldest upload first."""
        return ModelList.from_json(self._request("GET", "/v1/models").content).models

    def list_rollouts(self) -> list[RolloutPublic]:
        """GET /v1/rollouts: every rollout, newest first (a read only a trainer or an admin token may make)."""
        return RolloutList.from_json(self._request("GET", "/v1/rollouts").content).rollouts

    # --- plumbing ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, allow: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """One call, retried by the shared policy; ``allow``: statuses answered instead of raised."""
        def once() -> httpx.Response:
            try:
                resp = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise TransportError(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
            if resp.status_code in allow:
                return resp
            err = error_for_response(resp, f"{method} {path}")
            if isinstance(err, Unauthorized):
                raise type(err)(f"{err} (is --token / {TOKEN_ENV} a trainer-scope token?)")
            if err is not None:
                raise err
            return resp

        return self._retry.call(f"{method} {path}", once, sleep=self._sleep)


def _json_body(message: Message) -> dict[str, Any]:
    """The request arguments that send ``message`` as its JSON."""
    return {"content": message.to_json(), "headers": {"Content-Type": "application/json"}}
