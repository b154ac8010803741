"""Handing jobs to workers: Celery tasks over Redis, or a queue in this process (embedded)."""

from __future__ import annotations

from typing import Protocol

import redis
from celery import Celery

from runtime.celery_app import QUEUES, TASKS
from runtime.jobs import JobRecord


class Dispatcher(Protocol):
    def submit(self, job: JobRecord) -> None: ...

    def depth(self) -> dict[str, int]: ...


class CeleryDispatcher:
    """Sends ``ditmem.generate`` / ``ditmem.ingest`` with the job id (never the payload)."""

    def __init__(self, app: Celery, client: redis.Redis) -> None:
        self.app = app
        self.redis = client

    def submit(self, job: JobRecord) -> None:
        task = TASKS[job.kind]
        self.app.send_task(task, args=[job.job_id], queue=QUEUES[task])

    def depth(self) -> dict[str, int]:
        # Kombu keeps each Redis queue as a list named after it.
        return {queue: int(self.redis.llen(queue)) for queue in sorted(set(QUEUES.values()))}


class JobQueue(Protocol):
    """What runs job ids in this process (the embedded worker thread)."""

    def submit(self, job_id: str) -> None: ...

    def depth(self) -> int: ...


class EmbeddedDispatcher:
    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def submit(self, job: JobRecord) -> None:
        self.queue.submit(job.job_id)

    def depth(self) -> dict[str, int]:
        return {"embedded": self.queue.depth()}
