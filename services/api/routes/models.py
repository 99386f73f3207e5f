"""Influence-model versions registered by the pipeline."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from services.api.deps import ReadKey, StoreDep
from services.api.schemas import ModelVersion
from services.common.contracts import RUN_ID_PATTERN
from services.common.store.records import ModelVersionRow

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelVersion])
def list_models(
    store: StoreDep, _: ReadKey, run_id: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None
) -> list[ModelVersionRow]:
    """Model versions (`<run_id>/<stage>`) with their validation scores, newest first."""
    return store.list_models(run_id)
