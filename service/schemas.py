"""Request and response models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from memory_bank.schemas import ClipRecord, SearchHit
from model.generation import GenerationParams
from runtime.generation import GenerationRequest
from runtime.job_events import QueueInfo
from runtime.jobs import (
    DEFAULT_WEBHOOK_EVENTS,
    GenerateSpec,
    JobRecord,
    MemoryClipUsed,
    WebhookDelivery,
    WebhookEvent,
)
from runtime.webhooks import MAX_URL_CHARS


class WebhookRequest(BaseModel):
    """Where to POST the job's events (signed, retried; see ``runtime.webhooks``)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=MAX_URL_CHARS, description="http(s) receiver")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1, max_length=4
    )


class GenerateRequest(GenerationRequest):
    """The body of POST /generate: the shared request model (the CLI builds the same one) and
    what only a service job has."""

    webhook: WebhookRequest | None = None

    def generation(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.model_dump(exclude={"webhook"}))


class JobLinks(BaseModel):
    self: str
    cancel: str
    video: str | None = None
    events: str | None = None
    preview: str | None = None  # while a generation with previews runs


class ImportRequest(BaseModel):
    """A dataset already in the imports storage (``DITMEM_IMPORTS_DIR``, or ``imports/`` of the
    bucket): a captions file (CSV with a video and a caption column, or JSONL) naming videos
    relative to ``folder``."""

    model_config = ConfigDict(extra="forbid")

    captions: str = Field(min_length=1, max_length=1024, description="key of the captions file")
    folder: str = Field("", max_length=1024, description="key prefix the rows' videos are under")
    tags: list[str] = Field(default_factory=list, max_length=32, description="added to every clip")
    window: int = Field(64, ge=1, le=1024, description="rows ingesting at a time")

    @field_validator("captions", "folder")
    @classmethod
    def _a_plain_key(cls, value: str, info: ValidationInfo) -> str:
        key = value.strip().strip("/")
        if not key and info.field_name == "captions":
            raise ValueError("must name the captions file")
        if not key.isprintable() or "\\" in key or any(p in ("..", ".") for p in key.split("/")):
            raise ValueError("must be a key inside the imports storage (no '..', '.', '\\', NUL)")
        return key


class JobView(BaseModel):
    id: str
    kind: Literal["generate", "ingest", "import"]
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
    queue_position: int | None = Field(
        None, description="queued: how many jobs of its kind are ahead of it, fleet-wide"
    )
    estimated_start: datetime | None = Field(
        None, description="queued: when it may start, from recent step times"
    )
    webhook_deliveries: dict[str, WebhookDelivery] = Field(
        default_factory=dict, description="per event: attempts, last status code, state"
    )
    links: JobLinks

    @classmethod
    def of(cls, job: JobRecord, queue: QueueInfo | None = None) -> JobView:
        base = f"/jobs/{job.job_id}"
        params = job.spec.params if isinstance(job.spec, GenerateSpec) else None
        # File names stay server-side; a client downloads through links.video.
        result: dict[str, Any] = {} if params is None else {"seed": params.seed}
        if job.result is not None:
            # An import's sending state (reserved rows, parked) is the workers' business.
            internal = {"kind", "video", "record", "reserved", "parked"}
            result |= job.result.model_dump(mode="json", exclude=internal)
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
            queue_position=queue.position if queue else None,
            estimated_start=queue.estimated_start if queue else None,
            webhook_deliveries=dict(job.webhook_deliveries),
            links=JobLinks(
                self=base,
                cancel=base,
                video=f"{base}/video" if job.kind == "generate" else None,
                events=f"{base}/events",
                preview=(
                    f"{base}/preview?step={job.preview_step}"
                    if job.preview_step is not None
                    else None
                ),
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
    failing: list[str] = Field(default_factory=list, description="the checks that failed")
