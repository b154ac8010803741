"""Runs one job by id: the body of the Celery tasks and of the embedded worker thread.

Claims the job (skips it if it is finished, cancelled or running elsewhere), does the work,
reports progress through the job store and finishes the record. Errors the user caused fail
the job with their message; anything else fails it too and is re-raised for the logs.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from memory_bank.bank import MemoryBank
from memory_bank.errors import BankError
from memory_bank.ingest import ClipIngestor
from model.errors import GenerationCancelled, ModelError
from model.generation import GenerationParams, generate
from model.pipeline import MemoryWanPipeline
from model.presets import Preset
from model.tokens import ClipTokens
from model.video_io import write_video
from service.jobs import JobRecord, JobStore, MemoryClipUsed, now
from service.metrics import LocalMetrics, MetricsSink

logger = logging.getLogger(__name__)


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    """Executes generate and ingest jobs with one loaded pipeline and bank.

    Args:
        store: Job records.
        pipe: The loaded generation pipeline (kept warm across jobs).
        preset: The pipeline's preset.
        bank: The memory bank shared with the API.
        ingestor: Adds uploads to the bank with this pipeline's encoder.
        results_dir: Where videos and their JSON records go.
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
        results_dir: Path,
        lease_s: float = 120.0,
        name: str | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.store = store
        self.pipe = pipe
        self.preset = preset
        self.bank = bank
        self.ingestor = ingestor
        self.results_dir = Path(results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.lease_s = lease_s
        self.name = name or default_worker_name()
        self.encoder_version = ingestor.encoder_version
        self.metrics = metrics or LocalMetrics()

    def run(self, job_id: str) -> str:
        """Run the job unless another delivery already did or is doing it.

        Returns:
            The job's final status, or ``"skipped (<status>)"`` when this delivery did not run it.
        """
        job = self.store.claim(job_id, self.name, self.lease_s)
        if job is None:
            current = self.store.get(job_id)
            state = current.status if current else "unknown"
            logger.info("job %s not claimed (%s): skipping this delivery", job_id, state)
            return f"skipped ({state})"
        started = time.perf_counter()
        try:
            result = self._generate(job) if job.kind == "generate" else self._ingest(job)
        except GenerationCancelled:
            return self._finish(job, started, "canceled").status
        except (ModelError, BankError, ValueError) as error:
            return self._finish(job, started, "failed", error=str(error)).status
        except Exception as error:
            self._finish(job, started, "failed", error=f"internal error: {type(error).__name__}")
            raise
        finally:
            # Per-job tensors must not pile up in a long-lived worker.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return self._finish(job, started, "succeeded", result=result).status

    def _finish(self, job: JobRecord, started: float, status: str, **fields: Any) -> JobRecord:
        self.metrics.observe("job_duration_seconds", time.perf_counter() - started)
        self.metrics.increment("jobs_finished_total", f"{job.kind}:{status}")
        if status == "failed":
            self.metrics.increment("errors_total", f"job:{job.kind}")
        if "result" in fields:
            fields["result"] = self.store.get(job.job_id).result | fields["result"]
        return self.store.update(
            job.job_id, status=status, finished_at=now(), lease_until=None, **fields
        )

    # -- generate ----------------------------------------------------------------------------------

    def _memory_for(self, job: JobRecord, prompt: str) -> tuple[ClipTokens | None, list]:
        memory = job.request.get("memory") or {}
        pinned = memory.get("clip_ids") or []
        if pinned:
            records = self.bank.store.get_many(list(pinned))
            used = [MemoryClipUsed(clip_id=r.clip_id, caption=r.caption) for r in records]
        else:
            k = memory.get("k", 5)
            if k == 0:
                return None, []
            searched = time.perf_counter()
            hits = self.bank.search(prompt, k, min_score=memory.get("min_score"))
            self.metrics.observe("retrieval_seconds", time.perf_counter() - searched)
            used = [
                MemoryClipUsed(clip_id=h.clip_id, score=h.score, caption=h.caption) for h in hits
            ]
        if not used:
            return None, []
        tokens = self.bank.clip_tokens([u.clip_id for u in used], self.encoder_version)
        return tokens, used

    def _generate(self, job: JobRecord) -> dict[str, Any]:
        params = GenerationParams.from_request(self.preset, job.request)
        tokens, used = self._memory_for(job, params.prompt)
        self.store.update(
            job.job_id, memory_used=used, total_steps=params.steps, result={"seed": params.seed}
        )

        last_step = [time.perf_counter()]

        def on_progress(step: int, total: int) -> None:
            current = time.perf_counter()
            self.metrics.observe("step_seconds", current - last_step[0])
            last_step[0] = current
            self.store.update(
                job.job_id,
                step=step,
                total_steps=total,
                progress=step / total,
                lease_until=_lease(self.lease_s),
            )

        def should_cancel() -> bool:
            current = self.store.get(job.job_id)
            return current is None or current.cancel_requested

        result = generate(
            self.pipe, self.preset, params, tokens,
            on_progress=on_progress, should_cancel=should_cancel,
        )  # fmt: skip
        video = write_video(
            result.frames,
            self.results_dir / f"{job.job_id}.mp4",
            fps=self.preset.fps,
            scale=self.preset.display_scale,
        )
        record = result.record() | {
            "job_id": job.job_id,
            "preset": self.preset.name,
            "memory": [u.model_dump() for u in used],
            "encoder_version": self.encoder_version,
        }
        record_path = self.results_dir / f"{job.job_id}.json"
        record_path.write_text(json.dumps(record, indent=2, default=str))
        return {"video": video.name, "record": record_path.name, "seed": params.seed}

    # -- ingest ------------------------------------------------------------------------------------

    def _ingest(self, job: JobRecord) -> dict[str, Any]:
        request = job.request
        upload = Path(request["upload_path"])
        try:
            outcome = self.ingestor.ingest(
                upload, request["caption"], request.get("tags") or [],
                source_name=request.get("source_name"),
            )  # fmt: skip
        finally:
            upload.unlink(missing_ok=True)
        self.store.update(job.job_id, progress=1.0)
        return {"clip_id": outcome.record.clip_id, "created": outcome.created}


def _lease(seconds: float) -> float:
    return time.time() + seconds
