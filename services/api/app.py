"""The control plane: create, list, watch, cancel and resume runs; model versions,
selections and on-demand scoring. It owns the run store.

Errors from the library become HTTP codes here and only here: a bad config 422, an
operation that does not fit the run's state 409, anything else the library raises 500
with its message; a broker that cannot take a task 503. The HTTP edge (body limit, the
422 shape, CORS) is `services.common.edge`, shared with the scorer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from kombu.exceptions import OperationalError as KombuOperationalError
from prometheus_client.core import GaugeMetricFamily

import mates
from mates.errors import ConfigError, DataError, MatesError, RunStateError
from services.api.deps import ReadKey
from services.api.routes import dashboard, health, models, runs, scoring
from services.common.contracts import MODEL_VERSION_HEADER
from services.common.edge import install_edge, unprocessable
from services.common.errors import BrokerUnavailable
from services.common.metrics import FunctionCollector, gauge, install_metrics
from services.common.queue import queue_depths
from services.common.settings import Settings, get_settings
from services.common.store import Store

log = logging.getLogger(__name__)

ERROR_STATUS: dict[type[MatesError], int] = {
    BrokerUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    ConfigError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    DataError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    RunStateError: status.HTTP_409_CONFLICT,
}

TAGS = [
    {"name": "runs", "description": "Submit MATES runs and follow, cancel or resume them."},
    {"name": "models", "description": "Influence-model versions fitted by the runs."},
    {"name": "scoring", "description": "Score documents with a model version (via the scorer)."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


async def _library_error(request: Request, exc: Exception) -> JSONResponse:
    code = next(
        (c for t, c in ERROR_STATUS.items() if isinstance(exc, t)),
        status.HTTP_500_INTERNAL_SERVER_ERROR,
    )
    if code >= 500:
        log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    if code == status.HTTP_422_UNPROCESSABLE_CONTENT:  # a run config: the request body
        kind = "config_error" if isinstance(exc, ConfigError) else "data_error"
        fields = exc.fields if isinstance(exc, ConfigError) else []
        return unprocessable(str(exc), [("body", *f) for f in fields] or [("body",)], kind)
    return JSONResponse({"detail": str(exc)}, status_code=code)


async def _broker_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: the broker is unavailable: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": f"the task broker is unavailable: {exc}"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    store = Store(app.state.settings.database_url)
    app.state.store = store
    try:
        yield
    finally:
        store.close()


def _queue_metrics(settings: Settings) -> Iterator[GaugeMetricFamily]:
    depths = queue_depths(settings.broker_url)
    yield gauge("mates_queue_depth", "Tasks waiting in each Celery queue", "queue", depths)


def _run_metrics(app: FastAPI) -> Iterator[GaugeMetricFamily]:
    store = getattr(app.state, "store", None)
    if store is None:
        return
    counts = {str(status): n for status, n in store.count_by_status().items()}
    yield gauge("mates_runs", "Runs in the run store by status", "status", counts)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The control-plane app; refuses the placeholder API key outside development mode."""
    settings = settings or get_settings()
    settings.check_key()
    app = FastAPI(
        title="MATES control plane",
        version=mates.__version__,
        summary="Model-aware pretraining data selection as a service.",
        description="Runs train in stages; before each stage an influence model fitted to "
        "the current checkpoint picks the data. Mutating endpoints take the bearer "
        "`MATES_API_KEY`; read endpoints do too when `MATES_READ_AUTH` is set.",
        openapi_tags=TAGS,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    for router in (runs.router, models.router, scoring.router, health.router, dashboard.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")
    app.add_exception_handler(MatesError, _library_error)
    app.add_exception_handler(KombuOperationalError, _broker_error)
    install_edge(app, settings, expose_headers=(MODEL_VERSION_HEADER,))
    runs.publish_config_schema(app)
    install_metrics(
        app,
        ReadKey,
        [
            FunctionCollector("queues", lambda: _queue_metrics(settings)),
            FunctionCollector("runs", lambda: _run_metrics(app)),
        ],
    )
    return app


def serve(settings: Settings | None = None) -> None:
    """Run the control plane with uvicorn on `api_host:api_port` (127.0.0.1:8000 by default)."""
    settings = settings or get_settings()
    settings.check_key()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port)
