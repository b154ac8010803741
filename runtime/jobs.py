"""Job records shared by the API and the workers: Redis in production, memory when embedded.

A job's record is the single source of truth for its state, and it carries the job itself as a
typed, fully resolved spec (:class:`GenerateSpec`: validated parameters and the memory clips
chosen at submission; :class:`IngestSpec`: the stored upload), so a worker runs exactly what the
API accepted and never re-parses a request.

Workers *claim* a job before running it; the claim is atomic and refuses jobs that are finished,
cancelled or running under a live lease, which is what keeps a task that Celery delivers twice
from running twice. Every later write of the worker names the attempt it claimed: a progress
report renews the lease and reads the cancel flag in one atomic round trip, and the finish writes
status, result and error in one transaction; both are refused once another attempt has taken the
job over.
"""

from __future__ import annotations

import collections
import json
import logging
import statistics
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from model.generation import GenerationParams

JobKind = Literal["generate", "ingest", "import"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FinalStatus = Literal["succeeded", "failed", "canceled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
WebhookEvent = Literal["started", "succeeded", "failed", "canceled"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("succeeded", "failed", "canceled")
# What a progress report tells the worker: go on, stop (cancel requested), or stop without
# writing anything more (another attempt owns the job now).
ProgressReply = Literal["continue", "cancel", "lost"]

JOB_FORMAT = 2  # version of the record layout; records of another version are refused
# Workers announce themselves this often; one silent for WORKER_SILENT_S no longer counts as
# ready (so /readyz turns 503 at most that long after the last worker died).
logger = logging.getLogger(__name__)

STEP_SAMPLES = 50  # generations whose step time the start estimates use
MAX_AHEAD_READ = 1000  # queued jobs read to add up the steps ahead (beyond: counted, not read)
EVERY_JOB = "*"  # a change of this id: changes may have been missed, re-read every job watched
HEARTBEAT_S = 5.0
WORKER_SILENT_S = 3 * HEARTBEAT_S


def now() -> datetime:
    return datetime.now(timezone.utc)


class OutdatedJobRecord(Exception):
    """A job recorded by an older ditmem in a layout this version does not read."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"job {job_id} was recorded by an older ditmem (job record format 1) and cannot be "
            "read by this version; submit it again"
        )
        self.job_id = job_id


class MemoryClipUsed(BaseModel):
    """One memory clip of a generation: a retrieved hit (with its score) or a pinned clip."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: int
    score: float | None = None
    caption: str


class GenerateSpec(BaseModel):
    """A video to make: resolved parameters and the memory clips chosen when it was accepted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["generate"] = "generate"
    params: GenerationParams
    memory: tuple[MemoryClipUsed, ...] = ()
    preview_every: int | None = None  # a live preview every N steps (it changes no pixel)


class IngestSpec(BaseModel):
    """A stored upload to add to the memory bank."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["ingest"] = "ingest"
    upload_key: str  # in ``storage``, which every worker reaches
    caption: str
    tags: tuple[str, ...] = ()
    source_name: str | None = None
    # "uploads": a file received for this job, removed once ingested; "imports": a file of a
    # dataset the operator placed in the imports storage, only read.
    storage: Literal["uploads", "imports"] = "uploads"
    parent: str | None = None  # the import job this row belongs to
    line: int | None = None  # its line in that import's captions file
    uploader: str | None = None  # owner of the clip (default: the job's owner)


class ImportSpec(BaseModel):
    """A dataset already in the imports storage: a captions file naming videos in a folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["import"] = "import"
    folder: str  # key prefix of the videos; rows name them relative to it
    captions: str  # key of the CSV or JSONL file
    tags: tuple[str, ...] = ()
    window: int = Field(64, ge=1, description="rows ingesting at a time")


class GenerateResult(BaseModel):
    """Keys of the video and its JSON record in the results storage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["generate"] = "generate"
    video: str
    record: str


class IngestResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["ingest"] = "ingest"
    clip_id: int
    created: bool


class RejectedRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    line: int
    video: str
    reason: str


MAX_REJECTIONS_KEPT = 200


class ImportResult(BaseModel):
    """Where an import stands; final once the job has succeeded.

    Rows ``[0, sent)`` have been handed to workers (or rejected before); ``pending`` of them
    are still ingesting. Every finished row lands in exactly one of the three counts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["import"] = "import"
    rows: int = 0
    sent: int = 0
    reserved: int = 0  # rows [sent, reserved) are being sent by the running attempt
    pending: int = 0
    imported: int = 0
    already_present: int = 0
    rejected: int = 0
    rejections: tuple[RejectedRow, ...] = ()  # the first MAX_REJECTIONS_KEPT
    workers: dict[str, int] = Field(default_factory=dict)  # clips imported by each worker
    parked: bool = False  # waiting for rows to finish before sending more


JobSpec = Annotated[GenerateSpec | IngestSpec | ImportSpec, Field(discriminator="kind")]
JobResult = Annotated[GenerateResult | IngestResult | ImportResult, Field(discriminator="kind")]


class WebhookTarget(BaseModel):
    """Where a job's events are delivered (validated by the API when it accepted the job)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    events: tuple[WebhookEvent, ...] = DEFAULT_WEBHOOK_EVENTS


class WebhookDelivery(BaseModel):
    """How the delivery of one event of a job went so far."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = 0
    last_status: int | None = None  # the receiver's HTTP status of the last attempt
    last_error: str | None = None  # why the last attempt failed (timeout, refused, 500, ...)
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    state: Literal["pending", "delivered", "gave_up"] = "pending"


class JobRecord(BaseModel):
    """Everything known about one job."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    format: Literal[2] = JOB_FORMAT
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    owner: str
    spec: JobSpec
    status: JobStatus = "queued"
    progress: float = Field(0.0, ge=0, le=1)
    step: int = Field(0, ge=0)
    total_steps: int = Field(0, ge=0)
    created_at: datetime = Field(default_factory=now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = None
    error: str | None = None
    cancel_requested: bool = False
    worker: str | None = None
    lease_until: float | None = None  # epoch seconds; a running job past it has lost its worker
    attempts: int = Field(0, ge=0)
    # Counts the stored changes of the record: the id of its events (``Last-Event-ID``).
    revision: int = Field(0, ge=0)
    webhook: WebhookTarget | None = None
    preview_step: int | None = None  # the step of the latest live preview stored (running)
    webhook_deliveries: dict[WebhookEvent, WebhookDelivery] = Field(default_factory=dict)

    @classmethod
    def new(
        cls, owner: str, spec: GenerateSpec | IngestSpec | ImportSpec, **fields: Any
    ) -> JobRecord:
        """A queued job; a generation knows its step count from the start."""
        steps = spec.params.steps if isinstance(spec, GenerateSpec) else 0
        return cls(owner=owner, spec=spec, total_steps=steps, **fields)

    @property
    def kind(self) -> JobKind:
        return self.spec.kind

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def memory_used(self) -> tuple[MemoryClipUsed, ...]:
        return self.spec.memory if isinstance(self.spec, GenerateSpec) else ()


def preview_key(job_id: str, attempt: int) -> str:
    """Where an attempt's live preview is in the results storage (overwritten by each new one)."""
    return f"{job_id}-a{attempt}-preview.png"


def with_changes(job: JobRecord, **changes: Any) -> JobRecord:
    """``job`` with ``changes``, validated (unlike ``model_copy``, a misspelled field fails)."""
    return JobRecord.model_validate(job.model_dump() | changes)


# -- transitions: pure functions that both stores apply atomically ---------------------------------


def _claimable(job: JobRecord, at: float) -> bool:
    if job.status == "queued":
        return not job.cancel_requested
    if job.status == "running":
        return job.lease_until is not None and job.lease_until < at
    return False


def _claimed(job: JobRecord, worker: str, lease_s: float, at: float) -> JobRecord:
    return with_changes(
        job,
        status="running",
        worker=worker,
        lease_until=at + lease_s,
        started_at=job.started_at or now(),
        attempts=job.attempts + 1,
        step=0,
        progress=0.0,
        preview_step=None,
    )


def _lease_expired(job: JobRecord, at: float) -> bool:
    return job.status == "running" and job.lease_until is not None and job.lease_until < at


def _cancelled(job: JobRecord) -> JobRecord:
    if job.finished:
        return job
    if job.status == "queued" or _lease_expired(job, time.time()):
        # Never runs (the claim refuses it), or nothing runs it any more (its worker is gone):
        # final right away.
        return with_changes(
            job, status="canceled", cancel_requested=True, finished_at=now(), lease_until=None
        )
    return with_changes(job, cancel_requested=True)


def _waiting_for_rows(job: JobRecord) -> bool:
    """A parked import: running without a worker on purpose, until its rows finish."""
    return isinstance(job.result, ImportResult) and job.result.parked


def _requeued(job: JobRecord, at: float) -> JobRecord | None:
    """A running job whose worker stopped renewing its lease, back in the queue."""
    if not _lease_expired(job, at) or _waiting_for_rows(job):
        return None
    return with_changes(
        job, status="queued", worker=None, lease_until=None, step=0, progress=0.0, preview_step=None
    )


def _owned(job: JobRecord, attempt: int) -> bool:
    """The attempt that claimed the job still holds it."""
    return job.status == "running" and job.attempts == attempt


def _finished(
    job: JobRecord, status: FinalStatus, result: JobResult | None, error: str | None
) -> JobRecord:
    changes: dict[str, Any] = dict(
        status=status, finished_at=now(), lease_until=None, result=result, error=error,
        preview_step=None,  # the preview is removed with the run that made it
    )  # fmt: skip
    if status == "succeeded":
        changes |= dict(step=job.total_steps, progress=1.0)
    return with_changes(job, **changes)


ChangeListener = Callable[["JobChange"], None]


class JobChange(BaseModel):
    """What a store announces after each stored change of a job (the record is read anew)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    revision: int
    status: JobStatus
    # The status changed (queued -> running, running -> succeeded, ...): the queue positions
    # of the jobs behind it may have moved; a progress step moves none.
    transition: bool

    @classmethod
    def of(cls, job: JobRecord, *, transition: bool) -> JobChange:
        return cls(job_id=job.job_id, revision=job.revision, status=job.status,
                   transition=transition)  # fmt: skip


def _queued_ahead(other: JobRecord, job: JobRecord) -> bool:
    """``other`` is queued before ``job`` in the queue of their kind (first in, first out)."""
    return (
        other.status == "queued"
        and other.kind == job.kind
        and (other.created_at, other.job_id) < (job.created_at, job.job_id)
    )


def _steps_before(other: JobRecord, job: JobRecord) -> int:
    if other.kind != "generate":
        return 0
    if other.status == "running":
        return max(0, other.total_steps - other.step)
    return other.total_steps if _queued_ahead(other, job) else 0


def _revised(before: JobRecord, after: JobRecord) -> JobRecord:
    """``after`` as the next revision of ``before``. Records whose job did not change keep
    theirs: the state of a webhook's delivery is no event of the job."""
    if after.model_copy(update={"webhook_deliveries": before.webhook_deliveries}) == before:
        return after
    return after.model_copy(update={"revision": before.revision + 1})


def webhook_due(before: JobRecord | None, after: JobRecord) -> str | None:
    """The delivery id (``<job>.<revision>.<event>``) of the event that ``after`` reached, if
    its webhook wants it; ``None`` when no delivery is due."""
    if after.webhook is None or (before is not None and before.status == after.status):
        return None
    event = "started" if after.status == "running" else after.status
    if event not in after.webhook.events:
        return None
    return f"{after.job_id}.{after.revision}.{event}"


class JobStore(ABC):
    """Persistence of job records; every operation is atomic.

    Claim, finish and cancel are written once, here, as the pure transitions above; each store
    applies them with its own atomic read-modify-write, :meth:`_transform`. Every stored change
    is announced to the listeners of :meth:`subscribe`, in every process that subscribed.
    """

    @abstractmethod
    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` after every stored change of any job (from another thread);
        returns the function that stops it."""

    @abstractmethod
    def queue_position(self, job: JobRecord) -> int | None:
        """How many jobs of its kind are queued ahead of a queued job (``None``: not queued)."""

    @abstractmethod
    def steps_ahead(self, job: JobRecord) -> int:
        """Denoising steps the fleet has to run before a queued generation starts: those of
        the generations queued ahead of it and what is left of the running ones."""

    # -- the webhook outbox: deliveries due, written with the transition that made them due --

    @abstractmethod
    def claim_delivery(self, lease_s: float) -> str | None:
        """The id of a delivery due now, held for ``lease_s`` (then due again: a sender that
        died mid-delivery loses nothing); ``None`` when none is due."""

    @abstractmethod
    def schedule_delivery(self, delivery_id: str, due_at: float) -> None:
        """Make a delivery due at ``due_at`` (epoch seconds): a retry."""

    @abstractmethod
    def drop_delivery(self, delivery_id: str) -> None:
        """Delivered, or given up."""

    @abstractmethod
    def pending_deliveries(self) -> int: ...

    @abstractmethod
    def record_step_seconds(self, seconds: float) -> None:
        """Remember how long a step of a finished generation took (the estimates' basis)."""

    @abstractmethod
    def recent_step_seconds(self) -> float | None:
        """The median step time of the last generations; ``None`` before the first."""

    @abstractmethod
    def create(self, job: JobRecord) -> JobRecord: ...

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """Records of several jobs, in order (stores override it with one round trip)."""
        return [self.get(job_id) for job_id in job_ids]

    def finished_among(self, job_ids: list[str]) -> list[JobRecord]:
        """Records of those of the jobs that are finished (a poller's question)."""
        return [job for job in self.get_many(job_ids) if job is not None and job.finished]

    @abstractmethod
    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]: ...

    @abstractmethod
    def queued_count(self, owner: str) -> int: ...

    @abstractmethod
    def report_progress(
        self,
        job_id: str,
        attempt: int,
        step: int,
        total_steps: int,
        lease_s: float,
        preview_step: int | None = None,
    ) -> ProgressReply:
        """Record a finished step (and the step of the latest stored preview) and renew the
        lease, if ``attempt`` still holds the job; the reply says whether to go on, stop
        (cancel requested) or drop the job (lost)."""

    @abstractmethod
    def ping(self) -> bool: ...

    @abstractmethod
    def _transform(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None]
    ) -> JobRecord | None:
        """Replace the job by ``change(job)`` atomically unless that is ``None``; the result."""

    def claim(self, job_id: str, worker: str, lease_s: float) -> JobRecord | None:
        """Take the job for a new attempt, or ``None`` when it may not run now."""

        def change(job: JobRecord) -> JobRecord | None:
            at = time.time()
            return _claimed(job, worker, lease_s, at) if _claimable(job, at) else None

        return self._transform(job_id, change)

    def finish(
        self,
        job_id: str,
        attempt: int,
        status: FinalStatus,
        *,
        result: JobResult | None = None,
        error: str | None = None,
    ) -> JobRecord | None:
        """Make the attempt's outcome final; ``None`` when the attempt no longer holds the job."""

        def change(job: JobRecord) -> JobRecord | None:
            return _finished(job, status, result, error) if _owned(job, attempt) else None

        return self._transform(job_id, change)

    def update(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None]
    ) -> JobRecord | None:
        """Replace the job by ``change(job)`` atomically (``None``: leave it); what is stored.

        ``change`` may run more than once (optimistic concurrency): keep it a pure function.
        """
        return self._transform(job_id, change)

    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Extend the lease of a job that reports no steps (an ingest); False once the attempt
        no longer holds it."""

        def change(job: JobRecord) -> JobRecord | None:
            if not _owned(job, attempt):
                return None
            return with_changes(job, lease_until=time.time() + lease_s)

        return self._transform(job_id, change) is not None

    @abstractmethod
    def running(self) -> list[JobRecord]:
        """Every job whose status is running (what a lease reaper looks at)."""

    def requeue_if_abandoned(self, job_id: str) -> JobRecord | None:
        """Put a running job whose lease expired back in the queue (its attempt can no longer
        write: every write of an attempt checks that the job is still running under it).
        ``None`` when the job is not abandoned, or another reaper requeued it first."""
        return self._transform(job_id, lambda job: _requeued(job, time.time()))

    def request_cancel(self, job_id: str) -> JobRecord:
        updated = self._transform(job_id, _cancelled)
        if updated is None:
            raise KeyError(job_id)
        return updated


class MemoryJobStore(JobStore):
    """In-process store for the embedded single-process mode."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self._listeners: list[ChangeListener] = []
        self._step_seconds: collections.deque[float] = collections.deque(maxlen=STEP_SAMPLES)
        self._outbox: dict[str, float] = {}  # delivery id -> due at

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _announce(self, job: JobRecord, transition: bool) -> None:
        change = JobChange.of(job, transition=transition)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a listener's failure is its own; the write stands
                logger.exception("job change listener failed")

    def create(self, job: JobRecord) -> JobRecord:
        with self._lock:
            self._jobs[job.job_id] = job
        self._announce(job, transition=True)
        return job

    def queue_position(self, job: JobRecord) -> int | None:
        if job.status != "queued":
            return None
        with self._lock:
            return sum(1 for other in self._jobs.values() if _queued_ahead(other, job))

    def steps_ahead(self, job: JobRecord) -> int:
        with self._lock:
            return sum(_steps_before(other, job) for other in self._jobs.values())

    def claim_delivery(self, lease_s: float) -> str | None:
        at = time.time()
        with self._lock:
            due = [(when, delivery) for delivery, when in self._outbox.items() if when <= at]
            if not due:
                return None
            delivery = min(due)[1]
            self._outbox[delivery] = at + lease_s
            return delivery

    def schedule_delivery(self, delivery_id: str, due_at: float) -> None:
        with self._lock:
            self._outbox[delivery_id] = due_at

    def drop_delivery(self, delivery_id: str) -> None:
        with self._lock:
            self._outbox.pop(delivery_id, None)

    def pending_deliveries(self) -> int:
        with self._lock:
            return len(self._outbox)

    def record_step_seconds(self, seconds: float) -> None:
        self._step_seconds.append(seconds)

    def recent_step_seconds(self) -> float | None:
        return statistics.median(self._step_seconds) if self._step_seconds else None

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        with self._lock:
            mine = sorted(
                (j for j in self._jobs.values() if j.owner == owner),
                key=lambda j: j.created_at,
                reverse=True,
            )
        return mine[offset : offset + limit], len(mine)

    def queued_count(self, owner: str) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.owner == owner and j.status == "queued")

    def running(self) -> list[JobRecord]:
        with self._lock:
            return [job for job in self._jobs.values() if job.status == "running"]

    def _transform(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None]
    ) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            updated = change(job)
            if updated is None:
                return None
            updated = self._jobs[job_id] = _revised(job, updated)
            due = webhook_due(job, updated)
            if due is not None:
                self._outbox[due] = time.time()
        if updated.revision != job.revision:
            self._announce(updated, transition=updated.status != job.status)
        return updated

    def report_progress(
        self,
        job_id: str,
        attempt: int,
        step: int,
        total_steps: int,
        lease_s: float,
        preview_step: int | None = None,
    ) -> ProgressReply:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or not _owned(job, attempt):
                return "lost"
            updated = self._jobs[job_id] = with_changes(
                job,
                step=step,
                total_steps=total_steps,
                progress=step / total_steps,
                lease_until=time.time() + lease_s,
                revision=job.revision + 1,
                preview_step=job.preview_step if preview_step is None else preview_step,
            )
        self._announce(updated, transition=False)
        return "cancel" if job.cancel_requested else "continue"

    def ping(self) -> bool:
        return True


# The first delivery due, held for a lease (its score moved past now), atomically: one sender.
_CLAIM_DELIVERY_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then
  return false
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], due[1])
return due[1]
"""

# Renews the lease and records the step only while the attempt holds the job, and answers with
# the cancel flag: one round trip per denoising step. Fields hold JSON values.
_PROGRESS_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"'
   or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then
  return 'lost'
end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total_steps', ARGV[3], 'progress', ARGV[4],
           'lease_until', ARGV[5])
if ARGV[7] ~= 'null' then
  redis.call('HSET', KEYS[1], 'preview_step', ARGV[7])
end
local revision = redis.call('HINCRBY', KEYS[1], 'revision', 1)
redis.call('PUBLISH', KEYS[2], cjson.encode({job_id = ARGV[6], revision = revision,
                                             status = 'running', transition = false}))
if redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' then
  return 'cancel'
end
return 'continue'
"""


class RedisJobStore(JobStore):
    """Job records in Redis: one hash per job (a JSON value per field), indexes per owner.

    A hash rather than one JSON string lets a progress report change four fields in a server
    side script without re-encoding the record. Read-modify-write operations run under
    optimistic locking (WATCH/MULTI), so a claim, a finish and a cancel from different processes
    never overwrite each other.

    Records live under ``<prefix>:v2:``; a job id found only under the format-1 key
    ``<prefix>:job:<id>`` raises :class:`OutdatedJobRecord`.
    """

    def __init__(self, url: str, prefix: str = "ditmem", ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._progress = self.redis.register_script(_PROGRESS_SCRIPT)
        self._claim_delivery = self.redis.register_script(_CLAIM_DELIVERY_SCRIPT)

    @property
    def _running_key(self) -> str:
        return f"{self.prefix}:v2:running"

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:v2:job:{job_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:v2:owner:{owner}"

    def _queued_key(self, owner: str) -> str:
        return f"{self.prefix}:v2:queued:{owner}"

    def _queue_key(self, kind: str) -> str:
        """Queued jobs of one kind in queue order (score: creation time)."""
        return f"{self.prefix}:v2:queue:{kind}"

    @property
    def _changes_channel(self) -> str:
        return f"{self.prefix}:v2:changes"

    @property
    def _outbox_key(self) -> str:
        return f"{self.prefix}:v2:webhooks:due"

    @property
    def _step_seconds_key(self) -> str:
        return f"{self.prefix}:v2:step_seconds"

    def _track_queue(self, pipe: redis.client.Pipeline, job: JobRecord) -> None:
        queue = self._queue_key(job.kind)
        if job.status == "queued":
            pipe.zadd(queue, {job.job_id: job.created_at.timestamp()})
        else:
            pipe.zrem(queue, job.job_id)

    def _publish(self, pipe: redis.client.Pipeline, job: JobRecord, transition: bool) -> None:
        change = JobChange.of(job, transition=transition)
        pipe.publish(self._changes_channel, change.model_dump_json())

    @staticmethod
    def _encode(job: JobRecord) -> dict[str, str]:
        return {name: json.dumps(value) for name, value in job.model_dump(mode="json").items()}

    def _decode(self, job_id: str, raw: dict[str, str]) -> JobRecord | None:
        if not raw:
            if self.redis.exists(f"{self.prefix}:job:{job_id}"):
                raise OutdatedJobRecord(job_id)
            return None
        # Each field already holds JSON: join them into one document and validate it strictly.
        document = ",".join(f"{json.dumps(name)}:{value}" for name, value in raw.items())
        return JobRecord.model_validate_json("{" + document + "}")

    def create(self, job: JobRecord) -> JobRecord:
        pipe = self.redis.pipeline()
        key = self._key(job.job_id)
        pipe.hset(key, mapping=self._encode(job))
        pipe.expire(key, self.ttl_s)
        pipe.zadd(self._owner_key(job.owner), {job.job_id: job.created_at.timestamp()})
        if job.status == "queued":
            pipe.sadd(self._queued_key(job.owner), job.job_id)
        self._track_queue(pipe, job)
        self._publish(pipe, job, transition=True)
        pipe.execute()
        return job

    def get(self, job_id: str) -> JobRecord | None:
        return self._decode(job_id, self.redis.hgetall(self._key(job_id)))

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self._key(job_id))
        return [
            self._decode(job_id, raw) for job_id, raw in zip(job_ids, pipe.execute(), strict=True)
        ]

    def finished_among(self, job_ids: list[str]) -> list[JobRecord]:
        # Statuses first (a field each): only finished jobs are read and decoded whole.
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self._key(job_id), "status")
        statuses = pipe.execute()
        finished = [
            job_id
            for job_id, status in zip(job_ids, statuses, strict=True)
            if status is not None and json.loads(status) in FINISHED
        ]
        return [job for job in self.get_many(finished) if job is not None and job.finished]

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        key = self._owner_key(owner)
        total = self.redis.zcard(key)
        ids = self.redis.zrevrange(key, offset, offset + limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key(job_id))
        jobs = [self._decode(i, raw) for i, raw in zip(ids, pipe.execute(), strict=True) if raw]
        return jobs, total

    def queued_count(self, owner: str) -> int:
        return self.redis.scard(self._queued_key(owner))

    def running(self) -> list[JobRecord]:
        ids = sorted(self.redis.smembers(self._running_key))
        records = self.get_many(ids)
        gone = [job_id for job_id, job in zip(ids, records, strict=True) if job is None]
        if gone:  # records that expired while running
            self.redis.srem(self._running_key, *gone)
        return [job for job in records if job is not None and job.status == "running"]

    def _transform(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None]
    ) -> JobRecord | None:
        """Apply ``change(job) -> new job | None`` atomically; returns what was stored."""
        key = self._key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    job = self._decode(job_id, pipe.hgetall(key))
                    updated = None if job is None else change(job)
                    if updated is None:
                        pipe.unwatch()
                        return None
                    assert job is not None
                    updated = _revised(job, updated)
                    pipe.multi()
                    pipe.hset(key, mapping=self._encode(updated))
                    queued, running = self._queued_key(updated.owner), self._running_key
                    if updated.status == "queued":
                        pipe.sadd(queued, job_id)
                    else:
                        pipe.srem(queued, job_id)
                    if updated.status == "running":
                        pipe.sadd(running, job_id)
                    else:
                        pipe.srem(running, job_id)
                    self._track_queue(pipe, updated)
                    due = webhook_due(job, updated)
                    if due is not None:
                        pipe.zadd(self._outbox_key, {due: time.time()})
                    if updated.revision != job.revision:
                        self._publish(pipe, updated, transition=updated.status != job.status)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def report_progress(
        self,
        job_id: str,
        attempt: int,
        step: int,
        total_steps: int,
        lease_s: float,
        preview_step: int | None = None,
    ) -> ProgressReply:
        reply = self._progress(
            keys=[self._key(job_id), self._changes_channel],
            args=[
                json.dumps(attempt),
                json.dumps(step),
                json.dumps(total_steps),
                json.dumps(step / total_steps),
                json.dumps(time.time() + lease_s),
                job_id,
                json.dumps(preview_step),
            ],
        )
        return reply  # type: ignore[return-value]  # the script answers one of the three

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """One subscription to the changes channel per call, on a thread of its own; after a
        lost connection it subscribes again and announces :data:`EVERY_JOB`."""
        stopping = threading.Event()

        def listen() -> None:
            first = True
            while not stopping.is_set():
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                try:
                    pubsub.subscribe(self._changes_channel)
                    if not first:  # what changed while the connection was down is unknown
                        listener(JobChange(job_id=EVERY_JOB, revision=0, status="queued",
                                           transition=True))  # fmt: skip
                    first = False
                    while not stopping.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is not None:
                            listener(JobChange.model_validate_json(message["data"]))
                except redis.RedisError as error:
                    logger.warning("job changes: %s; subscribing again", error)
                    stopping.wait(1.0)
                except Exception:
                    logger.exception("job change listener failed")
                finally:
                    pubsub.close()

        thread = threading.Thread(target=listen, name="ditmem-job-changes", daemon=True)
        thread.start()

        def stop() -> None:
            stopping.set()
            thread.join(timeout=5)

        return stop

    def queue_position(self, job: JobRecord) -> int | None:
        if job.status != "queued":
            return None
        return self.redis.zrank(self._queue_key(job.kind), job.job_id)

    def steps_ahead(self, job: JobRecord) -> int:
        ahead: list[str] = []
        queue = self._queue_key("generate")
        rank = self.redis.zrank(queue, job.job_id) if job.status == "queued" else None
        if rank:
            ahead = self.redis.zrange(queue, 0, min(rank, MAX_AHEAD_READ) - 1)
        running = sorted(self.redis.smembers(self._running_key))
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ahead:
            pipe.hget(self._key(job_id), "total_steps")
        for job_id in running:
            pipe.hmget(self._key(job_id), "total_steps", "step")
        replies = pipe.execute()
        queued_steps = sum(json.loads(total) for total in replies[: len(ahead)] if total)
        running_steps = sum(
            max(0, json.loads(total) - json.loads(step))
            for total, step in replies[len(ahead) :]
            if total and step
        )
        return queued_steps + running_steps

    def claim_delivery(self, lease_s: float) -> str | None:
        at = time.time()
        return self._claim_delivery(keys=[self._outbox_key], args=[at, at + lease_s]) or None

    def schedule_delivery(self, delivery_id: str, due_at: float) -> None:
        self.redis.zadd(self._outbox_key, {delivery_id: due_at})

    def drop_delivery(self, delivery_id: str) -> None:
        self.redis.zrem(self._outbox_key, delivery_id)

    def pending_deliveries(self) -> int:
        return self.redis.zcard(self._outbox_key)

    def record_step_seconds(self, seconds: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self._step_seconds_key, repr(seconds))
        pipe.ltrim(self._step_seconds_key, 0, STEP_SAMPLES - 1)
        pipe.execute()

    def recent_step_seconds(self) -> float | None:
        samples = [float(value) for value in self.redis.lrange(self._step_seconds_key, 0, -1)]
        return statistics.median(samples) if samples else None

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def workers_ready(self) -> list[str]:
        """Workers that announced a loaded model within the last ``WORKER_SILENT_S``."""
        key = f"{self.prefix}:workers"
        cutoff = time.time() - WORKER_SILENT_S
        self.redis.zremrangebyscore(key, 0, cutoff)
        return list(self.redis.zrangebyscore(key, cutoff, "+inf"))

    def announce_worker(self, name: str) -> None:
        self.redis.zadd(f"{self.prefix}:workers", {name: time.time()})

    def retire_worker(self, name: str) -> None:
        self.redis.zrem(f"{self.prefix}:workers", name)
