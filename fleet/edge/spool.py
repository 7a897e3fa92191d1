"""A durable on-disk queue of flagged cases, with a byte cap and priority eviction.

SQLite in WAL mode with ``synchronous=FULL``: every put, eviction and ack is one transaction, so a
power cut or ``kill -9`` at any instant leaves either the state before it or the state after it.
Each row holds the case JSON and its PNG bytes. The byte cap counts those payload bytes; when a new
case does not fit, the lowest-priority cases (oldest first among equals) are evicted, but only if
they rank strictly below the newcomer; otherwise the newcomer is the one dropped. Either way the
eviction is counted in the same transaction.

Counters persist across restarts and keep one invariant, checked by :meth:`Spool.check`::

    offered == items + acked + dropped + evicted
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.edge.fsutil import private_file
from fleet.errors import InvalidInput

log = logging.getLogger(__name__)

COUNTERS = ("bytes", "offered", "acked", "dropped", "evicted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id    TEXT NOT NULL UNIQUE,
    priority   REAL NOT NULL,
    created_at REAL NOT NULL,
    nbytes     INTEGER NOT NULL,
    case_json  TEXT NOT NULL,
    image      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_evict ON items (priority ASC, seq ASC);
CREATE INDEX IF NOT EXISTS items_send ON items (priority DESC, seq ASC);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpoolItem:
    seq: int
    case_id: str
    priority: float
    created_at: float
    nbytes: int
    case_json: str
    image: bytes


@dataclass(frozen=True)
class PutResult:
    stored: bool  # False: the newcomer itself was dropped (too big, or ranked below what it would evict)
    evicted: tuple[str, ...] = ()  # case ids evicted to make room
    duplicate: bool = False  # the case id was already in the spool; nothing changed


@dataclass(frozen=True)
class SpoolStats:
    items: int
    bytes: int
    offered: int
    acked: int
    dropped: int
    evicted: int
    max_bytes: int


class SpoolCheckError(AssertionError):
    """The on-disk state breaks an invariant (only after a bug or a damaged disk)."""


class Spool:
    """The queue. Thread-safe: the recorder puts, the uplink peeks and acks, the heartbeat reads stats."""

    def __init__(self, path: str | Path, *, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InvalidInput(f"spool max_bytes must be a positive integer; received {max_bytes!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        private_file(self.path)  # 0600 in a 0700 folder: the spool holds the frames the device kept
        self._db = self._open()

    # -- public -------------------------------------------------------------------------------

    def put(self, case_id: str, priority: float, case_json: str, image: bytes) -> PutResult:
        """Store one case, evicting lower-priority ones if the cap requires it. Idempotent on case_id."""
        if not isinstance(priority, (int, float)) or not math.isfinite(priority) or not 0 <= priority <= 1:
            raise InvalidInput(f"spool priority must be a finite number in [0, 1]; received {priority!r}")
        payload = case_json.encode("utf-8")
        nbytes = len(payload) + len(image)
        with self._lock, self._tx() as db:
            if db.execute("SELECT 1 FROM items WHERE case_id = ?", (case_id,)).fetchone():
                return PutResult(stored=False, duplicate=True)
            self._bump(db, "offered", 1)
            if nbytes > self.max_bytes:
                log.warning("spool: case %s is %d bytes, over the whole cap of %d; dropped",
                            case_id, nbytes, self.max_bytes)
                self._bump(db, "evicted", 1)
                return PutResult(stored=False)
            need = self._get(db, "bytes") + nbytes - self.max_bytes
            victims: list[tuple[int, str, int]] = []
            if need > 0:
                freed = 0
                rows = db.execute("SELECT seq, case_id, priority, nbytes FROM items ORDER BY priority ASC, seq ASC")
                for seq, vid, vprio, vbytes in rows:
                    if vprio >= priority:
                        break
                    victims.append((seq, vid, vbytes))
                    freed += vbytes
                    if freed >= need:
                        break
                rows.close()
                if freed < need:  # the newcomer ranks lowest: it is the one to go
                    self._bump(db, "evicted", 1)
                    return PutResult(stored=False)
                db.executemany("DELETE FROM items WHERE seq = ?", [(v[0],) for v in victims])
                self._bump(db, "evicted", len(victims))
                self._bump(db, "bytes", -freed)
            db.execute(
                "INSERT INTO items (case_id, priority, created_at, nbytes, case_json, image) VALUES (?, ?, ?, ?, ?, ?)",
                (case_id, float(priority), self._clock(), nbytes, payload.decode("utf-8"), sqlite3.Binary(image)),
            )
            self._bump(db, "bytes", nbytes)
        return PutResult(stored=True, evicted=tuple(v[1] for v in victims))

    def peek(self, limit: int = 1, *, exclude: Sequence[str] = ()) -> list[SpoolItem]:
        """The next cases to send: highest priority first, oldest first among equals."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, case_id, priority, created_at, nbytes, case_json, image FROM items "
                "ORDER BY priority DESC, seq ASC LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        skip = set(exclude)
        return [
            SpoolItem(seq=r[0], case_id=r[1], priority=r[2], created_at=r[3], nbytes=r[4], case_json=r[5],
                      image=bytes(r[6]))
            for r in rows if r[1] not in skip
        ][:limit]

    def ack(self, case_id: str) -> bool:
        """Remove a case the hub has acknowledged. False if it was no longer there (evicted meanwhile)."""
        return self._remove(case_id, "acked")

    def drop(self, case_id: str) -> bool:
        """Remove a case the hub refused for good (a permanent fault); counted as dropped."""
        return self._remove(case_id, "dropped")

    def stats(self) -> SpoolStats:
        with self._lock:
            (items,) = self._db.execute("SELECT COUNT(*) FROM items").fetchone()
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        return SpoolStats(items=items, max_bytes=self.max_bytes, **{k: int(meta.get(k, 0)) for k in COUNTERS})

    def check(self) -> SpoolStats:
        """Verify the file and the invariants; raise SpoolCheckError on any mismatch."""
        with self._lock:
            (ok,) = self._db.execute("PRAGMA quick_check").fetchone()
            if ok != "ok":
                raise SpoolCheckError(f"spool {self.path}: sqlite quick_check says {ok!r}")
            (total,) = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM items").fetchone()
            (real,) = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(CAST(case_json AS BLOB)) + LENGTH(image)), 0) FROM items"
            ).fetchone()
        st = self.stats()
        if st.bytes != total or total != real:
            raise SpoolCheckError(f"spool byte accounting: counter {st.bytes}, row sizes {total}, payloads {real}")
        if st.offered != st.items + st.acked + st.dropped + st.evicted:
            raise SpoolCheckError(f"spool counters do not add up: {st}")
        if st.bytes > self.max_bytes:
            raise SpoolCheckError(f"spool holds {st.bytes} bytes, over its cap of {self.max_bytes}")
        return st

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- private ------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            # Only a damaged disk gets here (SQLite's own journal survives power loss): keep the
            # evidence aside and start an empty spool rather than refusing to run.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("spool %s is unreadable (%s); moved it to %s and started empty", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.replace(Path(f"{aside}{suffix}"))
            private_file(self.path)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA cache_size=-2048")  # 2 MiB page cache: a device has little memory
            db.execute("PRAGMA journal_size_limit=8388608")
            db.executescript(_SCHEMA)
            with self._tx(db):
                db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", [(k,) for k in COUNTERS])
                self._reconcile(db)
            (ok,) = db.execute("PRAGMA quick_check").fetchone()
            if ok != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok}")
        except BaseException:
            db.close()
            raise
        return db

    def _reconcile(self, db: sqlite3.Connection) -> None:
        (total,) = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM items").fetchone()
        if total != self._get(db, "bytes"):  # pragma: no cover - cannot happen with SQLite's atomic commits
            log.warning("spool byte counter %d disagrees with rows (%d); fixed", self._get(db, "bytes"), total)
            db.execute("UPDATE meta SET value = ? WHERE key = 'bytes'", (total,))

    def _remove(self, case_id: str, counter: str) -> bool:
        with self._lock, self._tx() as db:
            row = db.execute("SELECT nbytes FROM items WHERE case_id = ?", (case_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM items WHERE case_id = ?", (case_id,))
            self._bump(db, "bytes", -row[0])
            self._bump(db, counter, 1)
        return True

    def _tx(self, db: sqlite3.Connection | None = None) -> _Transaction:
        return _Transaction(db or self._db)

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> int:
        return int(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @staticmethod
    def _bump(db: sqlite3.Connection, key: str, delta: int) -> None:
        if delta:
            db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (delta, key))


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
