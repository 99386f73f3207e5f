"""Liveness and readiness probes (no key: orchestrators call them)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from services.api.deps import SettingsDep, StoreDep
from services.api.schemas import Health, Ready
from services.common.settings import Settings
from services.common.store import Store

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 2.0


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _check_store(store: Store) -> str:
    try:
        store.ping()
    except Exception as e:  # any failure means "not ready"; the reason is reported
        return _first_line(e)
    return "ok"


def _check_broker(settings: Settings) -> str:
    try:
        client = redis.Redis.from_url(
            settings.broker_url,
            socket_connect_timeout=PROBE_TIMEOUT_S,
            socket_timeout=PROBE_TIMEOUT_S,
        )
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:  # a malformed URL is as unready as a refused connection
        return _first_line(e)
    return "ok"


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"description": "the run store or the broker is unavailable"}},
)
def readyz(store: StoreDep, settings: SettingsDep):
    """The run store answers a query and the Redis broker answers PING."""
    checks = {"store": _check_store(store), "broker": _check_broker(settings)}
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        detail = "; ".join(f"{name} unavailable ({checks[name]})" for name in failed)
        return JSONResponse(
            {"detail": f"not ready: {detail}", "checks": checks},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    return {"status": "ready", "checks": checks}
