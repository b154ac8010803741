"""The composition root: the one place that wires the HTTP service, the workers and the shared
runtime into what ``ditmem serve``, ``ditmem worker`` and ``ditmem demo`` run.

* Celery mode (``DITMEM_REDIS_URL`` set): the API records jobs in Redis and sends tasks; each
  ``ditmem worker`` process loads the model once and serves them.
* Embedded mode (no Redis): the API process also runs the model, on one worker thread fed by an
  in-memory job store: the same :class:`~worker.runner.JobRunner` as a Celery worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from memory_bank.bank import MemoryBank
from model.presets import get_preset
from runtime.builders import (
    Storages,
    build_ingestor,
    load_pipeline_from,
    open_bank,
    open_storages,
)
from runtime.celery_app import make_celery
from runtime.dispatch import CeleryDispatcher, EmbeddedDispatcher
from runtime.idempotency import MemoryIdempotencyKeys, RedisIdempotencyKeys
from runtime.jobs import JobStore, MemoryJobStore, RedisJobStore
from runtime.metrics import LocalMetrics, MetricsSink, RedisMetrics
from runtime.reaper import LeaseReaper
from runtime.settings import Settings
from runtime.uploads import sweep_uploads
from runtime.webhooks import WebhookSender
from service.app import create_app
from service.state import AppState
from worker.embedded import EmbeddedWorker
from worker.main import serve_tasks
from worker.runner import JobRunner, default_worker_name

logger = logging.getLogger(__name__)


def build_runner(
    settings: Settings,
    store: JobStore,
    metrics: MetricsSink,
    bank: MemoryBank,
    storages: Storages,
    name: str,
) -> JobRunner:
    """Load the pipeline here, in the process that runs jobs (a worker is never forked)."""
    pipe = load_pipeline_from(settings)
    ingestor = build_ingestor(settings, bank, pipe)
    # A new encoder makes every cached token stale: recompute them before serving jobs.
    outcome = ingestor.refresh_tokens()
    if outcome.updated or outcome.unrecoverable:
        logger.warning(
            "encoder %s: recomputed tokens of %d clips; %d clips keep no latent or source and "
            "cannot be used as memory: %s",
            ingestor.encoder_version, len(outcome.updated), len(outcome.unrecoverable),
            outcome.unrecoverable[:20],
        )  # fmt: skip
    return JobRunner(
        store,
        pipe,
        get_preset(settings.preset),
        bank,
        ingestor,
        results=storages.results,
        uploads=storages.uploads,
        imports=storages.imports,
        # Private to this process: videos are written here, then stored.
        scratch_dir=settings.results_dir / ".work",
        lease_s=settings.job_lease_s,
        name=name,
        metrics=metrics,
    )


def _webhook_sender(store: JobStore, settings: Settings) -> list[Callable[[], None]]:
    """The outbox's sender of this API process (none without a signing secret)."""
    if settings.webhook_secret is None:
        return []
    return [WebhookSender(store, settings).start().stop]


def build_api_state(settings: Settings) -> AppState:
    """Job store, dispatcher, bank and metrics of the API process (and, embedded, its worker)."""
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    storages = open_storages(settings)
    bank = open_bank(settings, storages)
    if settings.redis_url:
        store = RedisJobStore(settings.redis_url)
        sweep_uploads(storages.uploads, store, settings.uploads_dir)
        dispatcher = CeleryDispatcher(make_celery(settings), store.redis)
        # Also here, not only in workers: jobs of a fleet whose last worker died are requeued.
        reaper = LeaseReaper(store, dispatcher).start()
        return AppState(
            settings=settings,
            store=store,
            dispatcher=dispatcher,
            bank=bank,
            storages=storages,
            mode="celery",
            metrics=RedisMetrics(store.redis),
            workers_ready=lambda: len(store.workers_ready()),
            idempotency=RedisIdempotencyKeys(store.redis),
            closers=[reaper.stop, *_webhook_sender(store, settings)],
        )
    memory_store, metrics = MemoryJobStore(), LocalMetrics()
    # Embedded jobs live in this process: every upload left by an earlier one is an orphan.
    sweep_uploads(storages.uploads, memory_store, settings.uploads_dir)
    runner = build_runner(settings, memory_store, metrics, bank, storages, "embedded")
    worker = EmbeddedWorker(runner)
    runner.dispatcher = dispatcher = EmbeddedDispatcher(worker)
    return AppState(
        settings=settings,
        store=memory_store,
        dispatcher=dispatcher,
        bank=bank,
        storages=storages,
        mode="embedded",
        metrics=metrics,
        workers_ready=lambda: 1,
        idempotency=MemoryIdempotencyKeys(),
        # The worker first: its last job's webhook is due by the time the sender stops.
        closers=[worker.stop, *_webhook_sender(memory_store, settings)],
    )


def build_app(settings: Settings) -> FastAPI:
    """The API as ``ditmem serve`` runs it for these settings."""
    return create_app(settings, build_api_state)


def serve(settings: Settings) -> None:
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info")


def run_worker(settings: Settings, queues: str = "generate,ingest") -> None:
    """``ditmem worker``: a Celery worker process with its own model, bank and runner."""
    store = RedisJobStore(settings.redis_url)
    name = settings.worker_name or default_worker_name()
    storages = open_storages(settings)
    bank = open_bank(settings, storages)
    runner = build_runner(settings, store, RedisMetrics(store.redis), bank, storages, name)
    serve_tasks(settings, runner, store, queues)
