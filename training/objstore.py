"""Read a snapshot's manifest and blobs straight from the hub's S3-compatible object store (boto3).

``--object-store s3://BUCKET/PREFIX/`` names the bucket and key prefix the hub writes (its
``FLYWHEEL_HUB_S3_BUCKET`` and ``FLYWHEEL_HUB_S3_PREFIX``); the endpoint and credentials come from boto3's own
chain (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, a profile, an instance role). The hub still creates the
snapshot and states its manifest's sha256; every byte read here is checked against the sha256 it is stored
under, so a trainer trusts the store no more than it trusts the hub's blob API. Reading from the store spares
the hub's workers the snapshot's traffic, and several training nodes read in parallel.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleet.errors import InvalidInput, require
from fleet.protocol import SHA256_RE
from training.errors import SnapshotError

THREADS = 16


def parse_store_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` -> (bucket, prefix); the prefix may be empty and otherwise ends with '/'."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise InvalidInput(f"--object-store must be s3://BUCKET/PREFIX/ (the hub's bucket and key prefix); "
                           f"received {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


class ObjectStoreReader:
    """Reads of ``<prefix><sha256>`` objects from one bucket (checked against their names by the caller)."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        self.bucket, self.prefix = parse_store_url(url)
        self.url = url
        if client is None:
            require("boto3", "s3")
            import boto3
            from botocore.config import Config

            try:
                client = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                                          max_pool_connections=THREADS))
            except ValueError as exc:  # boto3's check of the endpoint it was given (AWS_ENDPOINT_URL, a profile)
                raise InvalidInput(f"--object-store {url}: boto3 cannot make an S3 client ({exc}); expected "
                                   "AWS_ENDPOINT_URL (or the profile's endpoint_url) to be an http:// or https:// "
                                   "URL, or unset for AWS") from exc
        self.client = client

    def __repr__(self) -> str:
        return f"ObjectStoreReader(s3://{self.bucket}/{self.prefix})"

    def get(self, sha256: str) -> bytes | None:
        """The bytes stored under ``sha256``, or None when there is none (SnapshotError when the store cannot be
        read). The caller checks them against ``sha256``: :func:`training.snapshot.pull_snapshot` refuses a
        snapshot whose manifest or blobs do not hash to their names, and names them."""
        if not SHA256_RE.fullmatch(sha256):
            raise InvalidInput(f"a blob key must be a lowercase sha256 (64 hex digits); received {sha256!r}")
        key = f"{self.prefix}{sha256}"
        try:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__))
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise SnapshotError(f"reading s3://{self.bucket}/{key} failed ({code}): check --object-store, "
                                f"AWS_ENDPOINT_URL and the credentials") from exc
        return data

    def get_many(self, sha256s: Iterable[str]) -> dict[str, bytes]:
        """Every object that exists among ``sha256s``, read on a pool of threads."""
        wanted = list(sha256s)
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            found = list(pool.map(self.get, wanted))
        return {s: d for s, d in zip(wanted, found, strict=True) if d is not None}
