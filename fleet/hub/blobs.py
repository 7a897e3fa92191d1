"""Content-addressed blob storage: a small protocol an S3-compatible store can implement, and a filesystem one.

Files are private (folders 0700, blobs 0600). Large uploads (models) go in with :meth:`put_file`,
which copies from an open file in chunks and hashes on the way, so memory stays bounded whatever
the size. :meth:`list_blobs` lets :mod:`fleet.hub.sweep` find blobs no row refers to.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from fleet.errors import IntegrityError, InvalidInput
from fleet.hub.fsperm import DIR_MODE, FILE_MODE, private_dir
from fleet.protocol import SHA256_RE

CHUNK = 1 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(fh: BinaryIO, *, limit: int | None = None) -> tuple[str, int]:
    """(sha256, size) of what ``fh`` holds from its position to its end, read in 1 MiB chunks.

    Stops reading past ``limit`` bytes (the size returned is then ``limit + 1``): a caller that
    knows the size to expect never hashes more than that.
    """
    h = hashlib.sha256()
    size = 0
    while chunk := fh.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if limit is not None and size > limit:
            return h.hexdigest(), limit + 1
    return h.hexdigest(), size


def check_key(sha256: str) -> str:
    """A blob key must be 64 lowercase hex digits: nothing else ever reaches a path."""
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise InvalidInput(f"blob key must be 64 lowercase hex characters (sha256); received {sha256!r:.80}")
    return sha256


@runtime_checkable
class BlobStore(Protocol):
    """Bytes stored under their sha256. ``put`` is idempotent and atomic: a reader never sees half a blob."""

    def put(self, data: bytes, *, sha256: str | None = None, verified: bool = False) -> tuple[str, bool]:
        """Store ``data``; return (sha256, created). If ``sha256`` is given it must match the bytes;
        ``verified``: the caller has just hashed ``data`` to ``sha256`` (it is not hashed again)."""
        ...

    def put_file(self, fh: BinaryIO, *, sha256: str) -> tuple[str, bool]:
        """Store what ``fh`` holds from its position on, in bounded memory; it must hash to ``sha256``."""
        ...

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        """Every stored blob as (sha256, unix time it was last written)."""
        ...

    def delete_if_unused(self, sha256: str, *, older_than: float, in_use: Callable[[str], bool]) -> bool:
        """Remove the blob if last written before ``older_than`` and not ``in_use``; whether it was removed."""
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
        self.root = private_dir(Path(root))
        self.fsync = fsync
        self._root = str(self.root)
        self._dirs: set[str] = set()
        self._seq = itertools.count()
        self._pid = os.getpid()

    def path(self, sha256: str) -> Path:
        return Path(self._path(check_key(sha256)))

    def _path(self, sha256: str) -> str:
        return os.path.join(self._root, sha256[:2], sha256[2:4], sha256)

    def put(self, data: bytes, *, sha256: str | None = None, verified: bool = False) -> tuple[str, bool]:
        digest = check_key(sha256) if verified and sha256 is not None else sha256_hex(data)
        if sha256 is not None and check_key(sha256) != digest:
            raise IntegrityError(f"blob sha256 is {digest}, expected {sha256}")
        target = self._path(digest)
        if self._touch(target):
            return digest, False
        self._write(target, lambda out: out.write(data))
        return digest, True

    def _touch(self, target: str) -> bool:
        """Whether ``target`` exists; if so its mtime becomes now, so a sweep running meanwhile keeps it."""
        try:
            os.utime(target)
            return True
        except FileNotFoundError:
            return False

    def put_file(self, fh: BinaryIO, *, sha256: str) -> tuple[str, bool]:
        target = self._path(check_key(sha256))
        if self._touch(target):
            digest, _size = hash_file(fh)
            if digest != sha256:
                raise IntegrityError(f"blob sha256 is {digest}, expected {sha256}")
            return sha256, False

        def copy(out: BinaryIO) -> None:
            h = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            if h.hexdigest() != sha256:
                raise IntegrityError(f"blob sha256 is {h.hexdigest()}, expected {sha256}")

        self._write(target, copy)
        return sha256, True

    def _write(self, target: str, fill: Callable[[BinaryIO], Any]) -> None:
        """Write a temp file next to ``target`` with ``fill(file)``, then rename it into place."""
        folder = os.path.dirname(target)
        if folder not in self._dirs:
            for d in (os.path.dirname(folder), folder):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, DIR_MODE)
            self._dirs.add(folder)
        # a name no other writer (process, thread) uses; the rename makes the blob appear whole
        tmp = os.path.join(folder, f".tmp-{self._pid}-{threading.get_ident()}-{next(self._seq)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        for top in sorted(os.listdir(self._root)):
            top_dir = os.path.join(self._root, top)
            if len(top) != 2 or not os.path.isdir(top_dir):
                continue
            for sub in sorted(os.listdir(top_dir)):
                sub_dir = os.path.join(top_dir, sub)
                if len(sub) != 2 or not os.path.isdir(sub_dir):
                    continue
                with os.scandir(sub_dir) as entries:
                    for e in entries:
                        if SHA256_RE.match(e.name) and e.is_file():
                            yield e.name, e.stat().st_mtime

    def delete_if_unused(self, sha256: str, *, older_than: float, in_use: Callable[[str], bool]) -> bool:
        """Remove the blob if it was last written before ``older_than`` and ``in_use(sha256)`` says no.

        Safe against an upload of the same bytes at that moment: the file is first moved aside, then
        checked (an upload that found it touched its mtime; one that did not wrote a new copy), and
        put back if anything wants it.
        """
        path = self._path(check_key(sha256))
        aside = f"{path}.sweep-{self._pid}-{threading.get_ident()}"
        try:
            if os.stat(path).st_mtime >= older_than:
                return False
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if os.stat(aside).st_mtime >= older_than or in_use(sha256):
            if os.path.exists(path):
                os.unlink(aside)  # an upload wrote it again meanwhile (same bytes)
            else:
                os.rename(aside, path)
            return False
        os.unlink(aside)
        return not os.path.exists(path)  # an upload may have written a fresh copy meanwhile

    def remove_stale_temp_files(self, older_than: float) -> int:
        """Delete temp files a crash left (mid-write, mid-sweep) last written before ``older_than``; return how many."""
        n = 0
        for folder in self.root.glob("*/*"):
            for p in [*folder.glob(".tmp-*"), *folder.glob("*.sweep-*")]:
                try:
                    if p.stat().st_mtime < older_than:
                        p.unlink()
                        n += 1
                except FileNotFoundError:
                    continue
        return n

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
        self.written_at: dict[str, float] = {}

    def put(self, data: bytes, *, sha256: str | None = None, verified: bool = False) -> tuple[str, bool]:
        digest = check_key(sha256) if verified and sha256 is not None else sha256_hex(data)
        if sha256 is not None and check_key(sha256) != digest:
            raise IntegrityError(f"blob sha256 is {digest}, expected {sha256}")
        created = digest not in self.data
        self.data[digest] = bytes(data)
        self.written_at[digest] = time.time()
        return digest, created

    def put_file(self, fh: BinaryIO, *, sha256: str) -> tuple[str, bool]:
        return self.put(fh.read(), sha256=sha256)

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        for sha in sorted(self.data):
            yield sha, self.written_at.get(sha, 0.0)

    def delete_if_unused(self, sha256: str, *, older_than: float, in_use: Callable[[str], bool]) -> bool:
        if sha256 not in self.data or self.written_at.get(sha256, 0.0) >= older_than or in_use(sha256):
            return False
        self.delete(sha256)
        return True

    def get(self, sha256: str) -> bytes:
        return self.data[check_key(sha256)]

    def exists(self, sha256: str) -> bool:
        return check_key(sha256) in self.data

    def delete(self, sha256: str) -> None:
        self.data.pop(check_key(sha256), None)
        self.written_at.pop(sha256, None)

    def iter_chunks(self, sha256: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        data = self.get(sha256)
        for i in range(0, len(data), chunk_size):
            yield data[i : i + chunk_size]

