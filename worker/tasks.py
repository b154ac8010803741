"""Celery tasks: thin wrappers that pass a job id to the worker's :class:`JobRunner`."""

from __future__ import annotations

from celery import Celery, Task

from runtime.celery_app import GENERATE_TASK, IMPORT_TASK, INGEST_TASK
from worker.runner import JobRunner


def register_tasks(app: Celery, runner: JobRunner) -> None:
    """Bind the tasks to one runner (one loaded pipeline per worker process)."""

    @app.task(name=GENERATE_TASK, bind=True)
    def generate_video(self: Task, job_id: str) -> str:
        return runner.run(job_id)

    @app.task(name=INGEST_TASK, bind=True)
    def ingest_clip(self: Task, job_id: str) -> str:
        return runner.run(job_id)

    @app.task(name=IMPORT_TASK, bind=True)
    def advance_import(self: Task, job_id: str) -> str:
        return runner.run(job_id)
