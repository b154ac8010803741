"""A job's state as an event: what the event stream sends and what a webhook delivers.

An event is the job's state at one revision of its record, named by what that state is:
``queued`` (with the queue position and an estimated start), ``started``, ``progress``,
``succeeded`` (the video's URL), ``failed`` (the error shape) or ``canceled``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

from runtime.jobs import JobRecord, JobStore

EventName = Literal["queued", "started", "progress", "succeeded", "failed", "canceled"]
EVENT_NAMES: tuple[EventName, ...] = get_args(EventName)


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


def event_name(job: JobRecord) -> EventName:
    if job.status == "running":
        return "progress" if job.step > 0 else "started"
    return job.status


def event_data(job: JobRecord, queue: QueueInfo, base_url: str = "") -> dict[str, Any]:
    """The payload of the event of ``job``'s current state; links start with ``base_url``."""
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
        if job.preview_step is not None:  # the step in the URL: a new image, a new URL
            data["preview_url"] = f"{base_url}/jobs/{job.job_id}/preview?step={job.preview_step}"
    elif name == "succeeded":
        video = f"{base_url}/jobs/{job.job_id}/video" if job.kind == "generate" else None
        data["video_url"] = video
        if job.result is not None:
            data["result"] = job.result.model_dump(
                mode="json", exclude={"kind", "video", "record", "reserved", "parked"}
            )
    elif name == "failed":
        message = job.error or "the job failed"
        data["error"] = {"code": "job_failed", "message": message, "details": None}
    return data
