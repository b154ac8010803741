"""Runs one job by id: the body of the Celery tasks and of the embedded worker thread.

Claims the job (skips it if it is finished, cancelled or running elsewhere), runs its spec,
reports progress through the job store and finishes the record. Errors the user caused fail
the job with their message; anything else fails it too and is re-raised for the logs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from memory_bank.bank import MemoryBank
from memory_bank.errors import BankError, ClipRejected
from memory_bank.ingest import ClipIngestor
from memory_bank.storage import ObjectMissing, ObjectStorage, describe_disk_error
from model.errors import GenerationCancelled, ModelError
from model.pipeline import MemoryWanPipeline
from model.presets import Preset
from model.previews import LatentPreviewer
from runtime.dispatch import Dispatcher
from runtime.generation import run_generation
from runtime.imports import ImportDriver
from runtime.jobs import (
    FinalStatus,
    GenerateResult,
    GenerateSpec,
    ImportSpec,
    IngestResult,
    IngestSpec,
    JobRecord,
    JobResult,
    JobStore,
    OutdatedJobRecord,
    preview_key,
)
from runtime.metrics import LocalMetrics, MetricsSink
from worker.previews import PreviewPublisher

logger = logging.getLogger(__name__)

GC_INTERVAL_S = 10.0  # at least this long between two full garbage collections


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ClaimLost(Exception):
    """Another attempt took this job over (our lease expired): stop without writing more."""


class JobRunner:
    """Executes generate and ingest jobs with one loaded pipeline and bank.

    Args:
        store: Job records.
        pipe: The loaded generation pipeline (kept warm across jobs).
        preset: The pipeline's preset.
        bank: The memory bank shared with the API.
        ingestor: Adds uploads to the bank with this pipeline's encoder.
        results: Where videos and their JSON records go (a folder or a bucket).
        uploads: Where the uploads of ingest jobs wait.
        imports: Where datasets of import jobs are (read only).
        dispatcher: Hands jobs to workers; import jobs send their rows through it (embedded:
            set once the worker thread exists).
        scratch_dir: A private local folder where a video is written before it is stored.
        lease_s: How long a claim lasts without a progress report.
        name: This worker's name in job records.
    """

    def __init__(
        self,
        store: JobStore,
        pipe: MemoryWanPipeline,
        preset: Preset,
        bank: MemoryBank,
        ingestor: ClipIngestor,
        results: ObjectStorage,
        uploads: ObjectStorage,
        scratch_dir: Path,
        lease_s: float = 120.0,
        name: str | None = None,
        metrics: MetricsSink | None = None,
        imports: ObjectStorage | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.store = store
        self.pipe = pipe
        self.preset = preset
        self.bank = bank
        self.ingestor = ingestor
        self.results = results
        self.uploads = uploads
        self.imports = imports
        self.dispatcher = dispatcher
        self._imports_driver: ImportDriver | None = None
        self.scratch_dir = Path(scratch_dir)
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.lease_s = lease_s
        self.name = name or default_worker_name()
        self.encoder_version = ingestor.encoder_version
        self.metrics = metrics or LocalMetrics()
        self._collected_at = -GC_INTERVAL_S  # the first job collects
        self._previewer: LatentPreviewer | None = None

    def run(self, job_id: str) -> str:
        """Run the job unless another delivery already did or is doing it.

        Returns:
            The job's final status, or ``"skipped (<why>)"`` when this delivery did not run it.
        """
        try:
            job = self.store.claim(job_id, self.name, self.lease_s)
            if job is None:
                current = self.store.get(job_id)
                state = current.status if current else "unknown"
        except OutdatedJobRecord as error:
            job, state = None, "outdated"
            logger.warning("%s", error)
        if job is None:
            logger.info("job %s not claimed (%s): skipping this delivery", job_id, state)
            return f"skipped ({state})"
        started = time.perf_counter()
        if isinstance(job.spec, ImportSpec):
            return self._advance_import(job)
        try:
            result = self._run_spec(job)
        except ClaimLost:
            logger.warning("job %s: attempt %d lost its claim; dropping it", job_id, job.attempts)
            return "skipped (claim lost)"
        except GenerationCancelled:
            return self._finish(job, started, "canceled")
        except (ModelError, BankError, ValueError) as error:
            return self._finish(job, started, "failed", error=str(error))
        except OSError as error:  # a full or read-only disk: the operator's to fix, not a bug
            logger.error("job %s: %s", job_id, error)
            return self._finish(job, started, "failed", error=describe_disk_error(error))
        except Exception as error:
            self._finish(job, started, "failed", error=f"internal error: {type(error).__name__}")
            raise
        finally:
            if job.kind == "generate":
                self._collect_garbage()
        return self._finish(job, started, "succeeded", result=result)

    def _collect_garbage(self) -> None:
        """A video's tensors must not pile up in a long-lived worker, but a full collection
        costs ~0.25 s with the model loaded: nothing next to a 1.3B video, most of a toy one
        (or of a small clip's ingest, whose few tensors reference counting frees anyway). So
        at most one per ``GC_INTERVAL_S`` of work: what piles up meanwhile is bounded by a
        few videos' worth."""
        now = time.monotonic()
        if now - self._collected_at < GC_INTERVAL_S:
            return
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._collected_at = time.monotonic()

    def _run_spec(self, job: JobRecord) -> JobResult:
        if isinstance(job.spec, GenerateSpec):
            return self._generate(job, job.spec)
        assert isinstance(job.spec, IngestSpec)
        with self._lease_kept(job):
            return self._ingest(job.spec, job.spec.uploader or job.owner)

    @contextmanager
    def _lease_kept(self, job: JobRecord) -> Iterator[None]:
        """Renew the lease of a job that reports no steps while it runs (a long video's ingest
        must not look abandoned to the reaper)."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    if not self.store.renew_lease(job.job_id, job.attempts, self.lease_s):
                        return  # taken over: its finish will be refused
                except Exception as error:  # the store away for a moment: try again
                    logger.warning("job %s: lease not renewed: %s", job.job_id, error)

        thread = threading.Thread(target=renew, name=f"lease-{job.job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _import_driver(self) -> ImportDriver:
        if self.dispatcher is None or self.imports is None:
            raise RuntimeError("this runner has no dispatcher or imports storage for imports")
        if self._imports_driver is None:
            self._imports_driver = ImportDriver(self.store, self.dispatcher, self.imports)
        return self._imports_driver

    def _advance_import(self, job: JobRecord) -> str:
        """Send the import's next rows; it stays running (parked) until they finish."""
        try:
            state = self._import_driver().advance(job)
        except (BankError, ValueError) as error:  # no captions file, a malformed line, ...
            return self._finish(job, time.perf_counter(), "failed", error=str(error))
        if state is None:
            return "skipped (claim lost)"
        if state.finished:
            self.metrics.increment("jobs_finished_total", f"import:{state.status}")
        return state.status

    def _finish(
        self,
        job: JobRecord,
        started: float,
        status: FinalStatus,
        *,
        result: JobResult | None = None,
        error: str | None = None,
    ) -> str:
        finished = self.store.finish(job.job_id, job.attempts, status, result=result, error=error)
        if finished is None:  # another attempt owns the job now: its outcome counts, not ours
            logger.warning("job %s: attempt %d lost its claim before finishing", job.job_id,
                           job.attempts)  # fmt: skip
            if isinstance(result, GenerateResult):  # this attempt's own files, named by it
                self.results.delete(result.video)
                self.results.delete(result.record)
            return "skipped (claim lost)"
        seconds = time.perf_counter() - started
        self.metrics.observe("job_duration_seconds", seconds)
        if status == "succeeded" and job.kind == "generate" and job.total_steps:
            try:  # the basis of queued jobs' start estimates; losing a sample loses nothing
                self.store.record_step_seconds(seconds / job.total_steps)
            except Exception as error:
                logger.warning("job %s: step time not recorded: %s", job.job_id, error)
        self.metrics.increment("jobs_finished_total", f"{job.kind}:{status}")
        if status == "failed":
            self.metrics.increment("errors_total", f"job:{job.kind}")
        if isinstance(job.spec, IngestSpec) and job.spec.parent is not None:
            self._import_driver().row_finished(finished)
        return finished.status

    # -- generate ----------------------------------------------------------------------------------

    def _previews(self, job: JobRecord, spec: GenerateSpec) -> PreviewPublisher | None:
        if not spec.preview_every:
            return None
        if self._previewer is None:  # fitted once per worker, at the first job that asks
            try:
                self._previewer = LatentPreviewer.for_vae(self.pipe.vae)
            except Exception as error:  # a preview is a nicety: the video goes on without
                logger.warning("job %s: no live previews (%s)", job.job_id, error)
                return None
        key = preview_key(job.job_id, job.attempts)
        return PreviewPublisher(self._previewer, self.results, key)

    def _generate(self, job: JobRecord, spec: GenerateSpec) -> GenerateResult:
        last_step = time.perf_counter()
        cancel = False
        previews = self._previews(job, spec)

        def on_progress(step: int, total: int) -> None:
            nonlocal last_step, cancel
            current = time.perf_counter()
            self.metrics.observe("step_seconds", current - last_step)
            last_step = current
            shown = previews.stored_step if previews is not None else None
            reply = self.store.report_progress(
                job.job_id, job.attempts, step, total, self.lease_s, preview_step=shown
            )
            if reply == "lost":
                raise ClaimLost(job.job_id)
            cancel = reply == "cancel"

        with contextlib.ExitStack() as running:
            if previews is not None:
                running.enter_context(previews)
            return self._make_video(job, spec, on_progress, lambda: cancel, previews)

    def _make_video(
        self,
        job: JobRecord,
        spec: GenerateSpec,
        on_progress: Callable[[int, int], None],
        should_cancel: Callable[[], bool],
        previews: PreviewPublisher | None,
    ) -> GenerateResult:
        with tempfile.TemporaryDirectory(dir=self.scratch_dir) as scratch:
            output = run_generation(
                self.pipe,
                self.preset,
                spec,
                Path(scratch) / f"{job.job_id}.mp4",
                bank=self.bank,
                encoder_version=self.encoder_version,
                job_id=job.job_id,
                on_progress=on_progress,
                # The progress report of each step already brought the cancel flag back.
                should_cancel=should_cancel,
                on_latents=previews.offer if previews is not None else None,
            )
            # Named by attempt: an attempt that lost its claim (a worker frozen past its lease)
            # can never overwrite the files of the attempt that owns the job. The record after
            # the video: a record never names a video that is not stored.
            name = f"{job.job_id}-a{job.attempts}"
            result = GenerateResult(video=f"{name}.mp4", record=f"{name}.json")
            try:
                self.results.put_file(result.video, output.video, move=True)
                self.results.put_file(result.record, output.record_path, move=True)
            except BaseException:  # a video without its record is never left behind
                self.results.delete(result.video)
                raise
        return result

    # -- ingest ------------------------------------------------------------------------------------

    def _ingest(self, spec: IngestSpec, owner: str) -> IngestResult:
        imported = spec.storage == "imports"  # a dataset's file: read, never removed
        storage = self.imports if imported else self.uploads
        if storage is None:
            raise RuntimeError("this runner has no imports storage")
        name = spec.source_name or spec.upload_key
        try:
            with storage.local_copy(spec.upload_key) as path:
                try:
                    outcome = self.ingestor.ingest(
                        path, spec.caption, list(spec.tags), source_name=spec.source_name,
                        owner=owner,
                    )  # fmt: skip
                except ClipRejected as error:
                    # The user knows the file by its name, not by where it waits here.
                    message = str(error).replace(str(path), name).replace(path.name, name)
                    raise ClipRejected(message) from None
        except ObjectMissing:
            raise ClipRejected(f"{name}: no such file") from None
        finally:
            if not imported:
                self.uploads.delete(spec.upload_key)
        return IngestResult(clip_id=outcome.record.clip_id, created=outcome.created)
