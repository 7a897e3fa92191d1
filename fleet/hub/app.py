"""The hub's FastAPI app factory: ``create_app(settings, *, blob_store=None, engine=None)``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine

from fleet.errors import FlywheelError, ProtocolError, headers_for, status_for
from fleet.hub.blobs import BlobStore
from fleet.hub.bodies import BodyGuard
from fleet.hub.context import Hub
from fleet.hub.db import make_engine, migrate
from fleet.hub.observe import RequestMetrics
from fleet.hub.settings import DEV_WARNING, HubSettings
from fleet.hub.stores import make_blob_store
from fleet.hub.trust import retire_untrusted_models

log = logging.getLogger(__name__)


def create_app(
    settings: HubSettings | None = None,
    *,
    blob_store: BlobStore | None = None,
    engine: Engine | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """Build a hub app. Refuses default secrets outside dev mode; migrates the database on start."""
    settings = settings or HubSettings()
    settings.check()
    if settings.dev:
        log.warning(DEV_WARNING)
    own_engine = engine is None
    engine = engine or make_engine(settings.resolved_database_url(), pool_size=settings.db_pool_size,
                                   sqlite_memory_mib=settings.sqlite_memory_mib)
    if blob_store is None:
        blob_store = make_blob_store(settings)
    hub = Hub(settings=settings, engine=engine, blobs=blob_store, clock=clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads  # sync routes run there
        if settings.migrate_on_start:
            migrate(engine)
        retire_untrusted_models(hub)  # a model signed by a key no longer trusted is never served as active
        log.info("hub ready: database %s, blobs %s", engine.url.render_as_string(hide_password=True),
                 type(blob_store).__name__)
        yield
        hub.close()
        if own_engine:
            engine.dispose()

    app = FastAPI(title="Flywheel hub", version="1", lifespan=lifespan)
    app.state.hub = hub
    metrics = RequestMetrics()
    app.state.request_metrics = metrics
    _install_error_handlers(app)
    from fleet.hub.routes import ROUTERS

    for router in ROUTERS:
        app.include_router(router)
    from fleet.hub.ui import install as install_dashboard

    install_dashboard(app)
    app.add_middleware(BodyGuard, settings=settings)  # type: ignore[arg-type]
    app.add_middleware(metrics.middleware)  # type: ignore[arg-type]
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (runs in each worker process): settings from the environment."""
    from fleet.hub.memory import limit_malloc_arenas

    settings = HubSettings()
    limit_malloc_arenas(settings.malloc_arenas)  # before the request threads exist
    return create_app(settings)


# ---------------------------------------------------------------------------------------------
# errors: always {"detail": "<what was received, what was expected>"}
# ---------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FlywheelError)
    async def _fault(request: Request, exc: FlywheelError) -> JSONResponse:
        """Every fault the hub's own code raises, mapped once (fleet.errors.status_for)."""
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc), headers=headers_for(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A query or path parameter FastAPI checked (bodies are fleet.protocol messages): a ProtocolError."""
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'request'}: {e.get('msg')}; received "
                 f"{_short(e.get('input'))}" for e in exc.errors()[:10]]
        return await _fault(request, ProtocolError("; ".join(parts)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
