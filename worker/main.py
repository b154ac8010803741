"""The Celery side of ``ditmem worker``: serve tasks with a runner whose model is already loaded."""

from __future__ import annotations

import threading

from runtime.celery_app import make_celery
from runtime.dispatch import CeleryDispatcher
from runtime.jobs import HEARTBEAT_S, RedisJobStore
from runtime.reaper import LeaseReaper
from runtime.settings import Settings
from worker.runner import JobRunner
from worker.tasks import register_tasks


def serve_tasks(
    settings: Settings, runner: JobRunner, store: RedisJobStore, queues: str = "generate,ingest"
) -> None:
    """Serve tasks with the solo pool: one job at a time, model warm, CUDA never forked.

    The worker announces itself (readiness counts it) every ``HEARTBEAT_S`` until it stops.
    """
    app = make_celery(settings)
    register_tasks(app, runner)
    # Import jobs send their rows as tasks from the worker that runs them.
    runner.dispatcher = CeleryDispatcher(app, store.redis)
    reaper = LeaseReaper(store, runner.dispatcher).start()

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
        reaper.stop()
        store.retire_worker(runner.name)  # readiness must not count a worker that has stopped
        runner.bank.close()
