"""Pulling a labeled snapshot from the hub: verified blobs, a content-addressed cache, clear refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fleet.errors import ServerBusy, Unauthorized
from tests.support.data import digits_arrays, png_bytes
from training.errors import SnapshotError
from training.hub_client import HubClient
from training.snapshot import BlobCache, pull_snapshot, snapshot_to_imageset

from .fakehub import FakeHub


def hub_with_cases(n: int = 12) -> FakeHub:
    x, y = digits_arrays()
    hub = FakeHub()
    for i in range(n):
        hub.add_case(f"case-{i}", int(y[i]), png_bytes(x[i]), {"condition": "night" if i % 2 else "day"})
    return hub


def client(hub: FakeHub, token: str = "tok") -> HubClient:
    return HubClient("http://hub", token, transport=hub.transport(), sleep=lambda _: None)


def blob_requests(hub: FakeHub) -> int:
    return sum(1 for m, p in hub.requests if p.startswith("/v1/blobs"))


def test_pull_decodes_every_case_and_caches_blobs(tmp_path: Path) -> None:
    hub = hub_with_cases()
    snap = pull_snapshot(client(hub), cache_dir=tmp_path)
    assert snap.snapshot_id == "snap-1" and len(snap.entries) == 12 and snap.stats["fetched"] == 12
    images = snapshot_to_imageset(snap, channels=1, size=(8, 8))
    x, y = digits_arrays()
    assert np.array_equal(images.images[:, 0], x[:12]) and np.array_equal(images.labels, y[:12])
    assert images.tags[1] == {"condition": "night", "source": "snapshot"}
    assert images.ids == [f"case-{i}" for i in range(12)]
    # the same snapshot again: every blob comes from the cache
    before = blob_requests(hub)
    again = pull_snapshot(client(hub), "snap-1", cache_dir=tmp_path)
    assert again.stats["cache_hits"] == 12 and blob_requests(hub) == before


def test_missing_blob_refuses_the_snapshot_naming_case_and_hash(tmp_path: Path) -> None:
    hub = hub_with_cases(4)
    sha = hub.cases[2]["image_sha256"]
    del hub.blobs[sha]
    with pytest.raises(SnapshotError, match=f"case case-2: blob {sha} is missing"):
        pull_snapshot(client(hub), cache_dir=tmp_path)


def test_corrupt_blob_refuses_the_snapshot_and_is_not_cached(tmp_path: Path) -> None:
    hub = hub_with_cases(4)
    sha = hub.cases[1]["image_sha256"]
    hub.blobs[sha] = hub.blobs[sha][:-7] + b"garbage"
    bad = hashlib.sha256(hub.blobs[sha]).hexdigest()
    with pytest.raises(SnapshotError, match=f"case case-1: blob {sha} is corrupt \\(its bytes hash to {bad}\\)"):
        pull_snapshot(client(hub), cache_dir=tmp_path)
    assert not BlobCache(tmp_path).path(sha).exists()


def test_manifest_that_does_not_match_the_announced_hash_is_refused(tmp_path: Path) -> None:
    hub = hub_with_cases(3)
    pull_snapshot(client(hub), cache_dir=tmp_path)
    hub.announce_sha = "0" * 64
    with pytest.raises(SnapshotError, match="manifest sha256 .* does not match"):
        pull_snapshot(client(hub), cache_dir=tmp_path)
    with pytest.raises(SnapshotError, match="manifest sha256 .* does not match"):  # an existing snapshot too
        pull_snapshot(client(hub), "snap-1", cache_dir=tmp_path)


def test_malformed_manifest_line_is_refused(tmp_path: Path) -> None:
    hub = hub_with_cases(2)
    hub.cases[1]["label"] = "seven"
    with pytest.raises(SnapshotError, match="manifest line 3"):  # the header is line 1
        pull_snapshot(client(hub), cache_dir=tmp_path)


def test_a_corrupted_cache_file_is_fetched_again(tmp_path: Path) -> None:
    hub = hub_with_cases(3)
    pull_snapshot(client(hub), cache_dir=tmp_path)
    sha = hub.cases[0]["image_sha256"]
    BlobCache(tmp_path).path(sha).write_bytes(b"bit rot")
    snap = pull_snapshot(client(hub), "snap-1", cache_dir=tmp_path)
    assert snap.stats["fetched"] == 1
    assert hashlib.sha256(snap.blob_paths[sha].read_bytes()).hexdigest() == sha


def test_busy_hub_is_retried_then_reported(tmp_path: Path) -> None:
    hub = hub_with_cases(2)
    hub.fail_first["/v1/snapshots"] = 2
    assert pull_snapshot(client(hub), cache_dir=tmp_path).snapshot_id == "snap-1"
    hub.fail_first["/v1/snapshots"] = 5
    with pytest.raises(ServerBusy, match="503"):
        pull_snapshot(client(hub), cache_dir=tmp_path)


def test_bad_token_is_unauthorized(tmp_path: Path) -> None:
    with pytest.raises(Unauthorized, match="trainer-scope"):
        pull_snapshot(client(hub_with_cases(1), token="wrong"), cache_dir=tmp_path)
