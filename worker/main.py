"""``ditmem worker``: load the model once in this process, then serve Celery tasks."""

from __future__ import annotations

import logging
import threading

from service.jobs import RedisJobStore
from service.runtime import build_ingestor, load_pipeline_from, open_bank
from service.settings import Settings
from worker.celery_app import make_celery
from worker.runner import JobRunner, default_worker_name
from worker.tasks import register_tasks

logger = logging.getLogger(__name__)

HEARTBEAT_S = 20.0


def build_runner(settings: Settings, store: RedisJobStore) -> JobRunner:
    """Pipeline, bank and ingestor built here, in the worker process itself (never forked)."""
    from model.presets import get_preset
    from service.metrics import RedisMetrics

    pipe = load_pipeline_from(settings)
    bank = open_bank(settings)
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
        settings.results_dir,
        lease_s=settings.job_lease_s,
        name=settings.worker_name or default_worker_name(),
        metrics=RedisMetrics(store.redis),
    )


def run_worker(settings: Settings, queues: str = "generate,ingest") -> None:
    """Serve tasks with the solo pool: one job at a time, model warm, CUDA never forked."""
    store = RedisJobStore(settings.redis_url)
    runner = build_runner(settings, store)
    app = make_celery(settings)
    register_tasks(app, runner)

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            store.announce_worker(runner.name)

    store.announce_worker(runner.name)
    threading.Thread(target=heartbeat, name="ditmem-heartbeat", daemon=True).start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--prefetch-multiplier=1",
                f"--queues={queues}",
                f"--hostname={runner.name.replace(':', '-')}@%h",
                "--without-gossip",
                "--without-mingle",
                f"--loglevel={settings.log_level}",
            ]
        )
    finally:
        stop.set()
        store.retire_worker(runner.name)  # readiness must not count a worker that has stopped
        runner.bank.close()
