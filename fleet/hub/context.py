"""What every request needs: settings, the engine, the blob store and small per-worker caches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fastapi import Request
from sqlalchemy.engine import Engine

from fleet.hub.blobs import BlobStore
from fleet.hub.settings import HubSettings

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A tiny thread-safe cache whose entries expire after ``ttl`` seconds (0 = no caching)."""

    def __init__(self, ttl: float, *, max_size: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_size = max_size
        self.clock = clock
        self._data: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            if hit[0] < self.clock():
                del self._data[key]
                return None
            return hit[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._data) >= self.max_size:
                self._data.clear()
            self._data[key] = (self.clock() + self.ttl, value)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


@dataclass
class Hub:
    settings: HubSettings
    engine: Engine
    blobs: BlobStore
    clock: Callable[[], float] = time.time
    tokens: TTLCache[str, Any] = field(init=False)
    models: TTLCache[str, Any] = field(init=False)
    yields: TTLCache[str, Any] = field(init=False)  # /metrics' per-trigger yields: (counted at, YieldReport)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens = TTLCache(self.settings.token_cache_ttl_s)
        self.models = TTLCache(max(self.settings.token_cache_ttl_s, 1.0))
        self.yields = TTLCache(self.settings.metrics_yields_max_age_s, max_size=1, clock=lambda: self.clock())

    def now(self) -> float:
        return self.clock()

    def autocommit_engine(self) -> Engine:
        """A second engine on the same PostgreSQL database whose statements commit by themselves.

        Case ingest is one statement there, so it needs no BEGIN/COMMIT round trips.
        """
        eng = self.stats.get("autocommit_engine")
        if eng is None:
            from fleet.hub.db import make_engine

            eng = self.stats["autocommit_engine"] = make_engine(
                self.engine.url.render_as_string(hide_password=False), pool_size=self.settings.db_pool_size,
                sqlite_memory_mib=self.settings.sqlite_memory_mib, isolation_level="AUTOCOMMIT")
        return eng  # type: ignore[no-any-return]

    def close(self) -> None:
        eng = self.stats.pop("autocommit_engine", None)
        if eng is not None:
            eng.dispose()


def get_hub(request: Request) -> Hub:
    return request.app.state.hub  # type: ignore[no-any-return]
