"""``create_app()``: the FastAPI application, its lifespan and its error handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import kombu.exceptions
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memory_bank.errors import BankError
from memory_bank.storage import DISK_FULL, DISK_READ_ONLY, describe_disk_error
from model.errors import ModelError
from runtime.jobs import OutdatedJobRecord
from runtime.settings import Settings
from service.auth import AuthError
from service.errors import ApiError, error_body, to_api_error
from service.events import JobFeed
from service.limits import BodySizeLimit, ConcurrencyLimit
from service.routes import generations, health, jobs, memory, ui
from service.security import RequestOrigin, SecurityHeaders
from service.state import AppState

logger = logging.getLogger(__name__)

LOCATIONS = ("body", "query", "path", "header")  # not part of a field's name
RETRY_AFTER_OUTAGE_S = 5


def create_app(settings: Settings, build_state: Callable[[Settings], AppState]) -> FastAPI:
    """The API; ``build_state`` makes what it serves (job store, dispatcher, bank) at startup.

    The HTTP layer never decides how jobs run: the composition root (``ditmem.compose``) passes
    a builder that connects Celery or starts an embedded worker.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ditmem = build_state(settings)
        # The event streams' wake-ups, delivered onto this loop from the store's thread.
        app.state.feed = JobFeed(app.state.ditmem.store, asyncio.get_running_loop())
        try:
            yield
        finally:
            app.state.feed.close()
            current: AppState = app.state.ditmem
            for close in current.closers:
                close()
            current.bank.close()

    app = FastAPI(
        title="ditmem",
        summary="Memory-augmented text-to-video generation (DiT-Mem on Wan2.1)",
        version="0.1.0",
        lifespan=lifespan,
        responses={
            422: {"model": None, "description": "Invalid input"},
        },
    )
    for router in (generations.router, jobs.router, memory.router, health.router, ui.router):
        app.include_router(router)
    uploads = ("/memory",)
    app.add_middleware(BodySizeLimit, limit=int(settings.max_upload_mb * 2**20), paths=uploads)
    app.add_middleware(ConcurrencyLimit, limit=settings.max_concurrent_uploads, paths=uploads)
    app.add_middleware(CatchAll)  # the middlewares around it get a response, not an exception
    app.add_middleware(RequestOrigin, allowed_hosts=settings.served_hosts,
                       allowed_origins=settings.allowed_origins)  # fmt: skip
    app.add_middleware(SecurityHeaders)  # outermost: every response, errors included
    _install_error_handlers(app)
    return app


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    request.app.state.ditmem.metrics.increment("errors_total", "api")
    return _error_response(ApiError(500, "internal_error", "internal error; see the log"))


class CatchAll:
    """Answers any exception a handler did not map with the 500 JSON shape, and *returns*.

    Starlette's handler for bare ``Exception`` runs in its outermost middleware, which re-raises
    after answering: uvicorn then drops the keep-alive connection. This middleware sits inside
    it, so an unexpected error costs one response, not the client's connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            if started:  # half a response is out: nothing sensible left to send
                raise
            response = await _unexpected(Request(scope), error)
            await response(scope, receive, send)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "field": ".".join(
                    str(p) for p in item["loc"] if p not in ("body", "query", "path")
                ),
                "message": item["msg"],
            }
            for item in error.errors()
        ]
        first = problems[0] if problems else {"field": "", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        return _error_response(ApiError(422, "validation_error", message, problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _error_response(
            ApiError(error.status_code, code, str(error.detail), headers=error.headers)
        )

    async def known_error(request: Request, error: Exception) -> JSONResponse:
        api_error = to_api_error(error)
        if api_error is None:  # a subclass the table does not know: still the client's input
            api_error = ApiError(400, "bad_request", str(error))
        if api_error.status >= 500:
            request.app.state.ditmem.metrics.increment("errors_total", "api")
        return _error_response(api_error)

    # Registered per class: handlers for bare Exception run in Starlette's outermost
    # middleware, which re-raises after responding; these return the response and stop there.
    for known in (ApiError, AuthError, ModelError, BankError, OutdatedJobRecord):
        app.add_exception_handler(known, known_error)

    async def job_store_unavailable(request: Request, error: Exception) -> JSONResponse:
        logger.warning("job store unreachable on %s %s: %s", request.method, request.url.path,
                       error)  # fmt: skip
        return _error_response(
            ApiError(
                503,
                "job_store_unavailable",
                "the job queue is unreachable; try again shortly (the memory bank still answers)",
                headers={"Retry-After": str(RETRY_AFTER_OUTAGE_S)},
            )
        )

    # Redis down (records, or Celery publishing to it): job endpoints answer 503, not 500.
    for outage in (redis.RedisError, kombu.exceptions.OperationalError):
        app.add_exception_handler(outage, job_store_unavailable)

    async def disk_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, OSError)
        logger.error("disk error on %s %s: %s", request.method, request.url.path, error)
        if error.errno in DISK_FULL:
            api_error = ApiError(507, "insufficient_storage", describe_disk_error(error))
        elif error.errno in DISK_READ_ONLY:
            api_error = ApiError(503, "storage_unavailable", describe_disk_error(error))
        else:
            return await _unexpected(request, error)
        request.app.state.ditmem.metrics.increment("errors_total", "api")
        return _error_response(api_error)

    app.add_exception_handler(OSError, disk_error)
