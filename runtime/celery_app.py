"""The Celery application: Redis broker and result backend, GPU-friendly worker settings.

Shared by the API (which sends tasks) and the workers (which register and serve them).
"""

from __future__ import annotations

from celery import Celery

from runtime.settings import Settings

GENERATE_TASK = "ditmem.generate"
INGEST_TASK = "ditmem.ingest"
IMPORT_TASK = "ditmem.import"  # sends an import's next rows: short, beside the ingests
TASKS = {"generate": GENERATE_TASK, "ingest": INGEST_TASK, "import": IMPORT_TASK}  # by kind
QUEUES = {GENERATE_TASK: "generate", INGEST_TASK: "ingest", IMPORT_TASK: "ingest"}


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings; tasks are registered by ``worker.tasks``."""
    if not settings.redis_url:
        raise ValueError("DITMEM_REDIS_URL is required for Celery (unset: embedded mode)")
    app = Celery("ditmem", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        # A job is acknowledged only once it has run, and a worker that dies mid-job hands
        # its task back: the job record (claims, leases) keeps a redelivery from running twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # unacked_restore_throttle: check for tasks of dead workers every second, not every
        # ~100 s, so a job of a killed worker is back in the queue right after the timeout.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_routes={name: {"queue": queue} for name, queue in QUEUES.items()},
        task_default_queue="generate",
        task_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
