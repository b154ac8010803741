"""Requeues jobs whose worker died: a running job whose lease ran out goes back to the queue.

A worker renews its job's lease with every progress report. One that is SIGKILLed, frozen or
cut off stops renewing; Celery would hand its task back only after the visibility timeout
(hours, since it must exceed the longest job). The reaper, running in the API and in every
worker, notices within ``interval_s`` of the lease's end instead. Requeueing is one atomic
store transition, so with several reapers exactly one sends the job again; the abandoned attempt
can write nothing afterwards, since every write of an attempt checks that it still holds the job.
"""

from __future__ import annotations

import logging
import threading

from runtime.dispatch import Dispatcher
from runtime.jobs import JobStore

logger = logging.getLogger(__name__)


class LeaseReaper:
    def __init__(self, store: JobStore, dispatcher: Dispatcher, interval_s: float = 5.0) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reap_once(self) -> list[str]:
        """Requeue every abandoned job now; returns their ids."""
        requeued = []
        for job in self.store.running():
            again = self.store.requeue_if_abandoned(job.job_id)
            if again is not None:
                self.dispatcher.submit(again)
                logger.warning(
                    "job %s: worker %s stopped renewing its lease; requeued", job.job_id, job.worker
                )
                requeued.append(job.job_id)
        return requeued

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reap_once()
            except Exception as error:  # the store may be unreachable a while: try again later
                logger.warning("lease reaper round failed: %s", error)

    def start(self) -> LeaseReaper:
        self._thread = threading.Thread(target=self._loop, name="ditmem-reaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
