"""API-level errors and the one table that maps every known error to an HTTP response."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

from memory_bank.errors import BankCorrupt, ClipNotFound, ClipRejected, IndexCorrupt
from memory_bank.storage import StorageUnavailable
from model.errors import InvalidClip, InvalidRequest, WeightsNotFound
from runtime.jobs import OutdatedJobRecord
from service.auth import AuthError


class ApiError(Exception):
    """An error with its HTTP status, machine code and optional details."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.details, self.headers = status, code, details, headers or {}


def error_body(error: ApiError) -> dict[str, Any]:
    """The one JSON shape of every error the API answers."""
    return {"error": {"code": error.code, "message": str(error), "details": error.details}}


async def send_error(send: Send, error: ApiError, *, close: bool = False) -> None:
    """Answer with ``error`` from a pure ASGI middleware (before any route or ``Response``);
    ``close`` ends the connection after it (a request body that is never read)."""
    body = json.dumps(error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class JobNotFound(ApiError):
    def __init__(self, job_id: str) -> None:
        super().__init__(404, "job_not_found", f"no job with id {job_id}")


class JobNotFinished(ApiError):
    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(409, "job_not_finished", f"job {job_id} is {status}; no video yet")


# (status, code) of domain errors raised by the core packages.
DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (422, "invalid_request"),
    InvalidClip: (422, "invalid_clip"),
    ClipRejected: (422, "clip_rejected"),
    ClipNotFound: (404, "clip_not_found"),
    WeightsNotFound: (503, "weights_not_found"),
    BankCorrupt: (503, "bank_unavailable"),
    IndexCorrupt: (503, "bank_unavailable"),
    OutdatedJobRecord: (410, "job_record_outdated"),
    StorageUnavailable: (503, "storage_unavailable"),
}


def to_api_error(error: Exception) -> ApiError | None:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, AuthError):
        code = "unauthorized" if error.status == 401 else "forbidden"
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        return ApiError(error.status, code, str(error), headers=headers)
    for kind, (status, code) in DOMAIN_ERRORS.items():
        if isinstance(error, kind):
            field = getattr(error, "field", None)
            return ApiError(status, code, str(error), {"field": field} if field else None)
    return None
