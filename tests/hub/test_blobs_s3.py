"""Blobs in an S3-compatible bucket (fleet.hub.blobs_s3) against a real server (moto's, started by scripts/test.sh):
what the file store guarantees, the sweep's races, the hub's images, models and snapshots, and clear refusals.
The protocol's own tests run on S3 too (tests/hub/test_blobs.py)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
from sqlmodel import Session

from fleet.errors import InvalidInput
from fleet.hub.models import Blob
from fleet.hub.sweep import sweep_orphan_blobs
from tests.hub.conftest import png_bytes
from tests.support.s3 import new_bucket, s3_client, s3_settings, s3_url


async def thread_tokens() -> float:
    import anyio.to_thread

    return anyio.to_thread.current_default_thread_limiter().total_tokens


def keys(bucket: str) -> list[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_a_blob_a_case_comes_to_refer_to_during_the_sweep_is_kept() -> None:
    from fleet.hub.blobs_s3 import S3BlobStore

    bucket = new_bucket()
    store = S3BlobStore(bucket, endpoint_url=s3_url())
    image = png_bytes(55)
    sha, created = store.put(image)
    assert created and store.put(image) == (sha, False)  # the second writer learns it existed (If-None-Match)
    later = time.time() + 3600  # everything counts as old
    # the sweep saw an orphan; a row refers to it by the time it checks again: it is put back
    answers = iter([False, True])
    assert not store.delete_if_unused(sha, older_than=later, in_use=lambda s: next(answers))
    assert store.get(sha) == image
    # an upload renews it after the sweep saw it old: the sweep's second look sees that, nothing is removed
    head = store.client.head_object(Bucket=bucket, Key=f"blobs/{sha}")
    time.sleep(1.1)  # LastModified has one-second resolution

    def renewed_meanwhile(s: str) -> bool:
        store.put(image)
        return False

    original, looks = store.client.head_object, []

    def first_look_stale(**kw: Any) -> Any:  # the sweep's first look predates the upload's renewal
        looks.append(kw["Key"])
        return head if len(looks) == 1 else original(**kw)

    store.client.head_object = first_look_stale
    try:
        assert not store.delete_if_unused(sha, older_than=later, in_use=renewed_meanwhile)
    finally:
        store.client.head_object = original
    assert store.exists(sha) and len(looks) == 2 and keys(bucket) == [f"blobs/{sha}"]  # nothing left aside
    # nothing refers to it: gone, and nothing left aside
    assert store.delete_if_unused(sha, older_than=later, in_use=lambda s: False)
    assert not store.exists(sha) and keys(bucket) == []


def test_the_hub_keeps_images_models_and_snapshots_in_the_bucket(hub_factory: Any) -> None:
    bucket = new_bucket()
    hub = hub_factory(**s3_settings(bucket), threads=12)
    # as many S3 connections as threads that may reach the bucket at once
    assert hub.hub.blobs.client.meta.config.max_pool_connections == 12
    assert hub.client.portal.call(thread_tokens) == 12
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    case_ids = [hub.send_case("d1") for _ in range(3)]
    stored = keys(bucket)
    assert len(stored) == 4 and all(k.startswith("blobs/") for k in stored)  # 3 images and the model
    assert not (hub.settings.resolved_blob_dir()).exists() or not list(hub.settings.resolved_blob_dir().rglob("*.*"))
    selected = hub.client.post("/v1/selections", json={"budget": 3}, headers=hub.labeler).json()["cases"]
    assert sorted(c["case"]["case_id"] for c in selected) == sorted(case_ids)
    image = hub.client.get(selected[0]["image_url"].removeprefix("http://hub.test"))  # the signed link
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    onnx = hub.client.get("/v1/models/m1/onnx", headers=hub.trainer)
    assert onnx.status_code == 200 and onnx.content == hub.model_files("m1").onnx_path.read_bytes()
    for case_id in case_ids:
        hub.label(case_id, 1)
    snap = hub.client.post("/v1/snapshots", headers=hub.trainer).json()
    manifest = hub.client.get(f"/v1/snapshots/{snap['snapshot_id']}/manifest", headers=hub.trainer)
    assert manifest.status_code == 200 and hashlib.sha256(manifest.content).hexdigest() == snap["manifest_sha256"]
    assert f"blobs/{snap['manifest_sha256']}" in keys(bucket)
    stored = keys(bucket)  # 3 images, the model and the snapshot's manifest
    # the orphan sweep works on the bucket: an orphan goes, what rows refer to stays
    store = hub.hub.blobs
    orphan, _ = store.put(png_bytes(999))
    with Session(hub.hub.engine) as s:
        s.add(Blob(sha256=orphan, size=1, kind="image", created_at=1.0))
        s.commit()
    report = sweep_orphan_blobs(hub.hub.engine, store, now=time.time() + 7200, min_age_s=3600)
    assert (report.scanned, report.orphans, report.removed) == (6, 1, 1)
    assert keys(bucket) == stored


def test_an_s3_store_refuses_what_cannot_work(hub_factory: Any) -> None:
    from fleet.hub.blobs_s3 import ObjectStoreError, S3BlobStore
    from fleet.hub.settings import HubSettings

    with pytest.raises(ObjectStoreError, match="the S3 bucket 'flywheel-no-such-bucket' cannot be reached"):
        S3BlobStore("flywheel-no-such-bucket", endpoint_url=s3_url()).check()
    with pytest.raises(ObjectStoreError, match="cannot be reached"):
        hub_factory(blob_store="s3", s3_bucket="flywheel-no-such-bucket", s3_endpoint_url=s3_url())
    with pytest.raises(InvalidInput, match="FLYWHEEL_HUB_BLOB_STORE=s3 needs FLYWHEEL_HUB_S3_BUCKET"):
        HubSettings(dev=True, blob_store="s3").check()
    with pytest.raises(ValueError, match="s3_prefix must end with '/'"):
        HubSettings(dev=True, blob_store="s3", s3_bucket="b", s3_prefix="blobs")
    with pytest.raises(InvalidInput, match="prefix must end with '/'"):
        S3BlobStore("b", prefix="x", endpoint_url=s3_url())
