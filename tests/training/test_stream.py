"""The trainer reads hub snapshots from the object store and streams its data from memory-mapped files.

Against the real hub in-process with its blobs in the real S3-compatible server (moto's, started by the test
command): the snapshot's manifest and blobs come from the bucket, not through the hub, each verified; a missing
or rotten object refuses the snapshot by name. ``--stream`` decodes the snapshot and the replay set into mapped
files a chunk at a time and trains on batches read from them: the same batches, the same model, the same report
as the in-memory run, at a fraction of the memory.
"""

from __future__ import annotations

import hashlib
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fleet.errors import InvalidInput
from fleet.signing import KeyPair
from tests.support.data import digits_arrays, png_bytes
from tests.support.inproc import InProcHub, inproc_hub
from tests.support.s3 import new_bucket, s3_client, s3_settings, s3_url
from training.config import TrainArgs
from training.data import concat, load_npz, map_npz_member, spill_images
from training.errors import SnapshotError
from training.hub_client import HubClient
from training.objstore import ObjectStoreReader
from training.prepare import prepare_data
from training.snapshot import pull_snapshot
from training.train import main

from .conftest import _digits_fleet, add_case, add_detect_cases, trainer

MakeArgs = Callable[..., TrainArgs]


@pytest.fixture
def s3_hub(tmp_path: Path, signing_pair: KeyPair, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[InProcHub, str]]:
    """The real hub with its blobs in a fresh bucket of the S3 server (dev-1, digits model m0 active); the
    trainer's boto3 finds the server through AWS_ENDPOINT_URL, as on a training node."""
    bucket = new_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_url())
    with inproc_hub(tmp_path, signing_pair, **s3_settings(bucket)) as h:
        _digits_fleet(h)
        yield h, f"s3://{bucket}/blobs/"


def with_cases(hub: InProcHub, n: int) -> list[str]:
    x, y = digits_arrays()
    return [add_case(hub, f"c{i:03d}", int(y[i]), png_bytes((x[i] // 2).astype(np.uint8)),
                     {"condition": "dim" if i % 2 else "day"}) for i in range(n)]


def blob_requests(hub: InProcHub) -> int:
    return sum(1 for r in hub.requests() if r.split()[1].startswith(("/v1/blobs", "/v1/snapshots/")))


def factory(hub: InProcHub) -> Callable[[str], HubClient]:
    clients: dict[str, HubClient] = {}
    return lambda url: clients.setdefault(url, trainer(hub, url))


def test_snapshot_read_from_the_object_store_matches_the_hub_path(tmp_path: Path,
                                                                  s3_hub: tuple[InProcHub, str]) -> None:
    hub, store_url = s3_hub
    with_cases(hub, 20)
    snap = pull_snapshot(trainer(hub), cache_dir=tmp_path / "a", store=ObjectStoreReader(store_url))
    assert blob_requests(hub) == 0  # neither the manifest nor a blob came through the hub
    assert snap.stats["read_from"] == store_url and snap.stats["fetched"] == 20
    via_hub = pull_snapshot(trainer(hub), snap.snapshot_id, cache_dir=tmp_path / "b")
    assert via_hub.stats["read_from"] == "hub" and blob_requests(hub) > 0
    assert [e.to_dict() for e in snap.entries] == [e.to_dict() for e in via_hub.entries]
    for sha, path in snap.blob_paths.items():
        assert path.read_bytes() == via_hub.blob_paths[sha].read_bytes()


def test_a_missing_or_rotten_object_refuses_the_snapshot_by_name(tmp_path: Path,
                                                                 s3_hub: tuple[InProcHub, str]) -> None:
    hub, store_url = s3_hub
    shas = with_cases(hub, 4)
    bucket = store_url[5:].split("/")[0]
    s3 = s3_client()
    s3.put_object(Bucket=bucket, Key=f"blobs/{shas[1]}", Body=b"rotten bytes")
    s3.delete_object(Bucket=bucket, Key=f"blobs/{shas[3]}")
    with pytest.raises(SnapshotError) as err:
        pull_snapshot(trainer(hub), cache_dir=tmp_path, store=ObjectStoreReader(store_url))
    text = str(err.value)
    assert "1 missing and 1 corrupt" in text and f"case c003: blob {shas[3]} is missing" in text
    assert f"case c001: blob {shas[1]} is corrupt (its bytes hash to {hashlib.sha256(b'rotten bytes').hexdigest()})" \
        in text
    assert not (tmp_path / shas[1][:2] / f"{shas[1]}.png").exists()  # nothing unverified is cached
    with pytest.raises(SnapshotError, match="its manifest [0-9a-f]{64} is not in s3://.*/elsewhere/"):
        pull_snapshot(trainer(hub), cache_dir=tmp_path, store=ObjectStoreReader(store_url.replace("blobs/",
                                                                                                  "elsewhere/")))


def test_streamed_training_is_the_in_memory_run(make_args: MakeArgs, digits_npz: Path, tmp_path: Path,
                                                s3_hub: tuple[InProcHub, str]) -> None:
    """A snapshot read from the bucket plus the digits replay set, trained in memory and streamed: the same
    data fingerprint, losses, metrics and weights; the streamed run's decoded files are reused by a second run."""
    hub, store_url = s3_hub
    with_cases(hub, 60)
    sid = pull_snapshot(trainer(hub), cache_dir=tmp_path / "warm").snapshot_id
    common: dict[str, Any] = dict(data="hub:http://hub", snapshot=sid, base=f"npz:{digits_npz}", replay_ratio=0.75,
                                  holdout=0.25, object_store=store_url, epochs=2)
    mem = main(make_args(out=tmp_path / "mem", cache_dir=tmp_path / "c1", **common), client_factory=factory(hub))
    streamed = main(make_args(out=tmp_path / "str", cache_dir=tmp_path / "c2", stream=True, **common),
                    client_factory=factory(hub))
    assert streamed["data"]["streamed"] is True and mem["data"]["streamed"] is False
    assert streamed["data"]["fingerprint"] == mem["data"]["fingerprint"]
    assert streamed["data"]["snapshot"]["read_from"] == store_url
    assert [h["loss"] for h in streamed["training"]["history"]] == [h["loss"] for h in mem["training"]["history"]]
    assert streamed["metrics"]["test"] == mem["metrics"]["test"]
    a = torch.load(tmp_path / "mem" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "str" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    decoded = sorted((tmp_path / "c2" / "decoded").glob(f"{sid}-*.npy"))
    assert len(decoded) == 2  # the snapshot's training and held-out sides; the pool's spill file is gone
    stamps = [p.stat().st_mtime_ns for p in decoded]
    again = main(make_args(out=tmp_path / "again", cache_dir=tmp_path / "c2", stream=True, **common),
                 client_factory=factory(hub))
    assert again["data"]["fingerprint"] == mem["data"]["fingerprint"]
    assert [p.stat().st_mtime_ns for p in decoded] == stamps  # reused, not decoded again


def random_npz(path: Path, shape: tuple[int, int, int], *, seed: int) -> int:
    """3,000 random images of ``shape`` in an uncompressed npz at ``path`` (2,400 to train on, 600 to test);
    returns the training images' bytes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (3000, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, 3000)
    np.savez(path, x_train=x[:2400], y_train=y[:2400], x_test=x[2400:], y_test=y[2400:])
    return x[:2400].nbytes


def prepare_peak(args: TrainArgs) -> tuple[int, Any]:
    """(peak bytes allocated, the prepared data) of preparing ``args``' data (tracemalloc counts numpy's
    buffers; mapped pages are not allocations)."""
    args = args.validate()
    tracemalloc.start()
    try:
        prepared = prepare_data(args, client_factory=lambda url: None)  # type: ignore[arg-type,return-value]
        return tracemalloc.get_traced_memory()[1], prepared
    finally:
        tracemalloc.stop()


def test_streaming_holds_a_chunk_not_the_data(tmp_path: Path, make_args: MakeArgs) -> None:
    """Preparing a 20 MB data set (uncompressed npz) for training: in memory the process allocates the whole pool;
    streamed, a small part of it: the labels and tags, one per image (tracemalloc counts numpy's buffers; mapped
    pages are not allocations)."""
    data = tmp_path / "big.npz"
    pool_bytes = random_npz(data, (3, 48, 48), seed=0)

    in_memory, a = prepare_peak(make_args(data=f"npz:{data}", stream=False, out=tmp_path / "run-mem"))
    streamed, b = prepare_peak(make_args(data=f"npz:{data}", stream=True, out=tmp_path / "run-str"))
    assert in_memory > pool_bytes  # the pool, at least once
    assert streamed < 0.25 * pool_bytes, (streamed, pool_bytes)
    assert b.pool.mapped and not a.pool.mapped
    assert b.info["fingerprint"] == a.info["fingerprint"]
    assert np.array_equal(b.pool.images[b.sampler.indices(0)], a.pool.images[a.sampler.indices(0)])


def test_a_replay_set_of_another_size_is_conformed_a_chunk_at_a_time(tmp_path: Path, make_args: MakeArgs,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapped set that must be resized for the model (64x64 images, --image-size 48 48): streamed, it is
    resized a chunk at a time into a mapped file, so preparing it allocates a small part of what the in-memory
    run does (the whole set, then its resized copy), and the pool is the same, pixel for pixel."""
    import training.data

    monkeypatch.setattr(training.data, "CHUNK_IMAGES", 128)
    data = tmp_path / "big.npz"
    source_bytes = random_npz(data, (3, 64, 64), seed=1)

    common: dict[str, Any] = dict(data=f"npz:{data}", image_size=(48, 48))
    in_memory, a = prepare_peak(make_args(stream=False, out=tmp_path / "run-mem", **common))
    streamed, b = prepare_peak(make_args(stream=True, out=tmp_path / "run-str", **common))
    assert a.pool.shape == b.pool.shape == (3, 48, 48)
    assert in_memory > source_bytes
    assert streamed < 0.25 * source_bytes, (streamed, source_bytes)
    assert b.pool.mapped and b.eval_sets["test"].mapped and not a.pool.mapped
    assert b.info["fingerprint"] == a.info["fingerprint"]
    assert np.array_equal(b.pool.images, a.pool.images)
    assert np.array_equal(b.eval_sets["test"].images, a.eval_sets["test"].images)
    assert list((tmp_path / "cache" / "decoded").iterdir()) == []  # spill files are unlinked once mapped


def test_conforming_in_chunks_is_conforming_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels both ways and a resize, chunk by chunk into a spill file: the same pixels as in memory."""
    import training.data
    from training.data import ImageSet, conform

    monkeypatch.setattr(training.data, "CHUNK_IMAGES", 7)
    rng = np.random.default_rng(2)
    for c_in, shape in ((3, (1, 10, 12)), (1, (3, 10, 12)), (3, (3, 9, 11))):
        x = rng.integers(0, 256, (30, c_in, 16, 16), dtype=np.uint8)
        s = ImageSet(x, np.zeros(30, np.int64), [{} for _ in range(30)], "s")
        whole, chunked = conform(s, shape), conform(s, shape, spill=tmp_path)
        assert chunked.mapped and chunked.images.shape == (30, *shape)
        assert np.array_equal(np.asarray(chunked.images), whole.images), (c_in, shape)


def test_an_unreadable_image_leaves_no_decoded_file_behind(tmp_path: Path, hub: InProcHub) -> None:
    """A cached blob that verifies but is no image (bytes a device sent as one, say) refuses the decode by case,
    and neither the decoded file nor its temporary is left in the folder."""
    from training.snapshot import snapshot_to_mapped

    with_cases(hub, 3)
    snap = pull_snapshot(trainer(hub), cache_dir=tmp_path / "cache")
    bad = snap.entries[1]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    snap.blob_paths[bad.image_sha256] = junk
    out = tmp_path / "decoded" / "snap.npy"
    with pytest.raises(InvalidInput, match=f"case {bad.case_id} .*not a readable image"):
        snapshot_to_mapped(snap, snap.entries, channels=1, size=(8, 8), path=out)
    assert list((tmp_path / "decoded").iterdir()) == []


def test_a_reused_decoded_file_is_checked_against_its_recorded_hash(tmp_path: Path, hub: InProcHub,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The decoded file's pixels are hashed as they are written and the sha256 kept beside it. A later run
    reuses the file only if it still hashes to that; a flipped byte on disk, or a file with no recorded hash (a
    run that died between the rename and the record), is decoded again, with a warning that says why."""
    from training.snapshot import snapshot_to_mapped

    with_cases(hub, 5)
    snap = pull_snapshot(trainer(hub), cache_dir=tmp_path / "cache")
    out = tmp_path / "decoded" / "snap.npy"
    record = tmp_path / "decoded" / "snap.npy.sha256"

    def decode() -> np.ndarray:
        return np.array(snapshot_to_mapped(snap, snap.entries, channels=1, size=(8, 8), path=out).images)

    want = decode()
    assert record.read_text().strip() == hashlib.sha256(want.tobytes()).hexdigest()
    stamp = out.stat().st_mtime_ns
    with caplog.at_level("WARNING", logger="training.snapshot"):
        assert np.array_equal(decode(), want)
    assert out.stat().st_mtime_ns == stamp and not caplog.records  # reused as it was

    with open(out, "r+b") as fh:  # bit rot in the last pixel
        fh.seek(-1, 2)
        last = fh.read(1)[0]
        fh.seek(-1, 2)
        fh.write(bytes([last ^ 0xFF]))
    with caplog.at_level("WARNING", logger="training.snapshot"):
        assert np.array_equal(decode(), want)
    assert "has pixels hashing to" in caplog.text and f"not the recorded {record.read_text().strip()}" in caplog.text

    caplog.clear()
    record.unlink()
    with caplog.at_level("WARNING", logger="training.snapshot"):
        assert np.array_equal(decode(), want)
    assert "has no recorded sha256 (snap.npy.sha256)" in caplog.text
    assert record.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["snap.npy", "snap.npy.sha256"]


def test_npz_members_are_mapped_only_when_stored_uncompressed(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    np.savez(tmp_path / "plain.npz", x_train=x, y_train=np.zeros(2, np.int64))
    np.savez_compressed(tmp_path / "packed.npz", x_train=x, y_train=np.zeros(2, np.int64))
    mapped = map_npz_member(tmp_path / "plain.npz", "x_train")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, x)
    assert map_npz_member(tmp_path / "packed.npz", "x_train") is None
    assert map_npz_member(tmp_path / "plain.npz", "x_nothing") is None
    with zipfile.ZipFile(tmp_path / "plain.npz") as zf:
        assert zf.getinfo("x_train.npy").compress_type == zipfile.ZIP_STORED
    plain, packed = load_npz(tmp_path / "plain.npz", mmap=True), load_npz(tmp_path / "packed.npz", mmap=True)
    assert plain.train.mapped and not packed.train.mapped
    assert np.array_equal(plain.train.images, packed.train.images)
    hw = np.zeros((4, 6, 6), np.uint8)  # (n, h, w) is mapped as (n, 1, h, w)
    np.savez(tmp_path / "gray.npz", x_train=hw, y_train=np.zeros(4, np.int64))
    gray = load_npz(tmp_path / "gray.npz", mmap=True)
    assert gray.train.mapped and gray.train.images.shape == (4, 1, 6, 6)


def test_spilled_sets_leave_no_file_behind(tmp_path: Path) -> None:
    parts = [np.full((3, 1, 2, 2), i, np.uint8) for i in range(3)]
    out = spill_images(parts, tmp_path / "spill")
    assert isinstance(out, np.memmap) and out.shape == (9, 1, 2, 2) and list(out[::3, 0, 0, 0]) == [0, 1, 2]
    assert list((tmp_path / "spill").iterdir()) == []  # unlinked once mapped; the mapping still reads it
    from training.data import ImageSet

    sets = [ImageSet(p, np.zeros(3, np.int64), [{}] * 3) for p in parts]
    both = concat(sets, name="pool", spill=tmp_path / "spill")
    assert both.mapped and np.array_equal(both.images, np.concatenate(parts))


@pytest.mark.parametrize(("kw", "message"), [
    (dict(object_store="http://bucket/blobs/", data="hub:http://hub"), "--object-store must be s3://BUCKET/PREFIX/"),
    (dict(object_store="s3:///blobs/", data="hub:http://hub"), "received 's3:///blobs/'"),
    (dict(object_store="s3://bucket/blobs/"), "--data must be hub:URL with it"),
])
def test_bad_stream_and_store_options_are_refused(make_args: MakeArgs, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        make_args(**kw).validate()


def test_an_endpoint_boto3_cannot_use_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.local:9000")
    with pytest.raises(InvalidInput, match="--object-store s3://bucket/blobs/: boto3 cannot make an S3 client "
                       r"\(Invalid endpoint: minio.local:9000\); expected AWS_ENDPOINT_URL"):
        ObjectStoreReader("s3://bucket/blobs/")


def test_a_streamed_detector_is_the_in_memory_one(make_det_args: MakeArgs, scenes_npz: Path, tmp_path: Path,
                                                  hub: InProcHub) -> None:
    """Boxes from a hub snapshot plus the scenes replay set (mapped from its npz), trained by fcos_tiny in memory
    and streamed: the same data, losses and weights."""
    add_detect_cases(hub, 24, class_names=("0", "1", "2", "3"))  # the classes of the scenes replay set
    sid = pull_snapshot(trainer(hub), cache_dir=tmp_path / "warm").snapshot_id
    common: dict[str, Any] = dict(data="hub:http://hub", snapshot=sid, base=f"npz:{scenes_npz}", holdout=0.25,
                                  image_size=(64, 64), channels=1, gate_against=None)
    mem = main(make_det_args(out=tmp_path / "mem", cache_dir=tmp_path / "c1", **common), client_factory=factory(hub))
    streamed = main(make_det_args(out=tmp_path / "str", cache_dir=tmp_path / "c2", stream=True, **common),
                    client_factory=factory(hub))
    assert streamed["data"]["streamed"] is True and mem["data"]["streamed"] is False
    assert streamed["data"]["fingerprint"] == mem["data"]["fingerprint"]
    assert [h["loss"] for h in streamed["training"]["history"]] == [h["loss"] for h in mem["training"]["history"]]
    a = torch.load(tmp_path / "mem" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "str" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "c2" / "decoded").glob(f"{sid}-*.npy"))) == 2
