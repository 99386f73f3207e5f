"""Bearer API-key checks as FastAPI dependencies: 401 without a key, 403 with a wrong one;
constant-time comparison.

No `from __future__ import annotations` here: FastAPI must see the `Depends(get_settings)`
annotations as objects, and `get_settings` is a parameter, not a module global.
"""

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.common.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="MATES_API_KEY as a bearer token")
# The same key on read routes, under a name of its own so that the OpenAPI document can
# say what the server does in its mode (services.common.edge: required with
# MATES_READ_AUTH=1, not asked for otherwise); it never reaches a published document.
READ_SCHEME = "ReadKey"
_read_bearer = HTTPBearer(auto_error=False, scheme_name=READ_SCHEME)


def key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _check(creds: HTTPAuthorizationCredentials | None, settings: Settings) -> None:
    """401 when no bearer key is given, 403 when the key is wrong. Neither the given key
    nor the expected one ever goes into a message or a log line."""
    if creds is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not key_matches(creds.credentials, settings.api_key):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid API key")


def check_key(authorization: str | None, settings: Settings) -> None:
    """`_check` on a raw `Authorization` header, for a route that reads it itself (the
    dashboard's pages, which answer a locked page instead of an error)."""
    scheme, _, token = (authorization or "").partition(" ")
    creds = (
        HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
        if scheme.lower() == "bearer" and token.strip()
        else None
    )
    _check(creds, settings)


def require_key(get_settings):
    """Dependency for mutating endpoints: the key is always required."""

    def dep(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        settings: Annotated[Settings, Depends(get_settings)],
    ) -> None:
        _check(creds, settings)

    return dep


def require_read_key(get_settings):
    """Dependency for read endpoints: the key is required only with `read_auth`."""

    def dep(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_read_bearer)],
        settings: Annotated[Settings, Depends(get_settings)],
    ) -> None:
        if settings.read_auth:
            _check(creds, settings)

    return dep
