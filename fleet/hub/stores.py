"""The blob store the hub's settings name: a folder (fleet.hub.blobs) or an S3 bucket (fleet.hub.blobs_s3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleet.hub.blobs import BlobStore, FileBlobStore

if TYPE_CHECKING:
    from fleet.hub.settings import HubSettings


def make_blob_store(settings: HubSettings) -> BlobStore:
    """The store ``settings`` name; a bucket is checked (it must exist and answer) before it is used."""
    if settings.blob_store == "s3":
        from fleet.hub.blobs_s3 import S3BlobStore

        store = S3BlobStore(settings.s3_bucket or "", prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url,
                            region=settings.s3_region, max_connections=settings.threads)
        store.check()
        return store
    return FileBlobStore(settings.resolved_blob_dir(), fsync=settings.blob_fsync)
