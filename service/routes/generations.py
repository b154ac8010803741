"""POST /generate: resolve the request into the job to run, record it, hand it to a worker."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from model.presets import get_preset
from runtime.generation import resolve_generation
from runtime.jobs import JobRecord
from service.deps import BankDep, CallerDep, StateDep, ensure_queue_room
from service.idempotency import IdempotencyKeyHeader, fingerprint, idempotent_submission
from service.schemas import ErrorBody, GenerateRequest, JobAccepted, JobView
from service.webhooks import accepted_webhook

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={
        200: {"model": JobAccepted, "description": "the job of an earlier identical request"},
        404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody},
        429: {"model": ErrorBody},
    },
)  # fmt: skip
def submit_generation(
    request: GenerateRequest,
    caller: CallerDep,
    state: StateDep,
    bank: BankDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobAccepted:
    """Queue one video. Poll ``links.self``; download ``links.video`` once it succeeded.

    The job is resolved here, not on a worker: out-of-range parameters and unknown pinned clips
    fail now, the seed is drawn now, and the memory clips are chosen now (``memory_used`` of
    the job lists them from the start).
    """
    digest = fingerprint("generate", request.model_dump(mode="json"))
    with idempotent_submission(state, caller, idempotency_key, digest, response) as submission:
        if submission.replayed is not None:
            job = submission.replayed
        else:
            ensure_queue_room(state, caller)
            webhook = accepted_webhook(state, request.webhook)
            preset = get_preset(state.settings.preset)
            spec = resolve_generation(request.generation(), preset, bank, state.metrics)
            job = state.store.create(JobRecord.new(caller.name, spec, webhook=webhook))
            state.dispatcher.submit(job)
            submission.made(job)
            state.metrics.increment("jobs_submitted_total", "generate")
    return JobAccepted(id=job.job_id, status=job.status, links=JobView.of(job).links)
