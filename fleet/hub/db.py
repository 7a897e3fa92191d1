"""Engine factory (never at import time), sessions, migrations and a portable upsert."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.hub.fsperm import private_file
from fleet.hub.settings import SQLITE_MEMORY_MIB

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_WRITE = "flywheel_write"
_WRITERS: weakref.WeakKeyDictionary[Engine, tuple[Engine, Any]] = weakref.WeakKeyDictionary()


def make_engine(url: str, *, pool_size: int = 20, sqlite_memory_mib: int = SQLITE_MEMORY_MIB, **kw: Any) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE for writers, and a soft
    limit of ``sqlite_memory_mib`` on the memory all its connections in this process hold: without it each
    pooled connection keeps its own page cache (2 MiB by default), so the hub's memory grows with the pool
    and the database instead of staying flat."""
    u = sa.make_url(url)
    if u.get_backend_name() == "sqlite":
        database = u.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            private_file(Path(database))  # 0600 before SQLite opens it; its -wal and -shm files follow its mode
        engine = sa.create_engine(
            u,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=2 * pool_size,
            pool_timeout=60,
        )
        _sqlite_events(engine, sqlite_memory_mib)
        return engine
    if u.get_backend_name() == "postgresql":
        return sa.create_engine(
            u, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800, pool_timeout=60, **kw,
        )
    raise ValueError(f"database_url must be sqlite or postgresql; received {u.get_backend_name()!r}")


def _sqlite_events(engine: Engine, memory_mib: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        # process-wide: SQLite recycles page-cache pages (of any connection) to stay under it
        cur.execute(f"PRAGMA soft_heap_limit={int(memory_mib) * 1024 * 1024}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # A writer takes the write lock up front: a deferred transaction that reads and then writes
        # fails at once with SQLITE_BUSY when another writer committed in between.
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as s:
        yield s


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    writer, lock = _writer(engine)
    with lock, Session(writer, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


def _writer(engine: Engine) -> tuple[Engine, Any]:
    """The engine's write flavour, and the lock writers of this process queue on.

    SQLite has one writer at a time; letting threads queue on a lock here is much cheaper than
    letting them spin in SQLite's busy handler (which sleeps up to 100 ms a try). PostgreSQL
    writers run in parallel (a no-op lock).
    """
    cached = _WRITERS.get(engine)
    if cached is None:
        lock: Any = threading.Lock() if is_sqlite(engine) else nullcontext()
        cached = _WRITERS.setdefault(engine, (engine.execution_options(**{_WRITE: True}), lock))
    return cached


@contextmanager
def write_connection(engine: Engine) -> Iterator[sa.Connection]:
    """A Core connection in a write transaction (BEGIN IMMEDIATE on SQLite): commit, or roll back on error."""
    writer, lock = _writer(engine)
    with lock, writer.begin() as conn:
        yield conn


def insert_ignore(engine: Engine, table: sa.Table, values: dict[str, Any]) -> sa.Insert:
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL."""
    return dialect_insert(engine, table).values(**values).on_conflict_do_nothing()  # type: ignore[no-any-return]


def upsert_add(engine: Engine, table: sa.Table, keys: dict[str, Any], increments: dict[str, int]) -> Any:
    """INSERT keys+increments, or on conflict add the increments to the existing row."""
    return upsert_add_rows(engine, table, [{**keys, **increments}], keys=list(keys), increments=list(increments))


def upsert_add_rows(engine: Engine, table: sa.Table, rows: list[dict[str, Any]], *, keys: list[str],
                    increments: list[str]) -> Any:
    """:func:`upsert_add` for several rows in one statement (each key at most once among ``rows``)."""
    ins = dialect_insert(engine, table).values(rows)
    return ins.on_conflict_do_update(
        index_elements=keys,
        set_={k: table.c[k] + ins.excluded[k] for k in increments},
    )


def dialect_insert(engine: Engine, table: sa.Table) -> Any:
    if is_sqlite(engine):
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert(table)


# ---------------------------------------------------------------------------------------------
# migrations
# ---------------------------------------------------------------------------------------------


def alembic_config(engine: Engine | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (Alembic), holding a lock so workers do not race."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.connect() as conn:
        if not is_sqlite(engine):
            conn.exec_driver_sql("SELECT pg_advisory_lock(724011)")
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            if not is_sqlite(engine):
                conn.exec_driver_sql("SELECT pg_advisory_unlock(724011)")
                conn.commit()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def hub_missing(url: str) -> str | None:
    """Why ``url`` holds no hub to work on, or None when it does: a SQLite file that does not exist, a server that
    cannot be reached, or a database no hub has set up (no schema revision). Creates nothing: a command that works
    on an existing hub (a sweep, a re-score, the token list) must not make an empty one where it was misdirected."""
    u = sa.make_url(url)
    if u.get_backend_name() == "sqlite":
        database = u.database or ""
        if not database or database == ":memory:":
            return "an in-memory SQLite database holds no hub"
        if not database.startswith("file:") and not Path(database).is_file():
            return f"{database} does not exist"
    engine = make_engine(url, pool_size=1)
    try:
        revision = current_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
        return f"it cannot be opened ({type(exc).__name__}: {first})"
    finally:
        engine.dispose()
    return None if revision is not None else "no hub has set it up (it has no schema revision)"
