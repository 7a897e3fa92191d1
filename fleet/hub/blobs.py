"""Content-addressed blob storage: a small protocol an S3-compatible store can implement, and a filesystem one."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from fleet.errors import IntegrityError, InvalidInput
from fleet.protocol import SHA256_RE


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_key(sha256: str) -> str:
    """A blob key must be 64 lowercase hex digits: nothing else ever reaches a path."""
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise InvalidInput(f"blob key must be 64 lowercase hex characters (sha256); received {sha256!r:.80}")
    return sha256


@runtime_checkable
class BlobStore(Protocol):
    """Bytes stored under their sha256. ``put`` is idempotent and atomic: a reader never sees half a blob."""

    def put(self, data: bytes, *, sha256: str | None = None) -> tuple[str, bool]:
        """Store ``data``; return (sha256, created). If ``sha256`` is given it must match the bytes."""
        ...

    def get(self, sha256: str) -> bytes:
        """The bytes, or KeyError if absent."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None:
        """Remove the blob if present (used to undo a put whose database write failed)."""
        ...

    def iter_chunks(self, sha256: str, chunk_size: int = 1 << 20) -> Iterator[bytes]: ...


class FileBlobStore:
    """Blobs as files ``root/ab/cd/abcd…``: written to a temp file in the same folder, then renamed."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._root = str(self.root)
        self._dirs: set[str] = set()
        self._seq = itertools.count()
        self._pid = os.getpid()

    def path(self, sha256: str) -> Path:
        return Path(self._path(check_key(sha256)))

    def _path(self, sha256: str) -> str:
        return os.path.join(self._root, sha256[:2], sha256[2:4], sha256)

    def put(self, data: bytes, *, sha256: str | None = None) -> tuple[str, bool]:
        digest = sha256_hex(data)
        if sha256 is not None and check_key(sha256) != digest:
            raise IntegrityError(f"blob sha256 is {digest}, expected {sha256}")
        target = self._path(digest)
        if os.path.exists(target):
            return digest, False
        folder = os.path.dirname(target)
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        # a name no other writer (process, thread) uses; the rename makes the blob appear whole
        tmp = os.path.join(folder, f".tmp-{self._pid}-{threading.get_ident()}-{next(self._seq)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest, True

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def iter_chunks(self, sha256: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            fh = self.path(sha256).open("rb")
        except FileNotFoundError:
            raise KeyError(sha256) from None
        with fh:
            yield from iter(lambda: fh.read(chunk_size), b"")


class MemoryBlobStore:
    """A dict-backed store for unit tests (pass I/O in)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, data: bytes, *, sha256: str | None = None) -> tuple[str, bool]:
        digest = sha256_hex(data)
        if sha256 is not None and check_key(sha256) != digest:
            raise IntegrityError(f"blob sha256 is {digest}, expected {sha256}")
        created = digest not in self.data
        self.data[digest] = bytes(data)
        return digest, created

    def get(self, sha256: str) -> bytes:
        return self.data[check_key(sha256)]

    def exists(self, sha256: str) -> bool:
        return check_key(sha256) in self.data

    def delete(self, sha256: str) -> None:
        self.data.pop(check_key(sha256), None)

    def iter_chunks(self, sha256: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        data = self.get(sha256)
        for i in range(0, len(data), chunk_size):
            yield data[i : i + chunk_size]
