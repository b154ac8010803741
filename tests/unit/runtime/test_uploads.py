"""Orphaned uploads are swept; uploads a job still waits for are kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

from memory_bank.storage import LocalStorage
from runtime.jobs import IngestSpec, JobRecord, MemoryJobStore
from runtime.uploads import sweep_uploads


def test_only_old_uploads_no_unfinished_job_needs_are_removed(tmp_path: Path):
    folder = tmp_path / "uploads"
    uploads, store = LocalStorage(folder), MemoryJobStore()
    waiting = store.create(JobRecord.new("alice", IngestSpec(upload_key="a.mp4", caption="x")))
    done = store.create(JobRecord.new("alice", IngestSpec(upload_key="b.mp4", caption="x")))
    store.claim(done.job_id, "w", 60)
    store.finish(done.job_id, 1, "failed", error="boom")
    files = {
        f"{waiting.job_id}.mp4": True,  # old, but its job is still queued: kept
        f"{done.job_id}.mp4": False,  # old, job finished: an orphan
        "0123abcd.webm": False,  # old, no such job
        ".feed.mp4.part": False,  # an old partial reception
    }
    old = time.time() - 7200
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"video")
        os.utime(folder / name, (old, old))
    (folder / "fresh.mp4").write_bytes(b"just arrived")  # young: may be being queued
    removed = sweep_uploads(uploads, store, folder)
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([name for name, kept in files.items() if kept] + ["fresh.mp4"])
    assert removed == 3
