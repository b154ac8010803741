"""Bulk import on the fleet: each row of a captions file becomes an ingest job that any worker
takes, so the VAE encoding runs on every GPU at once.

Rows whose file is already in the bank (same content hash) are skipped without a job, which
also makes an interrupted import resumable: run it again and only what is missing is sent. At
most ``max_in_flight`` jobs wait at a time, so a million-row file never floods the queue or the
upload storage.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from memory_bank.bank import MemoryBank
from memory_bank.bulk import CaptionRow, ImportSummary, row_path
from memory_bank.errors import ClipRejected
from memory_bank.ingest import file_sha256
from memory_bank.storage import ObjectStorage
from runtime.dispatch import Dispatcher
from runtime.jobs import IngestResult, IngestSpec, JobRecord, JobStore


@dataclass
class FleetImportSummary(ImportSummary):
    """An :class:`ImportSummary` plus which worker ingested how many clips."""

    workers: Counter[str] = field(default_factory=Counter)


def fan_out_import(
    rows: Iterable[CaptionRow],
    folder: Path,
    *,
    bank: MemoryBank,
    store: JobStore,
    dispatcher: Dispatcher,
    uploads: ObjectStorage,
    owner: str,
    extra_tags: tuple[str, ...] = (),
    max_in_flight: int = 64,
    poll_s: float = 0.25,
    progress: bool = True,
) -> FleetImportSummary:
    """Send every row under ``folder`` to the workers as an ingest job and wait for them all.

    A row whose file is missing or outside ``folder`` is rejected here; one the workers refuse
    (not a video, too long, ...) comes back rejected with their reason.
    """
    folder = folder.resolve()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    rows = list(rows)
    summary = FleetImportSummary()
    pending: dict[str, CaptionRow] = {}
    sent_hashes: set[str] = set()
    bar = tqdm(total=len(rows), desc="importing", unit="clip", disable=not progress)

    last_poll = 0.0

    def collect(block: bool) -> None:
        """Account for finished jobs (one store round trip per poll, at most every ``poll_s``);
        with ``block``, wait until at least one finishes."""
        nonlocal last_poll
        while pending:
            wait = last_poll + poll_s - time.monotonic()
            if wait > 0:
                if not block:
                    return
                time.sleep(wait)
            last_poll = time.monotonic()
            finished = 0
            for job in store.finished_among(list(pending)):
                row = pending.pop(job.job_id)
                finished += 1
                if job.status == "succeeded" and isinstance(job.result, IngestResult):
                    if job.result.created:
                        summary.imported += 1
                        summary.workers[job.worker or "?"] += 1
                    else:
                        summary.already_present += 1
                else:
                    summary.rejected.append((row, job.error or job.status))
                bar.update()
            bar.set_postfix(
                new=summary.imported, skipped=summary.already_present, bad=len(summary.rejected)
            )
            if finished or not block:
                return

    for first in range(0, len(rows), max_in_flight):
        # A batch at a time: its files hashed, then one manifest query for those already in.
        batch: list[tuple[CaptionRow, Path, str]] = []
        for row in rows[first : first + max_in_flight]:
            try:
                path = row_path(folder, row)
                if not path.is_file():  # workers on other hosts could not tell why
                    raise ClipRejected(f"{row.video}: no such file")
            except ClipRejected as error:
                summary.rejected.append((row, str(error)))
                bar.update()
                continue
            batch.append((row, path, file_sha256(path)))
        known = bank.known_hashes([content_hash for _, _, content_hash in batch])
        for row, path, content_hash in batch:
            if content_hash in sent_hashes or content_hash in known:
                summary.already_present += 1
                bar.update()
                continue
            while len(pending) >= max_in_flight:
                collect(block=True)
            sent_hashes.add(content_hash)
            # Named by content: a re-run of an interrupted import overwrites, never duplicates.
            key = f"import-{content_hash}{path.suffix.lower()[:8] or '.bin'}"
            uploads.put_file(key, path)
            spec = IngestSpec(
                upload_key=key,
                caption=row.caption,
                tags=tuple(row.tags) + tuple(extra_tags),
                source_name=row.video,
            )
            job = store.create(JobRecord.new(owner, spec))
            dispatcher.submit(job)
            pending[job.job_id] = row
            collect(block=False)
    while pending:
        collect(block=True)
    bar.close()
    return summary
