"""The one translation of errors into HTTP responses: RFC 9457 problem details.

    {"type": "urn:anoscope:problem:invalid-image", "title": "Invalid image", "status": 422,
     "detail": "file 1 ('a.png') is empty (0 bytes); send the image file's bytes", "instance": "/v1/predict"}

Domain errors (`service.errors`) carry their status and title; FastAPI's request validation errors,
Starlette's HTTP errors (unknown path, wrong method) and anything unexpected are mapped here too, so no
third-party exception type reaches a client. `type` is a stable URN per error kind that clients can
switch on; `detail` says what to fix.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.errors import (
    AnoscopeError,
    AuthenticationError,
    OverloadedError,
    PayloadTooLargeError,
    ReloadFailedError,
    TooManyFilesError,
)

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:anoscope:problem:"


def problem_type(slug: str) -> str:
    return TYPE_PREFIX + slug


def error_slug(cls: type[BaseException]) -> str:
    """InvalidImageError -> 'invalid-image'."""
    name = cls.__name__.removesuffix("Error") or cls.__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> ProblemResponse:
    body: dict[str, Any] = {"type": problem_type(slug), "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    body.update(extensions)
    return ProblemResponse(body, status_code=status, headers=headers)


def _anoscope_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, AnoscopeError)
    headers: dict[str, str] = {}
    extensions: dict[str, Any] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, (PayloadTooLargeError, TooManyFilesError)):
        # The rest of the body was never read: close the connection rather than drain it for keep-alive.
        headers["Connection"] = "close"
    elif isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = 'ApiKey header="X-API-Key"'
    elif isinstance(exc, ReloadFailedError):
        extensions = {"model": exc.model, "serving_version": exc.serving_version}
    if exc.status_code >= 500:
        log.error("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.title, exc)
    return problem(
        exc.status_code,
        exc.title,
        str(exc),
        slug=error_slug(type(exc)),
        instance=request.url.path,
        headers=headers or None,
        **extensions,
    )


def _location(loc: tuple[Any, ...]) -> str:
    where = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "body"}
    if loc and loc[0] in where:
        rest = ".".join(str(p) for p in loc[1:])
        return f"{where[loc[0]]} {rest!r}" if rest else where[loc[0]]
    return ".".join(str(p) for p in loc) or "request"


def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"location": _location(tuple(e.get("loc", ()))), "message": str(e.get("msg", "invalid"))} for e in exc.errors()
    ]
    detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors) or "the request is not valid"
    return problem(422, "Invalid request", detail, slug="invalid-request", instance=request.url.path, errors=errors)


def _http_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    detail = str(exc.detail) if exc.detail else title
    if status == 404:
        detail = f"no endpoint at {request.url.path}; the API is described at /docs and /openapi.json"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    slug = title.lower().replace(" ", "-").replace("'", "")
    return problem(status, title, detail, slug=slug, instance=request.url.path, headers=exc.headers)


def _client_disconnect(request: Request, exc: Exception) -> ProblemResponse:
    log.info("%s %s: client disconnected before the body was read", request.method, request.url.path)
    return problem(
        400,
        "Client disconnected",
        "the client closed the connection mid-request",
        slug="client-disconnected",
        instance=request.url.path,
    )


def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    detail = "the service hit an unexpected error and logged it; retry, and report it if it persists"
    return problem(500, "Internal error", detail, slug="internal", instance=request.url.path)


def install(app: FastAPI) -> None:
    """Register the mapping on an app (called once by the app factory)."""
    app.add_exception_handler(AnoscopeError, _anoscope_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected)
