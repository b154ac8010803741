"""The job runner with an in-memory job store: claims, redelivery, failures, memory over jobs."""

from __future__ import annotations

import gc
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.embed import open_text_embedder
from memory_bank.errors import ClipNotFound
from memory_bank.ingest import ClipIngestor
from memory_bank.storage import LocalStorage
from model.errors import InvalidRequest
from model.pipeline import MemoryWanPipeline
from model.presets import TINY
from model.tiny import build_tiny_components
from runtime.generation import GenerationRequest, resolve_generation
from runtime.jobs import IngestSpec, JobRecord, MemoryJobStore
from tests.media import moving_square, write_clip
from worker.runner import JobRunner


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    pipe = MemoryWanPipeline(**build_tiny_components(0))
    pipe.set_progress_bar_config(disable=True)
    bank = MemoryBank(root / "bank", open_text_embedder(), BankOptions())
    yield root, pipe, bank
    bank.close()


@pytest.fixture
def runner(parts) -> JobRunner:
    root, pipe, bank = parts
    store = MemoryJobStore()
    return JobRunner(
        store, pipe, TINY, bank, ClipIngestor(bank, pipe, TINY),
        results=LocalStorage(root / "results"), uploads=LocalStorage(root / "uploads"),
        scratch_dir=root / "scratch",
    )  # fmt: skip


def results_dir(runner: JobRunner) -> Path:
    return runner.results.root  # type: ignore[attr-defined]  # local storage in these tests


def generate_job(runner: JobRunner, **request) -> str:
    spec = resolve_generation(GenerationRequest(prompt="a ball", **request), TINY, runner.bank)
    return runner.store.create(JobRecord.new("test", spec)).job_id


def ingest_job(runner: JobRunner, upload: Path, caption: str, tags=()) -> str:
    key = f"{uuid.uuid4().hex}{upload.suffix}"
    runner.uploads.put_file(key, upload)
    spec = IngestSpec(upload_key=key, caption=caption, tags=tuple(tags))
    return runner.store.create(JobRecord.new("test", spec)).job_id


def test_a_job_runs_once_and_a_second_delivery_is_skipped(runner):
    job_id = generate_job(runner, memory={"k": 0})
    assert runner.run(job_id) == "succeeded"
    video = results_dir(runner) / f"{job_id}-a1.mp4"
    stamp = video.stat().st_mtime_ns

    assert runner.run(job_id) == "skipped (succeeded)"
    job = runner.store.get(job_id)
    assert job.attempts == 1 and video.stat().st_mtime_ns == stamp
    assert (results_dir(runner) / f"{job_id}-a1.json").is_file()


def test_a_job_running_under_a_live_lease_is_not_claimed_but_an_expired_one_is(runner, monkeypatch):
    real_time = time.time
    job_id = generate_job(runner, memory={"k": 0})
    assert runner.store.claim(job_id, "other-worker", lease_s=60) is not None
    assert runner.run(job_id) == "skipped (running)"

    # That worker died: its lease runs out, and the job may run again.
    monkeypatch.setattr(time, "time", lambda: real_time() + 61)
    assert runner.run(job_id) == "succeeded"
    job = runner.store.get(job_id)
    assert job.attempts == 2 and job.worker == runner.name


def test_a_stale_attempt_can_neither_report_nor_finish(runner):
    job_id = generate_job(runner, memory={"k": 0})
    first = runner.store.claim(job_id, "frozen-worker", lease_s=-1)  # expired at once
    second = runner.store.claim(job_id, "other-worker", lease_s=60)
    assert (first.attempts, second.attempts) == (1, 2)
    assert runner.store.report_progress(job_id, first.attempts, 1, 2, 60) == "lost"
    assert runner.store.finish(job_id, first.attempts, "failed", error="stale") is None
    assert runner.store.report_progress(job_id, second.attempts, 1, 2, 60) == "continue"
    runner.store.request_cancel(job_id)
    assert runner.store.report_progress(job_id, second.attempts, 2, 2, 60) == "cancel"
    finished = runner.store.finish(job_id, second.attempts, "canceled")
    assert finished.status == "canceled" and finished.error is None


def test_a_cancelled_queued_job_never_runs(runner):
    job_id = generate_job(runner)
    assert runner.store.request_cancel(job_id).status == "canceled"
    assert runner.run(job_id) == "skipped (canceled)"
    assert runner.store.get(job_id).started_at is None


def test_bad_requests_are_refused_before_they_become_jobs(runner):
    with pytest.raises(InvalidRequest, match="steps=99"):
        generate_job(runner, steps=99)
    with pytest.raises(ClipNotFound, match="424242"):
        generate_job(runner, memory={"clip_ids": [424242]})


def test_a_pinned_clip_deleted_before_the_job_runs_fails_it_with_its_id(runner, tmp_path):
    upload = write_clip(tmp_path / "doomed.mp4", moving_square("blue", 1))
    assert runner.run(ingest_job(runner, upload, "a doomed square")) == "succeeded"
    clip_id = max(r.clip_id for r in runner.bank.list(limit=200).items)
    job_id = generate_job(runner, memory={"clip_ids": [clip_id]})
    assert [m.clip_id for m in runner.store.get(job_id).memory_used] == [clip_id]
    runner.bank.delete(clip_id)
    assert runner.run(job_id) == "failed"
    assert str(clip_id) in runner.store.get(job_id).error


def test_the_job_runs_the_seed_and_parameters_it_was_accepted_with(runner):
    job_id = generate_job(runner, memory={"k": 0}, steps=3)
    accepted = runner.store.get(job_id)
    assert accepted.total_steps == 3 and 0 <= accepted.spec.params.seed < 2**31
    assert runner.run(job_id) == "succeeded"
    finished = runner.store.get(job_id)
    assert (finished.step, finished.progress) == (3, 1.0)
    record = json.loads((results_dir(runner) / finished.result.record).read_text())
    assert record["params"] == accepted.spec.params.model_dump()
    assert record["job_id"] == job_id and record["memory"] == []


def test_ingest_jobs_add_the_clip_and_remove_the_upload(runner, tmp_path):
    upload = write_clip(tmp_path / "upload.mp4", moving_square("yellow", -1))
    job_id = ingest_job(runner, upload, "a yellow square", ["y"])
    assert runner.run(job_id) == "succeeded"
    clip_id = runner.store.get(job_id).result.clip_id
    assert runner.bank.get(clip_id).tags == ["y"]
    assert list(runner.uploads.keys("")) == []  # the stored upload is gone once ingested


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_memory_stays_flat_over_twenty_jobs(runner, tmp_path):
    clip = write_clip(tmp_path / "ref.mp4", moving_square("red"))
    runner.run(ingest_job(runner, clip, "red"))
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


def test_a_long_ingest_keeps_its_lease_so_the_reaper_leaves_it_alone(runner, tmp_path, monkeypatch):
    from runtime.reaper import LeaseReaper

    runner.lease_s = 0.3
    clip = write_clip(tmp_path / "slow.mp4", moving_square("blue", 1, num_frames=15))
    job_id = ingest_job(runner, clip, "a slow ingest")
    reaped = []
    reaper = LeaseReaper(runner.store, dispatcher=type("D", (), {"submit": reaped.append})())
    real_ingest = runner.ingestor.ingest

    def slow_ingest(*args, **kwargs):
        for _ in range(6):  # 1.2 s, four leases long
            time.sleep(0.2)
            assert reaper.reap_once() == []  # the lease is renewed all along
        return real_ingest(*args, **kwargs)

    monkeypatch.setattr(runner.ingestor, "ingest", slow_ingest)
    assert runner.run(job_id) == "succeeded"
    assert runner.store.get(job_id).attempts == 1 and reaped == []
