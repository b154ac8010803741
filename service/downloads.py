"""Serving a stored file over HTTP, wherever it is stored: a local file directly (Starlette's
``FileResponse``), an object in a bucket streamed through the API with HTTP Range support, or a
redirect to a short-lived presigned URL."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from memory_bank.storage import ObjectMissing, ObjectStorage
from service.errors import ApiError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(start, end)`` a ``Range`` header asks for, or ``None`` for the whole file.

    Only single ranges are honoured (a multi-range request gets the whole file, which the HTTP
    spec allows); a range that starts past the end is a 416.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ApiError(
            416, "range_not_satisfiable", f"range {header} is outside the {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )  # fmt: skip
    return start, end


def serve_object(
    storage: ObjectStorage,
    key: str,
    request: Request,
    *,
    media_type: str,
    filename: str,
    presigned_ttl_s: int | None = None,
) -> Response:
    """The object at ``key``; ``presigned_ttl_s`` redirects to a presigned URL when it can."""
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():  # checked here: FileResponse would fail once it is returned
            raise ObjectMissing(f"no object {key!r}")
        return FileResponse(local, media_type=media_type, filename=filename)
    if presigned_ttl_s is not None:
        url = storage.presigned_url(key, presigned_ttl_s)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    size = storage.size(key)
    disposition = {"Content-Disposition": f'attachment; filename="{filename}"'}
    wanted = byte_range(request.headers.get("range"), size)
    if wanted is None:
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(size), **disposition}
        return StreamingResponse(
            storage.read_range(key, 0, size - 1), media_type=media_type, headers=headers
        )
    start, end = wanted
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Range": f"bytes {start}-{end}/{size}",
        "Content-Length": str(end - start + 1),
        **disposition,
    }
    return StreamingResponse(
        storage.read_range(key, start, end), status_code=206, media_type=media_type,
        headers=headers,
    )  # fmt: skip
