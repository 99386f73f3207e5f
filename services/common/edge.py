"""The HTTP edge shared by the API and the scorer: a request-body limit enforced before
the body is read, one shape for every 422 body, and CORS only where it is configured.

A 422 body is `{"detail": "<one line naming each field>", "errors": [{loc, msg, type}]}`:
people read `detail`, programs read `errors`.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.auth import READ_SCHEME
from services.common.settings import Settings

MAX_INPUT_CHARS = 80  # of a rejected value quoted back in a 422 message


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing lets it through to the handlers.
    The rest of the body stays unread, so the connection cannot be reused: it is closed."""

    def __init__(self, limit: int, what: str):
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{what} is over the limit of {limit} bytes (MATES_MAX_BODY_BYTES)",
            headers={"Connection": "close"},
        )


def _problem(exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class BodyLimit:
    """Refuses a declared `Content-Length` over `max_bytes` before the app runs, reading
    nothing, and counts the bytes of a body sent without one (chunked), refusing it as
    soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = _problem(BodyTooLarge(self.max_bytes, f"a body of {int(declared)} bytes"))
            await response(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes, "the request body")
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as e:  # raised where no exception handler sees it
            if started:
                raise
            await _problem(e)(scope, receive, send)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def describe_error(e: dict[str, Any]) -> str:
    """One pydantic/FastAPI error as "`body.documents.0.id`: <message>", in the style of
    the library's config errors."""
    field = _field(e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "missing":
        return f"`{field}` is required"
    if e["type"] == "unicode_invalid":
        return f"`body` {msg}"
    if e["type"] == "json_invalid":
        at = e["loc"][-1] if len(e["loc"]) > 1 else "?"
        return f"`body` is not valid JSON ({e.get('ctx', {}).get('error', msg)} at character {at})"
    got = e.get("input")
    if "input" not in e or not isinstance(got, (str, int, float, bool, type(None))):
        return f"`{field}`: {msg}"  # a whole object or list is no help quoted back
    shown = repr(got)
    if len(shown) > MAX_INPUT_CHARS:
        shown = shown[:MAX_INPUT_CHARS] + "..."
    return f"`{field}`: {msg}, got {shown}"


def validation_problem(errors: list[dict[str, Any]]) -> JSONResponse:
    body = {
        "detail": "invalid request: " + "; ".join(describe_error(e) for e in errors),
        "errors": [
            {"loc": list(e["loc"]), "msg": str(e["msg"]), "type": e["type"]} for e in errors
        ],
    }
    return JSONResponse(body, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def unprocessable(detail: str, locs: list[tuple[Any, ...]], kind: str) -> JSONResponse:
    """A 422 found past FastAPI's validation (a run config, a model name): the same shape,
    an error at each of `locs` (each the field's full path, from `body`)."""
    errors = [{"loc": list(loc), "msg": detail, "type": kind} for loc in locs]
    return JSONResponse(
        {"detail": detail, "errors": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(list(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    # FastAPI answers a body it cannot decode with a bare 400 "error parsing the body".
    if exc.status_code == status.HTTP_400_BAD_REQUEST and isinstance(cause, UnicodeDecodeError):
        return validation_problem(
            [
                {
                    "loc": ("body",),
                    "type": "unicode_invalid",
                    "msg": f"is not valid UTF-8 JSON ({cause.reason} at byte {cause.start})",
                }
            ]
        )
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        # Starlette names the methods of the first route whose path matched; a path served
        # by several routes (GET and POST /v1/runs) allows all of theirs.
        allowed = _methods_at(request)
        if allowed:
            exc = HTTPException(exc.status_code, exc.detail, {"Allow": ", ".join(allowed)})
    return await http_exception_handler(request, exc)


def _methods_at(request: Request) -> list[str]:
    """The methods the OpenAPI document lists for the requested path."""
    path = request.url.path
    for template, operations in request.app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return sorted(m.upper() for m in operations)
    return []


VALIDATION_PROBLEM_SCHEMA = {
    "title": "ValidationProblem",
    "type": "object",
    "required": ["detail", "errors"],
    "properties": {
        "detail": {
            "type": "string",
            "description": "every invalid field by its dotted "
            "location (`body.documents.0.id`, `query.limit`) and what is wrong with it",
        },
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}


def _document_422(app: FastAPI) -> None:
    """Every 422 in the OpenAPI document has the shape the handler above returns."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schemas = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" in schemas:
            schemas["HTTPValidationError"] = VALIDATION_PROBLEM_SCHEMA
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_auth(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document says what the server does in its mode: a route that takes the
    key declares it and its 401 and 403; a read route does so only with
    `MATES_READ_AUTH=1`, and otherwise declares no key at all."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schemes = schema.get("components", {}).get("securitySchemes", {})
        bearer = next((n for n in schemes if n != READ_SCHEME), None)
        schemes.pop(READ_SCHEME, None)
        for operations in schema["paths"].values():
            for op in operations.values():
                names = {name for req in op.get("security", []) for name in req}
                if READ_SCHEME in names:
                    if not settings.read_auth or bearer is None:
                        op.pop("security")
                        continue
                    op["security"] = [{bearer: []}]
                elif not names:
                    continue
                for code, text in (("401", "no bearer API key"), ("403", "a wrong API key")):
                    op["responses"].setdefault(
                        code,
                        {
                            "description": text,
                            "content": {"application/json": {"schema": PROBLEM_SCHEMA}},
                        },
                    )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"type": "string"}},
}


def install_edge(app: FastAPI, settings: Settings, expose_headers: tuple[str, ...] = ()) -> None:
    """The body limit, the 422 shape, and CORS when `MATES_CORS_ORIGINS` names origins
    (no CORS middleware at all otherwise: browsers then refuse cross-origin calls)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    origins = settings.cors_origin_list
    if origins:  # added last: outermost, so refusals (401, 413) carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=list(expose_headers),
        )
    _document_422(app)
    _document_auth(app, settings)
