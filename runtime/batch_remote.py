"""Runs a batch plan on a ditmem service, so every worker of the fleet works on it at once.

A bounded number of jobs is kept in flight (``POST /generate``, each with its planned seed);
each job's event stream (``GET /jobs/{id}/events``) says when it is done, and its video is
downloaded then and placed as ``runtime.batch_runner`` places its own
(``runtime.batch_outputs``); a stream that keeps failing gives way to polling that job. The
service's per-key queue bound answers 429 with ``Retry-After``: the client then waits that
long and keeps fewer jobs in flight. Ctrl-C cancels the jobs in flight; what was placed stays,
and running the batch again resumes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from runtime.batch import PlannedVideo
from runtime.batch_outputs import (
    BatchFolder,
    BatchOptions,
    BatchSummary,
    describe,
    is_done,
    progress_bar,
    show,
)

logger = logging.getLogger(__name__)

FINISHED = frozenset({"succeeded", "failed", "canceled"})
MAX_WAIT_S = 30.0  # the longest Retry-After honoured as it is
STREAM_FAILURES_BEFORE_POLLING = 3


class ServerError(RuntimeError):
    """The service cannot run the batch (unreachable, refuses the key, gone for too long)."""


@dataclass(frozen=True)
class ServerOptions:
    url: str
    api_key: str | None = None
    in_flight: int = 8
    poll_s: float = 0.2
    # How long the service may stay unreachable mid-batch before the batch stops (resumable).
    patience_s: float = 120.0
    timeout_s: float = 60.0


@dataclass
class _InFlight:
    number: int
    video: PlannedVideo
    job_id: str
    started: float


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return min(float(response.headers.get("Retry-After", default)), MAX_WAIT_S)
    except ValueError:
        return default


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


class BatchOnServer:
    """One batch run against one service; :meth:`run` drives it to the end."""

    def __init__(self, options: ServerOptions, client: httpx.Client | None = None) -> None:
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.options = options
        self.client = client or httpx.Client(
            base_url=options.url.rstrip("/"),
            headers=headers,
            timeout=options.timeout_s,
            follow_redirects=True,  # presigned downloads; httpx drops the key on another host
        )
        self.preset: str | None = None
        self._closing = threading.Event()  # ends the followers of a batch that stopped
        self._batch = BatchOptions()
        self._unreachable_since: float | None = None

    # -- HTTP with the service's failure modes -------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """The response, or ``None`` while the service is briefly unreachable (then retried)."""
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as error:
            return self._unreachable(str(error) or type(error).__name__)
        if response.status_code == 503:  # job store down: the service says when to come back
            return self._unreachable(_error_message(response), _retry_after(response, 2.0))
        if response.status_code in (401, 403):
            raise ServerError(f"the service refused the API key ({_error_message(response)})")
        self._unreachable_since = None
        return response

    def _unreachable(self, why: str, wait_s: float = 1.0) -> None:
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
            logger.warning("the service is unreachable (%s); retrying", why)
        if now - self._unreachable_since > self.options.patience_s:
            raise ServerError(
                f"the service at {self.options.url} was unreachable for "
                f"{self.options.patience_s:.0f} s ({why}); run the batch again to resume"
            )
        time.sleep(wait_s)
        return None

    def check(self) -> str:
        """The service's preset; fails at once if nothing answers at the URL."""
        try:
            response = self.client.get("/readyz")
        except httpx.TransportError as error:
            raise ServerError(f"no ditmem service at {self.options.url}: {error}") from None
        try:
            checks = response.json().get("checks", {})
        except ValueError:
            raise ServerError(f"{self.options.url} is not a ditmem service") from None
        if response.status_code != 200:
            logger.warning("the service is not ready yet (%s); jobs wait in its queue",
                           ", ".join(response.json().get("failing", [])))  # fmt: skip
        self.preset = str(checks.get("preset", "unknown"))
        return self.preset

    # -- the batch ------------------------------------------------------------------------------

    def run(
        self,
        planned: list[PlannedVideo],
        out: Path,
        options: BatchOptions,
        *,
        progress: bool = True,
    ) -> BatchSummary:
        began = time.perf_counter()
        self._batch = options
        summary = BatchSummary()
        folder = BatchFolder(out)
        waiting = deque(enumerate(folder.pending(planned, summary)))
        if not waiting:
            return summary
        if self.preset is None:
            self.check()
        bar = progress_bar(len(planned), summary.skipped, progress)
        flying: list[_InFlight] = []
        finished: queue.Queue[_InFlight] = queue.Queue()
        window = max(1, self.options.in_flight)
        hold_until = 0.0
        first_started = time.perf_counter()
        self._closing.clear()
        with folder:
            try:
                while waiting or flying:
                    while waiting and len(flying) < window and time.monotonic() >= hold_until:
                        number, video = waiting[0]
                        outcome = self._submit(video)
                        if isinstance(outcome, str):
                            waiting.popleft()
                            job = _InFlight(number, video, outcome, time.perf_counter())
                            flying.append(job)
                            self._follow(job, finished)
                        elif isinstance(outcome, float):
                            # The queue bound: keep what is in flight, wait, and aim lower.
                            window = max(1, len(flying))
                            hold_until = time.monotonic() + outcome
                        elif outcome is not None:
                            waiting.popleft()
                            self._failed(folder, summary, video, outcome, time.perf_counter())
                            bar.update()
                    try:
                        job = finished.get(timeout=self.options.poll_s)
                    except queue.Empty:
                        job = None
                    if job is not None:
                        if self._settle(folder, summary, job) is None:
                            flying.remove(job)
                            bar.update()
                            show(bar, summary)
                        else:  # not downloadable yet (the service away a moment): again
                            self._follow(job, finished)
                    if time.monotonic() >= hold_until and window < self.options.in_flight:
                        window += 1  # room again: grow back one job per round
            except BaseException:
                self._closing.set()
                self._cancel(flying)
                raise
            finally:
                self._closing.set()
                bar.close()
        summary.making_s = time.perf_counter() - first_started
        summary.seconds = time.perf_counter() - began
        return summary

    def _follow(self, job: _InFlight, finished: queue.Queue[_InFlight]) -> None:
        """Wait on a thread of its own for the job's final event, then hand the job over."""
        thread = threading.Thread(target=self._await_final, args=(job, finished),
                                  name=f"follow-{job.job_id[:8]}", daemon=True)  # fmt: skip
        thread.start()

    def _await_final(self, job: _InFlight, finished: queue.Queue[_InFlight]) -> None:
        """The job's event stream until a final event (resumed with ``Last-Event-ID`` when it
        drops); a stream that keeps failing gives way to polling the job."""
        last_id: str | None = None
        failures = 0
        path = f"/jobs/{job.job_id}/events?events=succeeded,failed,canceled"  # the end only
        # Idle streams carry a keep-alive comment every 15 s: a minute of silence is a dead one.
        timeout = httpx.Timeout(self.options.timeout_s, read=60.0)
        while not self._closing.is_set() and failures < STREAM_FAILURES_BEFORE_POLLING:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(self.client, "GET", path, headers=headers,
                                 timeout=timeout) as source:  # fmt: skip
                    if source.response.status_code != 200:
                        break  # gone, or no stream here: the record decides
                    for event in source.iter_sse():
                        if not event.data:
                            continue
                        failures, last_id = 0, event.id or last_id
                        if event.event in FINISHED:
                            finished.put(job)
                            return
            except (httpx.HTTPError, SSEError):
                failures += 1
                self._closing.wait(0.5 * failures)
        while not self._closing.is_set():  # polling: one request per job per poll_s
            try:
                response = self.client.get(f"/jobs/{job.job_id}")
                if response.status_code == 404 or response.json().get("status") in FINISHED:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            self._closing.wait(self.options.poll_s)
        if not self._closing.is_set():
            finished.put(job)

    def _submit(self, video: PlannedVideo) -> str | float | tuple[str] | None:
        """A job id; seconds to wait (429); ``(reason,)`` for a refused video; ``None``: retry."""
        response = self._request("POST", "/generate", json=self._batch.request_body(video))
        if response is None:
            return None
        if response.status_code == 202:
            return str(response.json()["id"])
        if response.status_code == 429:
            return _retry_after(response, 5.0)
        return (_error_message(response),)

    def _settle(self, folder: BatchFolder, summary: BatchSummary, job: _InFlight) -> str | None:
        """Check one job; place and record it once finished.

        Returns ``None`` when it is done with, else its status (``"unknown"``: not reachable).
        """
        response = self._request("GET", f"/jobs/{job.job_id}")
        if response is None:
            return "unknown"
        if response.status_code == 404:
            self._failed(folder, summary, job.video, ("the job is gone from the service",),
                         job.started, job.job_id)  # fmt: skip
            return None
        record = response.json()
        if record["status"] not in FINISHED:
            return str(record["status"])
        if record["status"] != "succeeded":
            reason = record.get("error") or f"the job was {record['status']} on the service"
            self._failed(folder, summary, job.video, (reason,), job.started, job.job_id)
            return None
        scratch = folder.scratch(job.number)
        if not self._download(record["links"]["video"], scratch):
            return "unknown"
        if not is_done(scratch):
            self._failed(folder, summary, job.video, ("the downloaded video does not decode",),
                         job.started, job.job_id)  # fmt: skip
            return None
        folder.place(scratch, job.video)
        line = describe(job.video) | {
            "status": "succeeded",
            "preset": self.preset,
            "params": record["params"],
            "memory": record["memory_used"],
            "job_id": job.job_id,
            "server": self.options.url,
            "queued_s": _seconds_between(record["created_at"], record["started_at"]),
            "run_s": _seconds_between(record["started_at"], record["finished_at"]),
        }
        summary.made += 1
        folder.record(line, job.started, time.perf_counter())
        return None

    def _download(self, link: str, target: Path) -> bool:
        try:
            with self.client.stream("GET", link) as response:
                if response.status_code != 200:
                    response.read()
                    self._unreachable(_error_message(response))
                    return False
                with open(target, "wb") as handle:
                    for chunk in response.iter_bytes(1 << 20):
                        handle.write(chunk)
        except httpx.TransportError as error:
            self._unreachable(str(error) or type(error).__name__)
            return False
        return True

    def _failed(self, folder: BatchFolder, summary: BatchSummary, video: PlannedVideo,
                reason: tuple[str], started: float, job_id: str | None = None) -> None:  # fmt: skip
        line = describe(video) | {"status": "failed", "error": reason[0], "job_id": job_id}
        summary.failures.append((video.output, reason[0]))
        folder.record(line, started, time.perf_counter())

    def _cancel(self, flying: list[_InFlight]) -> None:
        """Best effort: jobs nobody will download should not keep a GPU busy."""
        for job in flying:
            with contextlib.suppress(httpx.HTTPError):
                self.client.delete(f"/jobs/{job.job_id}", timeout=5)


def run_batch_on_server(
    server: ServerOptions,
    planned: list[PlannedVideo],
    out: Path,
    options: BatchOptions,
    *,
    progress: bool = True,
) -> BatchSummary:
    """Make every planned video not yet in ``out`` on the service at ``server.url``."""
    runner = BatchOnServer(server)
    try:
        return runner.run(planned, out, options, progress=progress)
    finally:
        runner.client.close()
