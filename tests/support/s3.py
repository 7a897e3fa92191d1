"""The S3-compatible server scripts/test.sh starts (moto's, FLYWHEEL_TEST_S3_URL): a fresh bucket per test."""

from __future__ import annotations

import os
import secrets
from typing import Any

from tests.support.services import missing_service


def s3_url() -> str:
    url = os.environ.get("FLYWHEEL_TEST_S3_URL")
    if not url:
        missing_service("FLYWHEEL_TEST_S3_URL is not set (scripts/test.sh starts an S3-compatible server)")
    return url


def s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_url(), region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def new_bucket() -> str:
    """A bucket of its own for one test (a name S3 accepts: lowercase, digits, hyphens)."""
    name = f"flywheel-test-{secrets.token_hex(6)}"
    s3_client().create_bucket(Bucket=name)
    return name


def s3_settings(bucket: str) -> dict[str, Any]:
    """HubSettings overrides that put the hub's blobs in ``bucket``."""
    return {"blob_store": "s3", "s3_bucket": bucket, "s3_endpoint_url": s3_url()}


def s3_env(bucket: str) -> dict[str, str]:
    """The same, as the environment of a ``flywheel hub serve`` process."""
    return {"FLYWHEEL_HUB_BLOB_STORE": "s3", "FLYWHEEL_HUB_S3_BUCKET": bucket, "FLYWHEEL_HUB_S3_ENDPOINT_URL": s3_url()}
