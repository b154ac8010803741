"""The memory bank over HTTP: upload (ingested by workers), list, get, poster, search, delete."""

from __future__ import annotations

import hashlib
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Form, Query, Request, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ValidationError

from memory_bank.errors import ClipRejected
from memory_bank.ingest import MAX_CAPTION_CHARS, clean_tags
from memory_bank.schemas import ClipRecord
from model.errors import InvalidClip, StillImage
from model.preprocess import probe_clip
from runtime.jobs import ImportSpec, IngestSpec, JobRecord, WebhookTarget
from service.deps import BankDep, CallerDep, ClipId, StateDep, WriterDep, ensure_queue_room
from service.errors import ApiError
from service.idempotency import IdempotencyKeyHeader, fingerprint, idempotent_submission
from service.schemas import (
    ClipView,
    ClipViewPage,
    ErrorBody,
    ImportRequest,
    JobAccepted,
    JobView,
    SearchResult,
    WebhookRequest,
)
from service.state import AppState
from service.webhooks import accepted_webhook

router = APIRouter(prefix="/memory", tags=["memory"])

# Declared types that are certainly not video; anything else is probed by decoding.
NOT_VIDEO_PREFIXES = (
    "text/",
    "audio/",
    "application/json",
    "application/pdf",
    "image/png",
    "image/jpeg",
)


def _save_upload(source: BinaryIO, target: Path) -> str:
    """Copy the upload to ``target``; the SHA-256 of its bytes (an idempotent retry's proof)."""
    digest = hashlib.sha256()
    with open(target, "wb") as handle:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def _display_name(filename: str | None) -> str:
    """The upload's file name as the user gave it, fit to show and store (no folders, no
    control characters such as NUL); ``upload`` when there is none."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable()).strip()[:255]
    return cleaned or "upload"


def _view(record: ClipRecord) -> ClipView:
    return ClipView(**record.model_dump(), poster_url=f"/memory/{record.clip_id}/poster")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={
        200: {"model": JobAccepted, "description": "the job of an earlier identical upload"},
        409: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody},
        422: {"model": ErrorBody},
    },
)  # fmt: skip
async def upload_clip(
    file: Annotated[UploadFile, File(description="A video: mp4, webm, mov, mkv, gif, ...")],
    caption: Annotated[str, Form(min_length=1, max_length=MAX_CAPTION_CHARS)],
    caller: WriterDep,
    state: StateDep,
    response: Response,
    tags: Annotated[str, Form(description="Comma-separated tags")] = "",
    webhook: Annotated[
        str, Form(description='JSON {"url": ..., "events": [...]}: where to POST its events')
    ] = "",
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobAccepted:
    """Store the upload and queue its ingest; poll the returned job (or stream its events)
    for the clip id."""
    content_type = (file.content_type or "").lower()
    if content_type.startswith(NOT_VIDEO_PREFIXES):
        raise ApiError(415, "unsupported_media_type", f"{content_type} is not a video")
    if not caption.strip():
        raise ApiError(
            422, "validation_error", "caption: must not be blank", [{"field": "caption"}]
        )
    tag_list = tuple(clean_tags(tags.split(",")))
    target = await run_in_threadpool(accepted_webhook, state, _webhook_form(webhook))
    name = _display_name(file.filename)
    job_id = uuid.uuid4().hex
    suffix = Path(name).suffix.lower()[:8] or ".bin"
    key = f"{job_id}{suffix}"
    # Received into this host's uploads folder, then stored where every worker reaches it (the
    # same folder when storage is local: a rename).
    upload = state.settings.uploads_dir / f".{key}.part"
    try:
        # Saving, probing and storing block on disk, decoding and network: off the event loop.
        content = await run_in_threadpool(_save_upload, file.file, upload)
        # Probing reads headers and one frame: cheap enough to answer "not a video" right away,
        # and it refuses still images and oversize frames before decoding anything.
        settings = state.settings
        await run_in_threadpool(
            partial(
                probe_clip,
                upload,
                max_width=settings.max_clip_width,
                max_height=settings.max_clip_height,
            )
        )
        digest = fingerprint("memory", content, caption.strip(), tag_list, name, webhook)
        with idempotent_submission(state, caller, idempotency_key, digest, response) as submission:
            if submission.replayed is not None:  # this upload is already queued: keep that one
                job = submission.replayed
                return JobAccepted(id=job.job_id, status=job.status, links=JobView.of(job).links)
            await run_in_threadpool(state.storages.uploads.put_file, key, upload, move=True)
            job = _queue_ingest(state, caller.name, key, caption, tag_list, name, job_id, target)
            submission.made(job)
    except StillImage as error:
        message = str(error).replace(str(upload), name)
        raise ApiError(415, "unsupported_media_type", f"{message}; upload a video") from None
    except InvalidClip as error:
        raise ClipRejected(str(error).replace(str(upload), name)) from None
    finally:
        upload.unlink(missing_ok=True)
    state.metrics.increment("jobs_submitted_total", "ingest")
    return JobAccepted(id=job.job_id, status=job.status, links=JobView.of(job).links)


def _webhook_form(raw: str) -> WebhookRequest | None:
    if not raw.strip():
        return None
    try:
        return WebhookRequest.model_validate_json(raw)
    except ValidationError as error:
        message = "; ".join(item["msg"] for item in error.errors())
        raise ApiError(422, "validation_error", f"webhook: {message}",
                       [{"field": "webhook"}]) from None  # fmt: skip


def _queue_ingest(
    state: AppState, owner: str, key: str, caption: str, tags: tuple[str, ...], name: str,
    job_id: str, webhook: WebhookTarget | None,
) -> JobRecord:  # fmt: skip
    spec = IngestSpec(
        upload_key=key, caption=caption.strip(), tags=tags, source_name=name, uploader=owner
    )
    job = JobRecord.new(owner, spec, job_id=job_id, webhook=webhook)
    try:
        state.store.create(job)
        state.dispatcher.submit(job)
    except BaseException:  # no job will ever ingest it
        state.storages.uploads.delete(key)
        raise
    return job


@router.post(
    "/imports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}},
)
def import_dataset(request: ImportRequest, caller: WriterDep, state: StateDep) -> JobAccepted:
    """Import a dataset already in the imports storage: every row becomes an ingest on the
    workers, ``window`` at a time. Poll the job: ``result`` counts imported, already present
    and rejected rows (with reasons) as they finish. Importing again resumes: rows already in
    the bank come back as already present."""
    imports = state.storages.imports
    try:
        found = imports.exists(request.captions)
    except ValueError as error:  # a key the storage refuses (characters it cannot hold)
        details = [{"field": "captions"}]
        raise ApiError(422, "validation_error", f"captions: {error}", details) from None
    if not found:
        raise ApiError(
            404,
            "captions_not_found",
            f"no {request.captions!r} in the imports storage ({imports.describe()})",
        )
    ensure_queue_room(state, caller)
    spec = ImportSpec(
        folder=request.folder,
        captions=request.captions,
        tags=clean_tags(request.tags),
        window=request.window,
    )
    job = state.store.create(JobRecord.new(caller.name, spec))
    state.dispatcher.submit(job)
    state.metrics.increment("jobs_submitted_total", "import")
    return JobAccepted(id=job.job_id, status=job.status, links=JobView.of(job).links)


@router.get("", response_model=ClipViewPage, responses={422: {"model": ErrorBody}})
def list_clips(
    request: Request,
    caller: CallerDep,
    bank: BankDep,
    cursor: Annotated[
        # Bounded like clip ids: a larger number would overflow the manifest's integer column.
        int | None,
        Query(ge=1, le=2**62, description="the ``next_cursor`` of the previous page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    tag: Annotated[str | None, Query(max_length=64)] = None,
) -> ClipViewPage:
    """Clips, newest first, optionally with one tag, a page at a time (keyset pagination:
    every page costs the same, however deep)."""
    if "offset" in request.query_params:
        raise ApiError(
            422,
            "validation_error",
            "offset: not supported; page with cursor=<next_cursor of the previous page>",
            [{"field": "offset"}],
        )
    page = bank.list(before=cursor, limit=limit, tag=tag)
    return ClipViewPage(
        items=[_view(r) for r in page.items],
        next_cursor=page.next_cursor,
        total=bank.index_size if tag is None else None,
        limit=limit,
    )


@router.get("/search", response_model=SearchResult)
def search_clips(
    caller: CallerDep,
    bank: BankDep,
    state: StateDep,
    q: Annotated[str, Query(min_length=1, max_length=2000, description="A prompt")],
    k: Annotated[int, Query(ge=1, le=16)] = 5,
    min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
) -> SearchResult:
    """What a generation with this prompt would retrieve."""
    if not q.strip():
        raise ApiError(422, "validation_error", "q: must not be blank", [{"field": "q"}])
    started = time.perf_counter()
    hits = bank.search(q, k, min_score=min_score)
    state.metrics.observe("retrieval_seconds", time.perf_counter() - started)
    return SearchResult(query=q, hits=hits)


@router.get("/{clip_id}", response_model=ClipView, responses={404: {"model": ErrorBody}})
def get_clip(clip_id: ClipId, caller: CallerDep, bank: BankDep) -> ClipView:
    return _view(bank.get(clip_id))


@router.get(
    "/{clip_id}/poster",
    response_class=Response,
    responses={404: {"model": ErrorBody}, 200: {"content": {"image/jpeg": {}}}},
)
def get_poster(clip_id: ClipId, caller: CallerDep, bank: BankDep) -> Response:
    # Posters never change for a clip id (ids are not reused): cache them for a day.
    headers = {"Cache-Control": "private, max-age=86400"}
    return Response(bank.poster_jpeg(clip_id), media_type="image/jpeg", headers=headers)


@router.delete(
    "/{clip_id}",
    response_model=ClipView,
    responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
def delete_clip(clip_id: ClipId, caller: WriterDep, bank: BankDep) -> ClipView:
    """Remove the clip's record, files and index entries: the key that added it, or a key
    with the ``admin`` scope."""
    record = bank.get(clip_id)
    if record.owner != caller.name and not caller.can("admin"):
        owner = f"'{record.owner}'" if record.owner else "the operator"
        raise ApiError(
            403,
            "forbidden",
            f"clip {clip_id} was added by {owner}; deleting it needs the admin scope",
        )
    return _view(bank.delete(clip_id))
