"""The scorer's HTTP app: score documents with an influence-model version of a run.

POST /v1/score    {"model": "<run_id>/<stage>|<run_id>/latest", "documents": [{id, text}]}
                  -> [{id, score}] in request order; header X-Model-Version: <run_id>/<stage>
GET  /v1/models   every model version in the artifact store, with its fit report
GET  /healthz     the process is alive
GET  /readyz      the artifact store is readable and the model thread runs (503 if not)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily

from mates.errors import MatesError
from services.common.auth import require_key, require_read_key
from services.common.contracts import (
    MODEL_VERSION_HEADER,
    SCORE_RESPONSES,
    DocumentScore,
    ModelInfo,
    ScoreRequest,
)
from services.common.edge import install_edge, unprocessable
from services.common.metrics import FunctionCollector, install_metrics
from services.common.settings import Settings, get_settings
from services.scorer.errors import (
    BadModelName,
    ModelNotFound,
    ModelNotReady,
    ScorerError,
    ShuttingDown,
    TooLarge,
)
from services.scorer.service import ScoringService

log = logging.getLogger(__name__)

ERROR_STATUS: dict[type[ScorerError], int] = {
    BadModelName: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ModelNotFound: status.HTTP_404_NOT_FOUND,
    ModelNotReady: status.HTTP_409_CONFLICT,
    TooLarge: status.HTTP_413_CONTENT_TOO_LARGE,
    ShuttingDown: status.HTTP_503_SERVICE_UNAVAILABLE,
}


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def scoring_service(request: Request) -> ScoringService:
    return request.app.state.service


KeyRequired = Annotated[None, Depends(require_key(app_settings))]
ReadKey = Annotated[None, Depends(require_read_key(app_settings))]
Service = Annotated[ScoringService, Depends(scoring_service)]

router = APIRouter()


@router.post("/v1/score", response_model=list[DocumentScore], responses=SCORE_RESPONSES)
async def score(
    req: ScoreRequest, response: Response, service: Service, _: KeyRequired
) -> list[DocumentScore]:
    """Score documents with an influence-model version: a list of `{id, score}`, one per
    document in request order. The resolved version (`<run_id>/<stage>`, `latest` resolved)
    is in the `X-Model-Version` response header."""
    scored = await service.score(req)
    response.headers[MODEL_VERSION_HEADER] = scored.version
    return scored.scores


@router.get("/v1/models", response_model=list[ModelInfo])
def models(service: Service, _: ReadKey) -> list[ModelInfo]:
    return service.models()


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(service: Service) -> dict:
    problem = service.not_ready()
    if problem:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, problem)
    return {"status": "ready"}


async def _scorer_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, BadModelName):
        return unprocessable(str(exc), [("body", "model")], "bad_model_name")
    code = next(c for t, c in ERROR_STATUS.items() if isinstance(exc, t))
    return JSONResponse({"detail": str(exc)}, status_code=code)


async def _library_error(request: Request, exc: Exception) -> JSONResponse:
    """An unreadable model and the like: the library's message beats a bare 500."""
    log.error("%s: %s", type(exc).__name__, exc)
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service = ScoringService(app.state.settings)
    service.batcher.on_batch = app.state.observe_batch
    service.start()
    app.state.service = service
    try:
        yield
    finally:
        service.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The scorer app; refuses the placeholder API key outside development mode."""
    settings = settings or get_settings()
    settings.check_key()
    app = FastAPI(title="MATES scorer", version="1", lifespan=_lifespan)
    app.state.settings = settings
    app.include_router(router)
    for exc_type in ERROR_STATUS:
        app.add_exception_handler(exc_type, _scorer_error)
    app.add_exception_handler(MatesError, _library_error)
    install_edge(app, settings, expose_headers=(MODEL_VERSION_HEADER,))
    registry = install_metrics(
        app, ReadKey, [FunctionCollector("scorer", lambda: _cache_metrics(app))]
    )
    batch_docs = Histogram(
        "mates_scorer_batch_documents",
        "Documents per forward pass of the scorer's model thread",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        registry=registry,
    )
    documents = Counter(
        "mates_scorer_documents",
        "Documents scored (rate(): documents per second)",
        registry=registry,
    )

    def observe_batch(n: int) -> None:
        batch_docs.observe(n)
        documents.inc(n)

    app.state.observe_batch = observe_batch
    return app


def _cache_metrics(app: FastAPI) -> Iterator[CounterMetricFamily]:
    service = getattr(app.state, "service", None)
    if service is None:
        return
    yield CounterMetricFamily(
        "mates_scorer_model_cache_hits",
        "Requests served by a model already loaded",
        value=service.cache.hits,
    )
    yield CounterMetricFamily(
        "mates_scorer_model_loads",
        "Models read from disk into the cache",
        value=service.cache.loads,
    )


def serve(settings: Settings | None = None) -> None:
    """Run the scorer with uvicorn on `scorer_host:scorer_port`."""
    settings = settings or get_settings()
    settings.check_key()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    uvicorn.run(create_app(settings), host=settings.scorer_host, port=settings.scorer_port)
