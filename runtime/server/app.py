"""The ASGI app: routes, the worker's lifetime, middleware, and errors turned into clear answers.

Every error answer has one shape (see `responses.py`). The client's mistakes are 4xx naming the
field; 500 is reserved for bugs, and even then the worker thread keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from .. import __version__
from ..errors import InvalidRequestError
from .auth import BasicAuthMiddleware
from .body_limit import BodyLimitMiddleware
from .config import ServerConfig
from .jobs import JobFailure, QueueFull, Unavailable, Worker
from .mapping import PlanModel
from .responses import error_response
from .routes import Backend, ServerContext, router

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger(__name__)

_LOCATIONS = ("body", "query", "path", "header")
_MAX_LISTED_ERRORS = 5


def _field(loc: tuple[Any, ...]) -> str:
    """("body", "override_settings", "randn_source") -> "override_settings.randn_source"."""
    parts = [str(part) for part in loc]
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _problem(item: dict[str, Any]) -> dict[str, str]:
    """One pydantic/FastAPI error as {field, message, type}, without echoing the input back."""
    kind = item.get("type", "")
    field = "body" if kind == "json_invalid" else _field(tuple(item.get("loc", ())))
    message = item.get("msg", "invalid")
    if kind == "json_invalid":
        message = f"malformed JSON ({item.get('ctx', {}).get('error', 'cannot parse')})"
    elif field == "body" and isinstance(item.get("input"), bytes | str):
        # FastAPI parses JSON only for JSON content types (or none); say so instead of "not a dict".
        message = "expected a JSON object, sent with Content-Type: application/json"
    return {"field": field, "message": message, "type": kind}


def _validation_answer(error: RequestValidationError) -> JSONResponse:
    problems = [_problem(item) for item in error.errors()]
    malformed = any(problem["type"] == "json_invalid" for problem in problems)
    detail = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:_MAX_LISTED_ERRORS])
    field = problems[0]["field"] if problems else None
    kind = "MalformedJSON" if malformed else "InvalidRequest"
    return error_response(400 if malformed else 422, kind, detail, field, problems)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_answer(error)

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(_request: Request, error: InvalidRequestError) -> JSONResponse:
        return error_response(422, "InvalidRequest", f"{error.field}: {error.message}", error.field)

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, error: QueueFull) -> JSONResponse:
        return error_response(429, "QueueFull", str(error), headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(Unavailable)
    async def unavailable(_request: Request, error: Unavailable) -> JSONResponse:
        return error_response(503, "Unavailable", str(error), headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(JobFailure)
    async def job_failed(_request: Request, error: JobFailure) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        return error_response(error.status, error.kind, error.message, error.field, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "HTTPError", str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(500, "InternalError", "server error; see the server log")


def create_app(pipe: Pipeline, config: ServerConfig) -> FastAPI:
    """The one-box app: one loaded pipeline, run by a worker thread between startup and shutdown."""
    return build_app(pipe, config, Worker(pipe, config.queue_size))


def build_app(model: PlanModel, config: ServerConfig, backend: Backend) -> FastAPI:
    """The API in front of any backend; the cluster's ingress builds it around Serve replicas."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(
        title="acertain-onnx server",
        version=__version__,
        description="AUTOMATIC1111-compatible txt2img API on ONNX Runtime (no torch). See docs/server.md.",
        lifespan=lifespan,
    )
    app.state.context = ServerContext(model, config, backend)
    _install_error_handlers(app)
    app.include_router(router)
    # The last middleware added runs first: auth, then the body limit, then the app.
    app.add_middleware(BodyLimitMiddleware, limit=config.limits.max_body_bytes)
    if config.credentials:
        app.add_middleware(BasicAuthMiddleware, credentials=config.credentials)
    return app
