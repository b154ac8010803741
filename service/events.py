"""Job events: what ``GET /jobs/{id}/events`` streams, and the feed that wakes its streams.

An event is the job's state at one revision of its record, named by what that state is:
``queued`` (with the queue position and an estimated start), ``started``, ``progress``,
``succeeded`` (the video's URL), ``failed`` (the error shape) or ``canceled``. Its id is the
record's revision, so a client that reconnects with ``Last-Event-ID`` gets only what is newer.

Streams never poll: the job store announces every stored change (Redis pub/sub from the workers
of the fleet, or the embedded worker's thread), and :class:`JobFeed` wakes the streams of this
process that watch the job, which then read its record once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from runtime.jobs import EVERY_JOB, JobChange, JobRecord, JobStore

FINAL_EVENTS = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class QueueInfo:
    position: int | None  # jobs of its kind queued ahead of it
    estimated_start: datetime | None


def queue_info(store: JobStore, job: JobRecord, workers: int) -> QueueInfo:
    """Where a queued job stands; the start estimate needs the step time of earlier videos."""
    if job.status != "queued":
        return QueueInfo(None, None)
    position = store.queue_position(job)
    step_s = store.recent_step_seconds() if job.kind == "generate" else None
    if step_s is None:
        return QueueInfo(position, None)
    wait_s = store.steps_ahead(job) * step_s / max(1, workers)
    return QueueInfo(position, datetime.now(timezone.utc) + timedelta(seconds=wait_s))


def event_name(job: JobRecord) -> str:
    if job.status == "running":
        return "progress" if job.step > 0 else "started"
    return job.status


def event_data(job: JobRecord, queue: QueueInfo) -> dict[str, Any]:
    """The payload of the event of ``job``'s current state."""
    name = event_name(job)
    data: dict[str, Any] = {"id": job.job_id, "status": job.status, "revision": job.revision}
    if name == "queued":
        start = queue.estimated_start
        data |= {"queue_position": queue.position,
                 "estimated_start": start.isoformat() if start else None}  # fmt: skip
    elif name == "started":
        data |= {"started_at": job.started_at.isoformat() if job.started_at else None,
                 "total_steps": job.total_steps}  # fmt: skip
    elif name == "progress":
        data |= {"step": job.step, "total_steps": job.total_steps, "progress": job.progress}
    elif name == "succeeded":
        data |= {"video_url": f"/jobs/{job.job_id}/video" if job.kind == "generate" else None}
        if job.result is not None:
            data["result"] = job.result.model_dump(mode="json", exclude={"video", "record"})
    elif name == "failed":
        message = job.error or "the job failed"
        data["error"] = {"code": "job_failed", "message": message, "details": None}
    return data


@dataclass(eq=False)
class Watch:
    """One stream's interest in one job; ``changed`` is set when it should read it again."""

    job_id: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    queued: bool = False  # also woken when other jobs start or finish (its position moves)


class JobFeed:
    """Wakes this process's event streams from the store's change announcements."""

    def __init__(self, store: JobStore, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._watches: dict[str, set[Watch]] = {}
        self._unsubscribe: Callable[[], None] = store.subscribe(self._on_change)

    def _on_change(self, change: JobChange) -> None:  # on the store's thread
        with self._lock:
            if change.job_id == EVERY_JOB:
                woken = {watch for watches in self._watches.values() for watch in watches}
            else:
                woken = set(self._watches.get(change.job_id, ()))
                if change.transition:
                    woken |= {w for ws in self._watches.values() for w in ws if w.queued}
        for watch in woken:
            self._loop.call_soon_threadsafe(watch.changed.set)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """Register before reading the job: a change between the read and the wait still
        wakes the stream."""
        watch = Watch(job_id)
        with self._lock:
            self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                watches = self._watches.get(job_id, set())
                watches.discard(watch)
                if not watches:
                    self._watches.pop(job_id, None)

    @property
    def watching(self) -> int:
        with self._lock:
            return sum(len(watches) for watches in self._watches.values())

    def close(self) -> None:
        self._unsubscribe()
