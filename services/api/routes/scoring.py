"""On-demand scoring, relayed to the scorer service."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import JSONResponse

from services.api.deps import KeyRequired, SettingsDep
from services.api.schemas import Problem
from services.common.contracts import (
    MODEL_VERSION_HEADER,
    SCORE_RESPONSES,
    DocumentScore,
    ScoreRequest,
)
from services.common.scorer_client import SCORE_PATH, ScorerClient

router = APIRouter(tags=["scoring"])


@router.post(
    "/v1/score",
    response_model=list[DocumentScore],
    responses={
        **SCORE_RESPONSES,
        502: {"model": Problem, "description": "the scorer cannot be reached"},
        504: {"model": Problem, "description": "the scorer did not answer in time"},
    },
)
async def score(
    payload: ScoreRequest, request: Request, settings: SettingsDep, _: KeyRequired
) -> JSONResponse:
    """Score documents with an influence-model version: a list of `{id, score}`, one per
    document in request order, with the resolved version (`<run_id>/<stage>`) in the
    `X-Model-Version` header. The scorer's status, body and that header are relayed as is."""
    try:
        async with ScorerClient(settings).asynchronous() as client:
            # The body goes on byte for byte; `payload` only validates it and documents it.
            r = await client.post(
                SCORE_PATH,
                content=await request.body(),
                headers={"Content-Type": "application/json"},
            )
    except httpx.TimeoutException:
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT,
            f"the scorer at {settings.scorer_url} did not answer within "
            f"{settings.http_timeout_s:g} s",
        ) from None
    except httpx.TransportError as e:
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY,
            f"the scorer at {settings.scorer_url} cannot be reached ({type(e).__name__}: {e})",
        ) from None
    if r.status_code in (status.HTTP_401_UNAUTHORIZED, status.HTTP_403_FORBIDDEN):
        # The caller's key was good here; the scorer refusing ours is a deployment fault.
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY,
            f"the scorer at {settings.scorer_url} refused the API's key "
            f"({r.status_code}); MATES_API_KEY must be the same for both",
        )
    try:
        body = r.json()
    except ValueError:
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY,
            f"the scorer answered {r.status_code} with a body that is not JSON",
        ) from None
    version = r.headers.get(MODEL_VERSION_HEADER)
    return JSONResponse(
        body,
        status_code=r.status_code,
        headers={MODEL_VERSION_HEADER: version} if version else None,
    )
