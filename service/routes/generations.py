"""POST /generate: validate against the preset, record the job, hand it to a worker."""

from __future__ import annotations

from fastapi import APIRouter, status

from model.generation import GenerationParams
from model.presets import get_preset
from service.deps import BankDep, CallerDep, StateDep
from service.errors import ApiError
from service.jobs import JobRecord
from service.schemas import ErrorBody, GenerateRequest, JobAccepted, JobView

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
def submit_generation(
    request: GenerateRequest, caller: CallerDep, state: StateDep, bank: BankDep
) -> JobAccepted:
    """Queue one video. Poll ``links.self``; download ``links.video`` once it succeeded."""
    preset = get_preset(state.settings.preset)
    # Fail now, not on a worker: bounds of this preset, and pinned clips that do not exist.
    # (seed 0 when unset: validation must not draw the random seed the worker will draw.)
    GenerationParams.from_request(preset, request.model_dump() | {"seed": request.seed or 0})
    if request.memory.clip_ids:
        bank.store.get_many(list(request.memory.clip_ids))
    queued = state.store.queued_count(caller.name)
    if queued >= state.settings.max_queued_per_key:
        raise ApiError(
            429, "too_many_jobs",
            f"{queued} jobs already queued for '{caller.name}'; wait for some to finish",
            headers={"Retry-After": "10"},
        )  # fmt: skip
    job = state.store.create(
        JobRecord(kind="generate", owner=caller.name, request=request.model_dump())
    )
    state.dispatcher.submit(job)
    state.metrics.increment("jobs_submitted_total", "generate")
    view = JobView.of(job)
    return JobAccepted(id=job.job_id, status=job.status, links=view.links)
