"""Process-wide memory settings for a hub worker.

A hub worker serves its synchronous routes from a pool of threads (anyio's, 40 by default). glibc's
malloc gives threads their own arenas, up to eight per core, and memory freed in one arena is not
reused by another: under a steady load the worker's resident memory keeps creeping up for many
minutes (a 200-device soak: +27 MiB in 10 minutes, still rising) although Python's own heap stays flat
(tracemalloc: under 0.1 MiB between snapshots a minute apart). Two arenas are enough for a worker whose
threads mostly wait on the database and the network (the same soak: +8 MiB in 5 minutes, flattening).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number for the arena cap (malloc.h)


def limit_malloc_arenas(n: int) -> bool:
    """Cap glibc malloc arenas for threads created from now on at ``n``; True if the C library took it.

    ``n`` <= 0 leaves glibc's default. On a C library without ``mallopt`` (musl, macOS) nothing changes.
    """
    if n <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in this C library; malloc arenas left as they are")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, n))
