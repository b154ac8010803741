"""Handing jobs to workers: Celery over Redis, or the embedded in-process worker."""

from __future__ import annotations

from typing import Protocol

from service.jobs import JobRecord


class Dispatcher(Protocol):
    def submit(self, job: JobRecord) -> None: ...

    def depth(self) -> dict[str, int]: ...


class CeleryDispatcher:
    """Sends ``ditmem.generate`` / ``ditmem.ingest`` with the job id (never the payload)."""

    def __init__(self, app, redis_client) -> None:
        from worker.celery_app import GENERATE_TASK, INGEST_TASK, QUEUES

        self.app = app
        self.redis = redis_client
        self.tasks = {"generate": GENERATE_TASK, "ingest": INGEST_TASK}
        self.queues = QUEUES

    def submit(self, job: JobRecord) -> None:
        task = self.tasks[job.kind]
        self.app.send_task(task, args=[job.job_id], queue=self.queues[task])

    def depth(self) -> dict[str, int]:
        # Kombu keeps each Redis queue as a list named after it.
        return {queue: int(self.redis.llen(queue)) for queue in self.queues.values()}


class EmbeddedDispatcher:
    def __init__(self, worker) -> None:
        self.worker = worker

    def submit(self, job: JobRecord) -> None:
        self.worker.submit(job.job_id)

    def depth(self) -> dict[str, int]:
        return {"embedded": self.worker.depth()}
