"""Job records shared by the API and the workers: Redis in production, memory when embedded.

A job's record is the single source of truth for its state. Workers *claim* a job before running
it; the claim is atomic and refuses jobs that are finished, cancelled or running under a live
lease, which is what keeps a task that Celery delivers twice from running twice. A running
worker renews its lease at every denoising step; a worker that dies lets its lease expire, and
the redelivered task may then claim the job again.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import redis
from pydantic import BaseModel, Field

JobKind = Literal["generate", "ingest"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


def now() -> datetime:
    return datetime.now(timezone.utc)


class MemoryClipUsed(BaseModel):
    clip_id: int
    score: float | None = None
    caption: str


class JobRecord(BaseModel):
    """Everything known about one job."""

    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: JobKind
    owner: str
    status: JobStatus = "queued"
    progress: float = 0.0
    step: int = 0
    total_steps: int = 0
    created_at: datetime = Field(default_factory=now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    memory_used: list[MemoryClipUsed] = Field(default_factory=list)
    result: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    worker: str | None = None
    lease_until: float | None = None  # epoch seconds; a running job past it has lost its worker
    attempts: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobStore(Protocol):
    """Persistence of job records; implementations must make ``claim`` atomic."""

    def create(self, job: JobRecord) -> JobRecord: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]: ...

    def queued_count(self, owner: str) -> int: ...

    def claim(self, job_id: str, worker: str, lease_s: float) -> JobRecord | None: ...

    def update(self, job_id: str, **fields: Any) -> JobRecord: ...

    def request_cancel(self, job_id: str) -> JobRecord: ...

    def ping(self) -> bool: ...


def _claimable(job: JobRecord, at: float) -> bool:
    if job.status == "queued":
        return not job.cancel_requested
    if job.status == "running":
        return job.lease_until is not None and job.lease_until < at
    return False


def _claimed(job: JobRecord, worker: str, lease_s: float, at: float) -> JobRecord:
    return job.model_copy(
        update={
            "status": "running",
            "worker": worker,
            "lease_until": at + lease_s,
            "started_at": job.started_at or now(),
            "attempts": job.attempts + 1,
        }
    )


def _cancelled(job: JobRecord) -> JobRecord:
    if job.finished:
        return job
    if job.status == "queued":
        # Never runs: the claim refuses it, and it is final right away.
        return job.model_copy(
            update={"status": "canceled", "cancel_requested": True, "finished_at": now()}
        )
    return job.model_copy(update={"cancel_requested": True})


class MemoryJobStore:
    """In-process store for the embedded single-process mode."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()

    def create(self, job: JobRecord) -> JobRecord:
        with self._lock:
            self._jobs[job.job_id] = job
        return job

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

    def claim(self, job_id: str, worker: str, lease_s: float) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
            at = time.time()
            if job is None or not _claimable(job, at):
                return None
            self._jobs[job_id] = _claimed(job, worker, lease_s, at)
            return self._jobs[job_id]

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        with self._lock:
            job = self._jobs[job_id].model_copy(update=fields)
            self._jobs[job_id] = job
            return job

    def request_cancel(self, job_id: str) -> JobRecord:
        with self._lock:
            job = _cancelled(self._jobs[job_id])
            self._jobs[job_id] = job
            return job

    def ping(self) -> bool:
        return True


class RedisJobStore:
    """Job records in Redis: one JSON string per job, a sorted set of job ids per owner.

    Read-modify-write operations run under optimistic locking (WATCH/MULTI), so a claim, a
    progress update and a cancel from different processes never overwrite each other.
    """

    def __init__(self, url: str, prefix: str = "ditmem", ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}"

    def _queued_key(self, owner: str) -> str:
        return f"{self.prefix}:queued:{owner}"

    def create(self, job: JobRecord) -> JobRecord:
        pipe = self.redis.pipeline()
        pipe.set(self._key(job.job_id), job.model_dump_json(), ex=self.ttl_s)
        pipe.zadd(self._owner_key(job.owner), {job.job_id: job.created_at.timestamp()})
        pipe.sadd(self._queued_key(job.owner), job.job_id)
        pipe.execute()
        return job

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self._key(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        key = self._owner_key(owner)
        total = self.redis.zcard(key)
        ids = self.redis.zrevrange(key, offset, offset + limit - 1)
        raws = self.redis.mget([self._key(i) for i in ids]) if ids else []
        return [JobRecord.model_validate_json(r) for r in raws if r], total

    def queued_count(self, owner: str) -> int:
        return self.redis.scard(self._queued_key(owner))

    def _transform(self, job_id: str, change) -> JobRecord | None:
        """Apply ``change(job) -> new job | None`` atomically; returns what was stored."""
        key = self._key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    job = JobRecord.model_validate_json(raw)
                    updated = change(job)
                    if updated is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.set(key, updated.model_dump_json(), keepttl=True)
                    if updated.status != "queued":
                        pipe.srem(self._queued_key(updated.owner), job_id)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def claim(self, job_id: str, worker: str, lease_s: float) -> JobRecord | None:
        def change(job: JobRecord) -> JobRecord | None:
            at = time.time()
            return _claimed(job, worker, lease_s, at) if _claimable(job, at) else None

        return self._transform(job_id, change)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        updated = self._transform(job_id, lambda job: job.model_copy(update=fields))
        if updated is None:
            raise KeyError(job_id)
        return updated

    def request_cancel(self, job_id: str) -> JobRecord:
        updated = self._transform(job_id, _cancelled)
        if updated is None:
            raise KeyError(job_id)
        return updated

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def workers_ready(self) -> list[str]:
        """Workers that announced a loaded model within the last minute."""
        key = f"{self.prefix}:workers"
        cutoff = time.time() - 60
        self.redis.zremrangebyscore(key, 0, cutoff)
        return list(self.redis.zrangebyscore(key, cutoff, "+inf"))

    def announce_worker(self, name: str) -> None:
        self.redis.zadd(f"{self.prefix}:workers", {name: time.time()})

    def retire_worker(self, name: str) -> None:
        self.redis.zrem(f"{self.prefix}:workers", name)
