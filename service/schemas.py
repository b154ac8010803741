"""Request and response models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from memory_bank.schemas import ClipRecord, SearchHit
from service.jobs import JobRecord, MemoryClipUsed

MAX_MEMORY_CLIPS = 16


class MemoryOptions(BaseModel):
    """Which reference clips steer the generation."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(5, ge=0, le=MAX_MEMORY_CLIPS, description="clips to retrieve; 0 disables")
    clip_ids: list[int] | None = Field(
        None, max_length=MAX_MEMORY_CLIPS, description="use these clips instead of retrieving"
    )
    min_score: float | None = Field(None, ge=-1, le=1, description="drop weaker matches")


class GenerateRequest(BaseModel):
    """One video to generate. Unset fields take the preset's defaults; bounds are the preset's."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    num_frames: int | None = Field(None, ge=1, le=1024)
    width: int | None = Field(None, ge=16, le=4096)
    height: int | None = Field(None, ge=16, le=4096)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    memory_guidance: bool | None = Field(
        None,
        description="memory in the conditional branch of classifier-free guidance only, so "
        "guidance_scale amplifies it (default: the preset's)",
    )
    memory: MemoryOptions = Field(default_factory=MemoryOptions)


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
    memory_used: list[MemoryClipUsed]
    result: dict[str, Any]
    error: str | None
    links: JobLinks

    @classmethod
    def of(cls, job: JobRecord) -> JobView:
        base = f"/jobs/{job.job_id}"
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
            memory_used=job.memory_used,
            result={k: v for k, v in job.result.items() if k not in ("video", "record")},
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
    items: list[ClipView]
    total: int
    offset: int
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
