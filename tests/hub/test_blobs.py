"""The blob store: content-addressed, atomic, idempotent, and no name but a sha256 reaches the disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fleet.errors import IntegrityError, InvalidInput
from fleet.hub.blobs import BlobStore, FileBlobStore, MemoryBlobStore


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "s3":  # the same tests against a real S3-compatible server (tests/support/s3.py)
        from fleet.hub.blobs_s3 import S3BlobStore
        from tests.support.s3 import new_bucket, s3_url

        return S3BlobStore(new_bucket(), endpoint_url=s3_url())
    return FileBlobStore(tmp_path / "blobs") if request.param == "file" else MemoryBlobStore()


def test_put_get_idempotent(store: BlobStore) -> None:
    sha, created = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest() and created
    assert store.put(b"hello") == (sha, False)
    assert store.get(sha) == b"hello" and store.exists(sha)
    assert b"".join(store.iter_chunks(sha, 2)) == b"hello"
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(KeyError):
        store.get(sha)


def test_expected_hash_must_match(store: BlobStore) -> None:
    with pytest.raises(IntegrityError):
        store.put(b"x", sha256="0" * 64)


@pytest.mark.parametrize("key", ["../../etc/passwd", "A" * 64, "abc", "/" + "0" * 63, ""])
def test_only_hashes_are_keys(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidInput):
        store.get(key)


def test_file_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    for i in range(5):
        store.put(bytes([i]) * 100)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 5 and not any(p.name.startswith(".tmp") for p in files)


def test_put_file_streams_and_checks_the_hash(store: BlobStore, tmp_path: Path) -> None:
    data = b"model bytes " * 100_000
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with src.open("rb") as fh, pytest.raises(IntegrityError):
        store.put_file(fh, sha256="0" * 64)
    assert not store.exists("0" * 64) and [s for s, _ in store.list_blobs()] == []
    with src.open("rb") as fh:
        assert store.put_file(fh, sha256=sha) == (sha, True)
    with src.open("rb") as fh:
        assert store.put_file(fh, sha256=sha) == (sha, False)
    assert store.get(sha) == data
    assert [s for s, _ in store.list_blobs()] == [sha]


def test_file_store_is_private(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = FileBlobStore(tmp_path / "data" / "blobs")
        sha, _ = store.put(b"secret image")
    finally:
        os.umask(old)
    path = store.path(sha)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "data", tmp_path / "data" / "blobs",
                                                         path.parent.parent, path.parent)}
    assert set(modes.values()) == {0o700}, {str(k): oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
