"""Private files on the hub's disk: folders it creates are 0700 and files 0600, whatever the umask.

The data folder holds the database (tokens' hashes, every case) and the blob store (every image and
model): nothing there is for other users of the machine. A folder the operator created beforehand
keeps its mode, with a warning when others can read it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) mode 0700; warn if an existing one is open to others."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is masked by the umask
    if not missing and path.is_dir() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("%s is readable by other users (mode %o); the hub keeps tokens and images there: "
                    "chmod 700 it", path, stat.S_IMODE(path.stat().st_mode))
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if it does not exist, or tighten an existing one to 0600."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    os.close(fd)
    if stat.S_IMODE(path.stat().st_mode) != FILE_MODE:
        os.chmod(path, FILE_MODE)
    return path
