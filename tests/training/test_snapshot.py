"""Pulling a labeled snapshot from the real hub: verified blobs, a content-addressed cache, clear refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet.errors import ServerBusy, Unauthorized
from tests.support.data import digits_arrays, png_bytes
from tests.support.faults import replaced
from tests.support.inproc import InProcHub
from training.errors import SnapshotError
from training.snapshot import BlobCache, pull_snapshot, snapshot_to_imageset

from .conftest import add_case, trainer


def with_cases(hub: InProcHub, n: int = 12) -> list[str]:
    """The first ``n`` digits as labeled cases ``case-00``, ``case-01``, ... (the order of the manifest);
    their image hashes."""
    x, y = digits_arrays()
    return [add_case(hub, f"case-{i:02d}", int(y[i]), png_bytes(x[i]), {"condition": "night" if i % 2 else "day"})
            for i in range(n)]


def blob_requests(hub: InProcHub) -> int:
    return sum(1 for r in hub.requests() if r.split()[1].startswith("/v1/blobs"))


def test_pull_decodes_every_case_and_caches_blobs(tmp_path: Path, hub: InProcHub) -> None:
    with_cases(hub)
    snap = pull_snapshot(trainer(hub), cache_dir=tmp_path)
    assert snap.snapshot_id.startswith("snap-") and len(snap.entries) == 12 and snap.stats["fetched"] == 12
    assert snap.class_names == [str(i) for i in range(10)]  # the model's, from the snapshot header
    images = snapshot_to_imageset(snap, channels=1, size=(8, 8))
    x, y = digits_arrays()
    assert sorted(images.ids) == [f"case-{i:02d}" for i in range(12)]  # in the snapshot's order: by image
    order = [int(i.removeprefix("case-")) for i in images.ids]
    assert np.array_equal(images.images[:, 0], x[order]) and np.array_equal(images.labels, y[order])
    assert images.tags[images.ids.index("case-01")] == {"condition": "night", "source": "snapshot"}
    # the same snapshot again: every blob comes from the cache
    before = blob_requests(hub)
    again = pull_snapshot(trainer(hub), snap.snapshot_id, cache_dir=tmp_path)
    assert again.stats["cache_hits"] == 12 and blob_requests(hub) == before


def test_missing_blob_refuses_the_snapshot_naming_case_and_hash(tmp_path: Path, hub: InProcHub) -> None:
    sha = with_cases(hub, 4)[2]
    hub.hub.blobs.path(sha).unlink()  # lost from the hub's blob store
    with pytest.raises(SnapshotError, match=f"case case-02: blob {sha} is missing"):
        pull_snapshot(trainer(hub), cache_dir=tmp_path)


def test_corrupt_blob_refuses_the_snapshot_and_is_not_cached(tmp_path: Path, hub: InProcHub) -> None:
    sha = with_cases(hub, 4)[1]
    blob = hub.hub.blobs.path(sha)  # the hub's stored bytes rot
    blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")
    bad = hashlib.sha256(blob.read_bytes()).hexdigest()
    with pytest.raises(SnapshotError, match=f"case case-01: blob {sha} is corrupt \\(its bytes hash to {bad}\\)"):
        pull_snapshot(trainer(hub), cache_dir=tmp_path)
    assert not BlobCache(tmp_path).path(sha).exists()


def announce(sha: str) -> object:
    """An ``edit`` rule: the hub announces ``sha`` as the manifest's hash (on creating it and on serving it)."""
    def edit(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.method == "POST":
            return replaced(response, content=json.dumps({**json.loads(response.content),
                                                          "manifest_sha256": sha}).encode())
        return replaced(response, headers={"X-Manifest-Sha256": sha})

    return edit


def test_manifest_that_does_not_match_the_announced_hash_is_refused(tmp_path: Path, hub: InProcHub) -> None:
    with_cases(hub, 3)
    first = pull_snapshot(trainer(hub), cache_dir=tmp_path)
    hub.faults.add(None, r"^/v1/snapshots(/[^/]+/manifest)?$", "edit", times=None,
                   edit=announce("0" * 64))  # type: ignore[arg-type]
    with pytest.raises(SnapshotError, match="manifest sha256 .* does not match"):
        pull_snapshot(trainer(hub), cache_dir=tmp_path)
    with pytest.raises(SnapshotError, match="manifest sha256 .* does not match"):  # an existing snapshot too
        pull_snapshot(trainer(hub), first.snapshot_id, cache_dir=tmp_path)


def test_malformed_manifest_line_is_refused(tmp_path: Path, hub: InProcHub) -> None:
    """The real hub writes every line from the contract's types; a hub that did not is refused by line."""
    with_cases(hub, 2)
    sid = pull_snapshot(trainer(hub), cache_dir=tmp_path).snapshot_id

    def seven(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        lines = response.content.decode().splitlines()
        entry = json.loads(lines[2])
        entry["label"]["label"] = "seven"
        body = ("\n".join([*lines[:2], json.dumps(entry), *lines[3:]]) + "\n").encode()
        return replaced(response, content=body, headers={"X-Manifest-Sha256": hashlib.sha256(body).hexdigest()})

    hub.faults.add("GET", r"/manifest$", "edit", edit=seven)
    with pytest.raises(SnapshotError, match="manifest line 3"):  # the header is line 1
        pull_snapshot(trainer(hub), sid, cache_dir=tmp_path)


def test_a_corrupted_cache_file_is_fetched_again(tmp_path: Path, hub: InProcHub) -> None:
    sha = with_cases(hub, 3)[0]
    first = pull_snapshot(trainer(hub), cache_dir=tmp_path)
    BlobCache(tmp_path).path(sha).write_bytes(b"bit rot")
    snap = pull_snapshot(trainer(hub), first.snapshot_id, cache_dir=tmp_path)
    assert snap.stats["fetched"] == 1
    assert hashlib.sha256(snap.blob_paths[sha].read_bytes()).hexdigest() == sha


def test_busy_hub_is_retried_then_reported(tmp_path: Path, hub: InProcHub) -> None:
    with_cases(hub, 2)
    hub.faults.add("POST", "^/v1/snapshots$", "503", times=2)
    assert pull_snapshot(trainer(hub), cache_dir=tmp_path).snapshot_id.startswith("snap-")
    hub.faults.add("POST", "^/v1/snapshots$", "503", times=5)
    with pytest.raises(ServerBusy, match="503"):
        pull_snapshot(trainer(hub), cache_dir=tmp_path)


def test_bad_token_is_unauthorized(tmp_path: Path, hub: InProcHub) -> None:
    with_cases(hub, 1)
    with pytest.raises(Unauthorized, match="trainer-scope"):
        pull_snapshot(trainer(hub, token="wrong"), cache_dir=tmp_path)
