"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph, moto's server), through boto3.

Why boto3: it is the reference client of the S3 API, kept by AWS, speaks to any endpoint (``endpoint_url``),
and its managed transfers stream multipart uploads and downloads in bounded memory; obstore is younger and
would add a Rust extension for no feature this store needs.

Keys are ``<prefix><sha256>``, so every hub worker, wherever it runs, sees the same blobs. The protocol's
guarantees hold as follows:

- ``put`` is atomic (an object appears whole) and idempotent; it writes with ``If-None-Match: *``, so of two
  workers storing the same bytes one creates the object and the other learns it existed (``created`` False).
  An existing object is then copied onto itself, which renews its ``LastModified``: a sweep running meanwhile
  sees a fresh blob and leaves it.
- ``put_file`` streams to a temporary key (``<prefix>tmp/...``) while hashing, then copies it under its
  sha256 only if the hash matches: nobody ever reads an unverified model.
- ``delete_if_unused`` copies the object aside, gives up if it was renewed since it was seen old, deletes it,
  checks again whether anything refers to it, and puts it back if so. An upload that renews it in the
  milliseconds between that second look and the delete, and whose row lands after the last check, can still
  lose its blob; the sweep only considers blobs older than its ``min_age_s`` (an hour by default) that nothing
  referred to. (Conditional copies, ``x-amz-copy-source-if-unmodified-since``, would close that window on AWS;
  moto's server ignores them, and the tests run there.)

Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an
instance role); the bucket must exist (the hub says so when it does not).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, BinaryIO

from fleet.errors import FlywheelError, IntegrityError, InvalidInput, require
from fleet.hub.blobs import CHUNK, check_key, sha256_hex
from fleet.protocol import SHA256_RE

log = logging.getLogger(__name__)

TMP = "tmp/"
ASIDE = "sweep/"


class ObjectStoreError(FlywheelError, RuntimeError):
    """The object store refused or could not be reached; the message names the bucket, key and S3 error."""


class S3BlobStore:
    """The :class:`fleet.hub.blobs.BlobStore` protocol over one bucket (and key prefix) of an S3-compatible store.

    ``max_connections``: the client's connection pool; the hub passes its thread count (``threads``), so every
    thread that reaches the store at once has a connection to keep."""

    def __init__(self, bucket: str, *, prefix: str = "blobs/", endpoint_url: str | None = None,
                 region: str | None = None, client: Any = None, max_connections: int = 40) -> None:
        require("boto3", "s3")
        import boto3
        from botocore.config import Config

        if not bucket:
            raise InvalidInput("the S3 blob store needs a bucket name (FLYWHEEL_HUB_S3_BUCKET)")
        if prefix and not prefix.endswith("/"):
            raise InvalidInput(f"the S3 key prefix must end with '/'; received {prefix!r}")
        self.bucket, self.prefix = bucket, prefix
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=max_connections))
        from boto3.s3.transfer import TransferConfig

        self._transfer = TransferConfig(multipart_chunksize=8 * CHUNK, max_concurrency=4)

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    def check(self) -> None:
        """That the bucket exists and these credentials reach it (the hub calls this on start)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise ObjectStoreError(f"the S3 bucket {self.bucket!r} cannot be reached ({_code(exc)}): create it, or "
                                   f"check FLYWHEEL_HUB_S3_ENDPOINT_URL and the AWS credentials") from exc

    # --- the protocol ---------------------------------------------------------------------------

    def put(self, data: bytes, *, sha256: str | None = None, verified: bool = False) -> tuple[str, bool]:
        digest = check_key(sha256) if verified and sha256 is not None else sha256_hex(data)
        if sha256 is not None and check_key(sha256) != digest:
            raise IntegrityError(f"blob sha256 is {digest}, expected {sha256}")
        key = self._key(digest)
        for _ in range(3):  # a sweep may remove it between our two requests: then it is ours to write again
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
                return digest, True
            except Exception as exc:
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise self._error("put", key, exc) from exc
            if self._renew(key):
                return digest, False
        raise ObjectStoreError(f"S3 put of s3://{self.bucket}/{key}: the object kept vanishing between writes")

    def put_file(self, fh: BinaryIO, *, sha256: str) -> tuple[str, bool]:
        key = self._key(check_key(sha256))
        if self._head(key) is not None:
            h = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                h.update(chunk)
            if h.hexdigest() != sha256:
                raise IntegrityError(f"blob sha256 is {h.hexdigest()}, expected {sha256}")
            if self._renew(key):
                return sha256, False
            raise ObjectStoreError(f"S3 put of s3://{self.bucket}/{key}: swept while it was being stored; send it "
                                   f"again")
        tmp = f"{self.prefix}{TMP}{secrets.token_hex(12)}"
        reader = _HashingReader(fh)
        try:
            self.client.upload_fileobj(reader, self.bucket, tmp, Config=self._transfer)
            if reader.hexdigest() != sha256:
                raise IntegrityError(f"blob sha256 is {reader.hexdigest()}, expected {sha256}")
            self.client.copy({"Bucket": self.bucket, "Key": tmp}, self.bucket, key, Config=self._transfer)
        except IntegrityError:
            raise
        except Exception as exc:
            raise self._error("put_file", key, exc) from exc
        finally:
            self._delete_key(tmp)
        return sha256, True

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix):]
                if SHA256_RE.match(name):
                    yield name, _ts(obj["LastModified"])

    def delete_if_unused(self, sha256: str, *, older_than: float, in_use: Callable[[str], bool]) -> bool:
        key = self._key(check_key(sha256))
        head = self._head(key)
        if head is None or _ts(head["LastModified"]) >= older_than or in_use(sha256):
            return False
        aside = f"{self.prefix}{ASIDE}{sha256}-{secrets.token_hex(4)}"
        try:
            self.client.copy_object(Bucket=self.bucket, Key=aside, CopySource={"Bucket": self.bucket, "Key": key})
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return False
            raise self._error("sweep", key, exc) from exc
        again = self._head(key)  # an upload renewed it since we saw it old (or removed it): leave it be
        if again is None or again["LastModified"] != head["LastModified"]:
            self._delete_key(aside)
            return False
        self._delete_key(key)
        try:
            if in_use(sha256):  # a case came to refer to it meanwhile: put it back (unless an upload already did)
                self._copy_back(aside, key)
                return False
            return True
        finally:
            self._delete_key(aside)

    def get(self, sha256: str) -> bytes:
        key = self._key(check_key(sha256))
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise KeyError(sha256) from None
            raise self._error("get", key, exc) from exc
        return body

    def exists(self, sha256: str) -> bool:
        return self._head(self._key(check_key(sha256))) is not None

    def delete(self, sha256: str) -> None:
        self._delete_key(self._key(check_key(sha256)))

    def iter_chunks(self, sha256: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        key = self._key(check_key(sha256))
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise KeyError(sha256) from None
            raise self._error("get", key, exc) from exc
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def remove_stale_temp_files(self, older_than: float) -> int:
        """Delete what a crash left under ``tmp/`` and ``sweep/`` (an upload or a sweep cut off) before
        ``older_than``; return how many."""
        n = 0
        for sub in (TMP, ASIDE):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + sub)
            for page in pages:
                for obj in page.get("Contents", []):
                    if _ts(obj["LastModified"]) < older_than:
                        self._delete_key(obj["Key"])
                        n += 1
        return n

    # --- helpers --------------------------------------------------------------------------------

    def _key(self, sha256: str) -> str:
        return self.prefix + sha256

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error("head", key, exc) from exc
        return head

    def _renew(self, key: str) -> bool:
        """Copy the object onto itself: same bytes, a new LastModified (what a sweep goes by). False if it is
        gone (swept meanwhile)."""
        try:
            self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                    MetadataDirective="REPLACE")
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return False
            raise self._error("renew", key, exc) from exc
        return True

    def _copy_back(self, aside: str, key: str) -> None:
        try:
            self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": aside})
        except Exception as exc:
            raise self._error("restore", key, exc) from exc

    def _delete_key(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _code(exc) not in ("NoSuchKey", "404"):
                raise self._error("delete", key, exc) from exc

    def _error(self, what: str, key: str, exc: Exception) -> ObjectStoreError:
        return ObjectStoreError(f"S3 {what} of s3://{self.bucket}/{key} failed: {_code(exc)}: {exc}")


class _HashingReader:
    """A file-like reader that hashes what passes through it (boto3's upload reads it in chunks)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.h = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.fh.read(size)
        self.h.update(chunk)
        return chunk

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        code = err.get("Code") or (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(code)
    return type(exc).__name__


def _ts(value: datetime | float) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)
