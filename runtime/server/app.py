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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import InvalidRequestError
from ..text.styles import StyleLibrary
from .auth import BasicAuthMiddleware
from .body_limit import BodyLimitMiddleware
from .client_routes import router as client_router
from .config import ServerConfig
from .controlnet_routes import router as controlnet_router
from .guard import RequestGuardMiddleware
from .jobs import JobFailure, QueueFull, Unavailable, Worker
from .models import ModelSet
from .responses import error_response
from .routes import Backend, ServerContext, router
from .schemas import ErrorResponse
from .settings import OptionError, Settings

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger(__name__)

# What any endpoint may answer besides its own errors (the guard's, auth's, validation's and bugs'),
# so that /openapi.json declares the shape every error is sent in.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "Missing or wrong HTTP Basic credentials (with --api-auth)"),
        (403, "Sent from a web page of another site (Origin)"),
        (408, "The body did not arrive in time"),
        (413, "Body over the size limit"),
        (415, "A POST body that is not JSON"),
        (421, "Host header this server does not answer for"),
        (422, "Invalid field or query parameter; `field` names it"),
        (500, "A server bug; see the server log"),
        (503, "Too many requests in progress (see Retry-After)"),
    )
}
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

    @app.exception_handler(OptionError)
    async def bad_option(_request: Request, error: OptionError) -> JSONResponse:
        # A1111 names the exception its opts.set raised (RuntimeError, KeyError); the status is ours.
        return error_response(422, error.kind, f"{error.field}: {error.message}", error.field)

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


class InternalErrorMiddleware:
    """A bug in a route: log its traceback once and answer our JSON 500.

    An `exception_handler(Exception)` would answer too, but Starlette then re-raises the error and
    uvicorn logs the same traceback a second time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if scope["type"] == "http" and not started:
                await error_response(500, "InternalError", "server error; see the server log")(scope, receive, send)


class TrailingSlashMiddleware:
    """`/sdapi/v1/options/` is `/sdapi/v1/options`: A1111's clients (openOutpaint) call some paths
    with a trailing slash, and a redirect would make some of them send a POST as a GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)


def create_app(pipe: Pipeline | None, config: ServerConfig, models: ModelSet | None = None) -> FastAPI:
    """The one-box app: a worker thread runs the jobs on the checkpoints' pipelines between startup
    and shutdown; `pipe` alone serves that one loaded pipeline."""
    if models is None:
        if pipe is None:
            raise ValueError("create_app needs a loaded pipeline or a ModelSet")
        models = ModelSet.around(pipe, config)
    return build_app(models, config, Worker(models, config.queue_size))


def build_app(models: ModelSet, config: ServerConfig, backend: Backend) -> FastAPI:
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
    app.state.context = ServerContext(models, config, backend, Settings(), StyleLibrary(config.styles_file))
    _install_error_handlers(app)
    app.include_router(router, responses=COMMON_ERRORS)
    app.include_router(client_router, responses=COMMON_ERRORS)
    app.include_router(controlnet_router, responses=COMMON_ERRORS)
    # The last middleware added runs first: the guard (Host, Origin, Content-Type, room), auth,
    # the body limit, then the app; a bug anywhere inside is one logged 500.
    app.add_middleware(InternalErrorMiddleware)
    traffic = config.traffic
    app.add_middleware(BodyLimitMiddleware, limit=config.limits.max_body_bytes, timeout=traffic.body_timeout)
    if config.credentials:
        app.add_middleware(BasicAuthMiddleware, credentials=config.credentials)
    app.add_middleware(RequestGuardMiddleware, bound_host=config.host, traffic=traffic)
    app.add_middleware(TrailingSlashMiddleware)
    return app
