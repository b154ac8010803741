"""``create_app()``: the FastAPI application, its lifespan and its error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory_bank.errors import BankError
from model.errors import ModelError
from runtime.jobs import OutdatedJobRecord
from runtime.settings import Settings
from service.auth import AuthError
from service.errors import ApiError, to_api_error
from service.limits import BodySizeLimit
from service.routes import generations, health, jobs, memory, ui
from service.state import AppState

logger = logging.getLogger(__name__)

LOCATIONS = ("body", "query", "path", "header")  # not part of a field's name


def create_app(settings: Settings, build_state: Callable[[Settings], AppState]) -> FastAPI:
    """The API; ``build_state`` makes what it serves (job store, dispatcher, bank) at startup.

    The HTTP layer never decides how jobs run: the composition root (``ditmem.compose``) passes
    a builder that connects Celery or starts an embedded worker.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ditmem = build_state(settings)
        try:
            yield
        finally:
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
    app.add_middleware(BodySizeLimit, limit=int(settings.max_upload_mb * 2**20), paths=("/memory",))
    _install_error_handlers(app)
    return app


def _error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"code": error.code, "message": str(error), "details": error.details}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


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

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        request.app.state.ditmem.metrics.increment("errors_total", "api")
        return _error_response(ApiError(500, "internal_error", "internal error; see the log"))
