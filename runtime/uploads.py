"""Uploads waiting for ingest, and the ones nothing will ever ingest.

An upload lives in the uploads storage from the moment the API accepts it until its ingest job
has run (the worker removes it, whatever the outcome). A job cancelled before it ran, or a
process that died between storing a file and queueing its job, leaves one behind:
``sweep_uploads`` removes those, from every API start.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from memory_bank.errors import BankError
from memory_bank.storage import ObjectMissing, ObjectStorage
from runtime.jobs import IngestSpec, JobRecord, JobStore

logger = logging.getLogger(__name__)

# Younger files may be an upload being queued right now (on another API replica, say).
ORPHAN_AFTER_S = 3600.0


def discard_upload(uploads: ObjectStorage, job: JobRecord) -> None:
    """Remove the upload of an ingest job that will never run (cancelled while queued)."""
    spec = job.spec
    if isinstance(spec, IngestSpec) and spec.storage == "uploads" and job.status == "canceled":
        uploads.delete(spec.upload_key)


def _waiting(key: str, store: JobStore) -> bool:
    """Whether an unfinished job still needs the upload ``key`` (``<job id><suffix>``)."""
    job_id = key.split(".", 1)[0]
    try:
        job = store.get(job_id)
    except Exception:  # an unreadable record: keep the file rather than guess
        return True
    return job is not None and not job.finished


def sweep_uploads(
    uploads: ObjectStorage,
    store: JobStore,
    receiving_dir: Path | None = None,
    older_than_s: float = ORPHAN_AFTER_S,
) -> int:
    """Remove uploads older than ``older_than_s`` that no unfinished job needs, and partial
    receptions left in ``receiving_dir``; returns how many files went."""
    removed, now = 0, time.time()
    try:
        keys = list(uploads.keys(""))
    except BankError as error:
        logger.warning("uploads not swept: %s", error)
        return 0
    for key in keys:
        try:
            old = now - uploads.modified_at(key) > older_than_s
        except ObjectMissing:
            continue
        if old and not _waiting(key, store):
            uploads.delete(key)
            removed += 1
    if receiving_dir is not None and receiving_dir.is_dir():
        for partial in receiving_dir.glob(".*.part"):
            if now - partial.stat().st_mtime > older_than_s:
                partial.unlink(missing_ok=True)
                removed += 1
    if removed:
        logger.info("removed %d orphaned uploads", removed)
    return removed
