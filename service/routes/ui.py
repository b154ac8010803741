"""The web UI: one static page at ``/``, its script and styles under ``/static``.

Plain HTML, CSS and JavaScript, no build step and nothing fetched from the network: the page
talks to this same API (``/generate``, ``/jobs``, ``/memory``) with the caller's bearer key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/", response_class=FileResponse)
def index() -> FileResponse:
    """The single-page UI (Generate, Jobs, Memory)."""
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
    )


router.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
