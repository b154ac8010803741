"""Jobs of the caller: status, list, cancel, and the finished video (with HTTP Range)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from memory_bank.storage import ObjectMissing
from runtime.job_events import EVENT_NAMES, QueueInfo, event_data, event_name, queue_info
from runtime.jobs import GenerateResult, JobRecord, preview_key
from runtime.uploads import discard_upload
from service.auth import Caller
from service.deps import CallerDep, Offset, StateDep
from service.downloads import serve_object
from service.errors import ApiError, JobNotFinished, JobNotFound
from service.events import JobFeed
from service.schemas import ErrorBody, JobPage, JobView
from service.state import AppState

router = APIRouter(prefix="/jobs", tags=["jobs"])

NOT_FOUND = {404: {"model": ErrorBody}}
POSITION_EVERY_S = 1.0  # a queued job's stream re-reads its position at most this often


def _own_job(state: AppState, caller: Caller, job_id: str) -> JobRecord:
    job = state.store.get(job_id)
    # Someone else's job is indistinguishable from no job.
    if job is None or job.owner != caller.name:
        raise JobNotFound(job_id)
    return job


@router.get("", response_model=JobPage)
def list_jobs(
    caller: CallerDep,
    state: StateDep,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """The caller's jobs, newest first."""
    jobs, total = state.store.list(caller.name, offset, limit)
    return JobPage(items=[JobView.of(j) for j in jobs], total=total, offset=offset, limit=limit)


def _queue_of(state: AppState, job: JobRecord) -> QueueInfo:
    """Where a queued job stands (the worker count is only asked for a queued one)."""
    if job.status != "queued":
        return QueueInfo(None, None)
    return queue_info(state.store, job, state.workers_ready())


def _read_with_queue(state: AppState, job_id: str) -> tuple[JobRecord | None, QueueInfo]:
    job = state.store.get(job_id)
    return job, QueueInfo(None, None) if job is None else _queue_of(state, job)


@router.get("/{job_id}", response_model=JobView, responses=NOT_FOUND)
def get_job(job_id: str, caller: CallerDep, state: StateDep) -> JobView:
    """A job's state; a queued one says how many jobs are ahead of it and when it may start."""
    job = _own_job(state, caller, job_id)
    return JobView.of(job, _queue_of(state, job))


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    caller: CallerDep,
    state: StateDep,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
    events: Annotated[
        str | None,
        Query(
            max_length=200,
            description="comma-separated event names to send (default: all); a client that "
            "only waits for the end asks for succeeded,failed,canceled",
        ),
    ] = None,
) -> EventSourceResponse:
    """Server-Sent Events of the job: its current state first, then every change (``queued``
    with the queue position, ``started``, ``progress``, ``succeeded``, ``failed``,
    ``canceled``) until a final one. Event ids are the record's revisions: reconnecting with
    ``Last-Event-ID`` skips what was already received. Comments keep an idle stream alive."""
    wanted = set(EVENT_NAMES) if events is None else {e.strip() for e in events.split(",")}
    unknown = sorted(wanted - set(EVENT_NAMES))
    if unknown:
        raise ApiError(422, "validation_error", f"events: unknown event names {unknown}; "
                       f"choose among {list(EVENT_NAMES)}", [{"field": "events"}])  # fmt: skip
    await run_in_threadpool(_own_job, state, caller, job_id)
    feed: JobFeed = request.app.state.feed
    try:
        seen = int(last_event_id) if last_event_id else -1
    except ValueError:
        seen = -1
    stream = _events(state, feed, job_id, seen, wanted)
    return EventSourceResponse(stream, ping=state.settings.event_ping_s)


async def _events(
    state: AppState, feed: JobFeed, job_id: str, seen: int, wanted: set[str]
) -> AsyncIterator[ServerSentEvent]:
    position: int | None = None
    positions_read = 0.0
    with feed.watch(job_id, steps="progress" in wanted) as watch:
        while True:
            if not watch.own:  # only the queue moved: re-read it once a second at most
                await asyncio.sleep(max(0.0, positions_read + POSITION_EVERY_S - time.monotonic()))
            watch.changed.clear()
            watch.own = False
            job, queue = await run_in_threadpool(_read_with_queue, state, job_id)
            if job is None:  # expired from the store while streamed
                return
            positions_read = time.monotonic()
            name = event_name(job)
            watch.queued = job.status == "queued" and "queued" in wanted
            moved = watch.queued and queue.position != position
            if (job.revision > seen or moved) and name in wanted:
                yield ServerSentEvent(
                    data=json.dumps(event_data(job, queue)), event=name, id=str(job.revision)
                )
                seen, position = job.revision, queue.position
            if job.finished:
                return
            await watch.changed.wait()


@router.delete("/{job_id}", response_model=JobView, responses=NOT_FOUND)
def cancel_job(job_id: str, caller: CallerDep, state: StateDep) -> JobView:
    """Cancel: a queued job never runs; a running one stops after its current step."""
    _own_job(state, caller, job_id)
    job = state.store.request_cancel(job_id)
    discard_upload(state.storages.uploads, job)  # a cancelled ingest's file has no reader left
    return JobView.of(job)


@router.get(
    "/{job_id}/preview",
    responses={**NOT_FOUND, 200: {"content": {"image/png": {}}}},
)
def get_preview(job_id: str, caller: CallerDep, state: StateDep, request: Request) -> Response:
    """The latest live preview of a running generation that asked for them
    (``preview_every``): a small PNG of the latent being denoised."""
    job = _own_job(state, caller, job_id)
    if job.status != "running" or job.preview_step is None:
        raise ApiError(404, "preview_not_found", f"job {job_id} has no preview now")
    try:
        return serve_object(state.storages.results, preview_key(job.job_id, job.attempts),
                            request, media_type="image/png",
                            filename=f"{job_id}-preview.png")  # fmt: skip
    except ObjectMissing:  # the run just ended and removed it
        raise ApiError(404, "preview_not_found", f"job {job_id} has no preview now") from None


@router.get(
    "/{job_id}/video",
    responses={
        **NOT_FOUND,
        409: {"model": ErrorBody},
        200: {"content": {"video/mp4": {}}},
        206: {"description": "the byte range asked for"},
        307: {"description": "a presigned URL of the video (DITMEM_PRESIGNED_DOWNLOADS)"},
    },
)
def get_video(job_id: str, caller: CallerDep, state: StateDep, request: Request) -> Response:
    """The mp4 of a succeeded generation; supports ``Range`` requests for seeking."""
    job = _own_job(state, caller, job_id)
    if job.status != "succeeded" or not isinstance(job.result, GenerateResult):
        raise JobNotFinished(job_id, job.status)
    settings = state.settings
    try:
        return serve_object(
            state.storages.results,
            job.result.video,
            request,
            media_type="video/mp4",
            filename=f"{job_id}.mp4",
            presigned_ttl_s=settings.presigned_ttl_s if settings.presigned_downloads else None,
        )
    except ObjectMissing:  # removed from the results storage behind the API's back
        message = f"the video of job {job_id} is no longer stored"
        raise ApiError(410, "video_gone", message) from None
