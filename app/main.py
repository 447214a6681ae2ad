"""The FastAPI application: routers, error handlers, and the start-up checks."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI

from app.api.deps import check_request, request_token
from app.api.event_stream import EventHub
from app.api.image_polls import ImagePollShortcut
from app.api.middleware import (
    ConditionalGetMiddleware,
    DatabaseRequestLimit,
    RequestBodyGate,
    RequestIdMiddleware,
    RequestSlots,
)
from app.api.openapi import install_openapi, operation_id
from app.api.routes import (
    accounts,
    assets,
    computes,
    distribution,
    events,
    health,
    images,
    manifests,
    models,
    oauth,
    principals,
    services,
    webhooks,
)
from app.api.routes import ui as dashboard
from app.api.uploads import remove_stale_uploads
from app.config import Settings, get_settings
from app.context import ServiceContext
from app.database import ensure_migrated
from app.errors import install_error_handlers
from app.log_config import configure_logging
from app.metrics import DatabaseCollector
from app.private_files import restrict_new_files

log = logging.getLogger("mms.app")


def create_app(settings: Settings | None = None, context: ServiceContext | None = None) -> FastAPI:
    """Build the application for the given settings (default: from the environment)."""
    context = context or ServiceContext.build(settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_migrated(context.engine)
        settings = context.settings
        await to_thread.run_sync(
            lambda: remove_stale_uploads(settings.uploads_dir, older_than_seconds=settings.upload_stale_seconds)
        )
        context.signing_key()
        # No more request threads than database connections: a burst queues on the event
        # loop, rather than in threads that hold the GIL while they wait for a connection.
        to_thread.current_default_thread_limiter().total_tokens = max(
            4, context.settings.db_pool_size + context.settings.db_max_overflow
        )
        await app.state.event_hub.start()
        log.info("app.started", extra={"database": context.engine.url.render_as_string(hide_password=True)})
        yield
        try:
            await app.state.event_hub.stop()
        finally:
            try:
                await context.reads.close()
                await context.writes.close()
            finally:
                context.dispose()

    app = FastAPI(
        title="Model Management Service",
        version="0.1.0",
        description="A model registry, manifests and scoring-image builds, "
        "in the lineage of Azure ML Model Management.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.context = context
    app.state.event_hub = EventHub(
        context.read_session_factory,
        interval=context.settings.events_poll_seconds,
        recheck_seconds=context.settings.stream_recheck_seconds,
    )
    app.state.metrics = DatabaseCollector(context.read_session_factory)
    install_error_handlers(app)
    install_openapi(app)
    # Innermost of the middleware: its token check holds a database slot like any request.
    app.add_middleware(
        RequestBodyGate,
        max_bytes=context.settings.max_json_body_bytes,
        verify=lambda scope, authorization: request_token(scope, context.verifier, authorization),
    )
    app.add_middleware(ConditionalGetMiddleware)
    # One connection stays free for the event poller and /metrics.
    app.state.request_slots = RequestSlots(
        max(
            1,
            min(context.settings.api_concurrency, context.settings.db_pool_size + context.settings.db_max_overflow - 1),
        )
    )
    app.add_middleware(DatabaseRequestLimit, slots=app.state.request_slots)
    app.add_middleware(ImagePollShortcut)
    app.add_middleware(RequestIdMiddleware)

    api = APIRouter(prefix="/api", dependencies=[Depends(check_request)])
    api.include_router(accounts.router)
    api.include_router(accounts.discovery)
    api.include_router(models.router)
    api.include_router(assets.router)
    api.include_router(manifests.router)
    api.include_router(images.router)
    if context.settings.web_services_preview:
        api.include_router(computes.router)
        api.include_router(services.router)
    api.include_router(events.router)
    api.include_router(webhooks.router)
    api.include_router(principals.router)
    app.include_router(api)
    app.include_router(assets.blob_router)
    app.include_router(oauth.router)
    app.include_router(distribution.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    return app


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory app.main:app_factory`, in each API process."""
    restrict_new_files()  # the data folder's files are the service's alone
    settings = get_settings()
    # With --workers, each process is a fresh interpreter: it sets up its own logging.
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # What is alive now (modules, routes, schemas: ~180,000 objects) lives as long as the
    # process. A full collection walks all of it, ~100 ms on this machine, a pause every
    # request in flight waits out; frozen, it is never walked again.
    gc.collect()
    gc.freeze()
    return app
