"""Request and response models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from memory_bank.schemas import ClipRecord, SearchHit
from model.generation import GenerationParams
from runtime.generation import GenerationRequest
from runtime.jobs import GenerateSpec, JobRecord, MemoryClipUsed

# The request body of POST /generate is the shared request model: the CLI builds the same one.
GenerateRequest = GenerationRequest


class JobLinks(BaseModel):
    self: str
    cancel: str
    video: str | None = None


class JobView(BaseModel):
    id: str
    kind: Literal["generate", "ingest"]
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: float
    step: int
    total_steps: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    params: GenerationParams | None = Field(
        description="the resolved parameters of a generation (seed included)"
    )
    memory_used: list[MemoryClipUsed]
    result: dict[str, Any]
    error: str | None
    links: JobLinks

    @classmethod
    def of(cls, job: JobRecord) -> JobView:
        base = f"/jobs/{job.job_id}"
        params = job.spec.params if isinstance(job.spec, GenerateSpec) else None
        # File names stay server-side; a client downloads through links.video.
        result: dict[str, Any] = {} if params is None else {"seed": params.seed}
        if job.result is not None:
            result |= job.result.model_dump(exclude={"kind", "video", "record"})
        return cls(
            id=job.job_id,
            kind=job.kind,
            status=job.status,
            progress=job.progress,
            step=job.step,
            total_steps=job.total_steps,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            params=params,
            memory_used=list(job.memory_used),
            result=result,
            error=job.error,
            links=JobLinks(
                self=base, cancel=base, video=f"{base}/video" if job.kind == "generate" else None
            ),
        )


class JobAccepted(BaseModel):
    id: str
    status: str
    links: JobLinks


class JobPage(BaseModel):
    items: list[JobView]
    total: int
    offset: int
    limit: int


class ClipView(ClipRecord):
    poster_url: str


class ClipViewPage(BaseModel):
    """A page of clips, newest first. Pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[ClipView]
    next_cursor: int | None = Field(None, description="absent on the last page")
    total: int | None = Field(
        None, description="clips in the bank (untagged listings only: it costs no count query)"
    )
    limit: int


class SearchResult(BaseModel):
    query: str
    hits: list[SearchHit]


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool | str | int] = Field(default_factory=dict)
