"""The job runner with an in-memory job store: claims, redelivery, failures, memory over jobs."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pytest

from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.embed import SentenceTransformerEmbedder
from memory_bank.ingest import ClipIngestor
from model.pipeline import MemoryWanPipeline
from model.presets import TINY
from model.tiny import build_tiny_components
from service.jobs import JobRecord, MemoryJobStore
from tests.media import moving_square, write_clip
from worker.runner import JobRunner


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    pipe = MemoryWanPipeline(**build_tiny_components(0))
    pipe.set_progress_bar_config(disable=True)
    bank = MemoryBank(root / "bank", SentenceTransformerEmbedder(), BankOptions())
    yield root, pipe, bank
    bank.close()


@pytest.fixture
def runner(parts) -> JobRunner:
    root, pipe, bank = parts
    store = MemoryJobStore()
    return JobRunner(store, pipe, TINY, bank, ClipIngestor(bank, pipe, TINY), root / "results")


def generate_job(runner: JobRunner, **request) -> str:
    job = JobRecord(kind="generate", owner="test", request={"prompt": "a ball", **request})
    return runner.store.create(job).job_id


def test_a_job_runs_once_and_a_second_delivery_is_skipped(runner):
    job_id = generate_job(runner, memory={"k": 0})
    assert runner.run(job_id) == "succeeded"
    video = runner.results_dir / f"{job_id}.mp4"
    stamp = video.stat().st_mtime_ns

    assert runner.run(job_id) == "skipped (succeeded)"
    job = runner.store.get(job_id)
    assert job.attempts == 1 and video.stat().st_mtime_ns == stamp
    assert (runner.results_dir / f"{job_id}.json").is_file()


def test_a_job_running_under_a_live_lease_is_not_claimed_but_an_expired_one_is(runner):
    job_id = generate_job(runner, memory={"k": 0})
    assert runner.store.claim(job_id, "other-worker", lease_s=60) is not None
    assert runner.run(job_id) == "skipped (running)"

    runner.store.update(job_id, lease_until=time.time() - 1)  # that worker died
    assert runner.run(job_id) == "succeeded"
    job = runner.store.get(job_id)
    assert job.attempts == 2 and job.worker == runner.name


def test_a_cancelled_queued_job_never_runs(runner):
    job_id = generate_job(runner)
    assert runner.store.request_cancel(job_id).status == "canceled"
    assert runner.run(job_id) == "skipped (canceled)"
    assert runner.store.get(job_id).started_at is None


def test_bad_requests_fail_the_job_with_their_message(runner):
    job_id = generate_job(runner, steps=99)
    assert runner.run(job_id) == "failed"
    assert "steps=99" in runner.store.get(job_id).error
    pinned = generate_job(runner, memory={"clip_ids": [424242]})
    assert runner.run(pinned) == "failed"
    assert "424242" in runner.store.get(pinned).error


def test_ingest_jobs_add_the_clip_and_remove_the_upload(runner, tmp_path):
    upload = write_clip(tmp_path / "upload.mp4", moving_square("yellow", -1))
    job = JobRecord(
        kind="ingest",
        owner="test",
        request={"upload_path": str(upload), "caption": "a yellow square", "tags": ["y"]},
    )
    job_id = runner.store.create(job).job_id
    assert runner.run(job_id) == "succeeded"
    clip_id = runner.store.get(job_id).result["clip_id"]
    assert runner.bank.get(clip_id).tags == ["y"]
    assert not upload.exists()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_memory_stays_flat_over_twenty_jobs(runner, tmp_path):
    clip = write_clip(tmp_path / "ref.mp4", moving_square("red"))
    ingest = JobRecord(
        kind="ingest", owner="t", request={"upload_path": str(clip), "caption": "red"}
    )
    runner.run(runner.store.create(ingest).job_id)
    samples = []
    for index in range(20):
        job_id = generate_job(runner, seed=index, memory={"k": 1})
        assert runner.run(job_id) == "succeeded"
        gc.collect()
        samples.append(_rss_mib())
    # After warm-up (allocator pools, lazy imports) the resident size must have no upward trend.
    # Single samples jitter by ~10 MiB, so judge the least-squares slope over the last 15 jobs:
    # a leak of one tiny job's frames and latents per job would show as well over 1 MiB/job.
    steady = np.array(samples[5:])
    slope = np.polyfit(np.arange(len(steady)), steady, 1)[0]
    assert slope < 1.0, f"RSS grows {slope:.2f} MiB per job: {samples}"
