"""Embedded mode: jobs run on a thread of the API process, with the same runner and records."""

from __future__ import annotations

import logging
import queue
import threading

from worker.runner import JobRunner

logger = logging.getLogger(__name__)


class EmbeddedWorker:
    """One background thread that runs submitted job ids in order."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ditmem-worker", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def depth(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            if self._stopping.is_set():
                continue  # shutting down: the process and its in-memory jobs are going away
            try:
                self.runner.run(job_id)
            except Exception:  # the record is already marked failed; keep serving
                logger.exception("job %s failed", job_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job, drop the queued ones, and end the thread."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
