"""Crash-safe file writes (write a temporary file, fsync it, rename it over the target, fsync the folder),
and private folders and files: the agent's data holds its token and the frames it keeps."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700, whatever the umask (an existing one is left)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 unless it exists, and make an existing one 0600 (an older agent's);
    SQLite's -wal and -shm files then follow its mode."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """After a crash, ``path`` holds either its old bytes or ``data``, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"), mode=mode)


def remove_stale_tmp(directory: Path) -> int:
    """Delete the ``.*.tmp`` files a crash left behind in ``directory``; return how many."""
    n = 0
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n
