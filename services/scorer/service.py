"""The scoring service: registry + model cache + batcher, behind one `score` call."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import NamedTuple

from starlette.concurrency import run_in_threadpool

from mates.errors import ArtifactError
from mates.influence import InfluenceScorer
from mates.run import resolve_device
from services.common.contracts import DocumentScore, ModelInfo, ScoreRequest
from services.common.settings import Settings
from services.scorer.batcher import Batcher
from services.scorer.cache import ModelCache
from services.scorer.errors import TooLarge
from services.scorer.registry import ModelRegistry

log = logging.getLogger(__name__)


class Scored(NamedTuple):
    """The resolved model version (`<run_id>/<stage>`) and one score per document, in order."""

    version: str
    scores: list[DocumentScore]


class ScoringService:
    """Owns the model thread; `start()` and `stop()` bracket the app's lifespan."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.registry = ModelRegistry(settings.artifacts_dir)
        self.cache = ModelCache(
            settings.scorer_cache_models,
            self.device,
            functools.partial(InfluenceScorer.load, compile=settings.scorer_compile),
        )
        self.batcher = Batcher(settings.scorer_batch_docs, settings.scorer_batch_wait_ms / 1000)

    def start(self) -> None:
        # An empty store is a ready store: the first run creates its directory in it.
        self.registry.root.mkdir(parents=True, exist_ok=True)
        self.batcher.start()
        log.info(
            "scorer ready: artifacts %s, device %s, %d docs per pass, %.1f ms batch wait",
            self.registry.root,
            self.device,
            self.batcher.max_docs,
            self.batcher.wait_s * 1000,
        )

    def stop(self) -> None:
        self.batcher.stop()

    def check_limits(self, req: ScoreRequest) -> None:
        s = self.settings
        if len(req.documents) > s.scorer_max_documents:
            raise TooLarge(
                f"{len(req.documents)} documents in one request; the limit is "
                f"{s.scorer_max_documents} (MATES_SCORER_MAX_DOCUMENTS)"
            )
        for doc in req.documents:
            if len(doc.text) > s.scorer_max_chars:
                raise TooLarge(
                    f"document {doc.id!r} has {len(doc.text)} characters; the limit is "
                    f"{s.scorer_max_chars} (MATES_SCORER_MAX_CHARS)"
                )

    async def score(self, req: ScoreRequest) -> Scored:
        self.check_limits(req)
        version = await run_in_threadpool(self.registry.resolve, req.model)
        model = await run_in_threadpool(self.cache.get, version)
        tokens = await run_in_threadpool(model.tokenize, [d.text for d in req.documents])
        scores = await asyncio.wrap_future(self.batcher.submit(model.scorer, tokens))
        return Scored(
            version.name,
            [
                DocumentScore(id=doc.id, score=float(s))
                for doc, s in zip(req.documents, scores, strict=True)
            ],
        )

    def models(self) -> list[ModelInfo]:
        out = []
        for v in self.registry.versions():
            try:
                fit = self.registry.meta(v).get("fit")
            except ArtifactError as e:
                log.warning("model %s: %s", v.name, e)
                fit = None
            out.append(
                ModelInfo(version=v.name, run_id=v.run_id, stage=v.stage, path=str(v.path), fit=fit)
            )
        return out

    def not_ready(self) -> str | None:
        """Why the service cannot score now, or None when it can."""
        root = self.registry.root
        if not root.is_dir():
            return f"artifacts dir {root} does not exist"
        if not os.access(root, os.R_OK | os.X_OK):
            return f"artifacts dir {root} is not readable"
        if not self.batcher.alive():
            return "the model thread is not running"
        return None
