"""Imports of a dataset already in the object store, driven by the workers themselves.

``POST /memory/imports`` names a captions file and a folder in the imports storage. Its job is
an *import* job, whose rows become ingest jobs, ``window`` of them in flight at a time:

* a worker that takes the import job sends the next rows as ingest jobs (ids ``<import>-<line>``,
  so a resent row is never a second job) and then *parks* the import instead of waiting: no
  worker ever sits idle holding it, so one worker with one thread can run an import too;
* each ingest job, once finished, counts its outcome into the import's record; the one that
  brings the rows in flight down to half the window sends the import job again, and the last
  one of the last rows finishes it.

Every step is one atomic update of the import's record (:meth:`JobStore.update`), so counts are
exact however many workers finish rows at once. A worker that dies while sending leaves its
reservation behind; the next attempt (Celery hands the task back) sends those rows again.
Cancelling the import stops new rows; rows already sent finish.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from memory_bank.bulk import CaptionRow, read_caption_rows
from memory_bank.errors import ClipRejected
from memory_bank.storage import ObjectStorage
from runtime.dispatch import Dispatcher
from runtime.jobs import (
    MAX_REJECTIONS_KEPT,
    FinalStatus,
    ImportResult,
    ImportSpec,
    IngestSpec,
    JobRecord,
    JobStore,
    RejectedRow,
    now,
    with_changes,
)

CHILD_OWNER = "import"  # rows are not the caller's own jobs: they never count against its quota
ROW_CACHE_IMPORTS = 2  # imports whose rows a worker keeps in memory


def _progress(result: ImportResult) -> float:
    done = result.imported + result.already_present + result.rejected
    return min(1.0, done / result.rows) if result.rows else 1.0


def row_key(folder: str, row: CaptionRow) -> str:
    """The storage key of a row's video; a path that leaves ``folder`` is refused."""
    relative = posixpath.normpath(row.video.replace("\\", "/"))
    if relative.startswith(("../", "/")) or relative in ("..", "."):
        raise ClipRejected(f"{row.video}: outside {folder or 'the imports storage'}")
    return posixpath.join(folder, relative) if folder else relative


def read_rows(imports: ObjectStorage, spec: ImportSpec) -> list[CaptionRow]:
    """The captions file's rows (raises ``ValueError`` naming a malformed line)."""
    with imports.local_copy(spec.captions) as captions:
        return list(read_caption_rows(captions))


def child_id(import_id: str, line: int) -> str:
    return f"{import_id}-{line}"


class ImportDriver:
    """Sends an import's rows and counts their outcomes (see the module docstring)."""

    def __init__(self, store: JobStore, dispatcher: Dispatcher, imports: ObjectStorage) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.imports = imports
        # An import is taken up again every half window: its rows are read once per worker,
        # not once per wake-up (a captions file of 400K rows is tens of MB).
        self._rows: OrderedDict[str, list[CaptionRow]] = OrderedDict()

    def _rows_of(self, job: JobRecord, spec: ImportSpec) -> list[CaptionRow]:
        if job.job_id not in self._rows:
            self._rows[job.job_id] = read_rows(self.imports, spec)
            while len(self._rows) > ROW_CACHE_IMPORTS:
                self._rows.popitem(last=False)
        self._rows.move_to_end(job.job_id)
        return self._rows[job.job_id]

    # -- the import job ------------------------------------------------------------------------

    def advance(self, job: JobRecord) -> JobRecord | None:
        """Run one claimed attempt of an import job: send rows until the window is full or
        none are left, then park it. Returns its record, ``None`` when the attempt lost it."""
        spec = job.spec
        assert isinstance(spec, ImportSpec)
        rows = self._rows_of(job, spec)
        attempt = job.attempts
        while True:
            reserved = self.store.update(job.job_id, lambda j: _reserve(j, attempt, len(rows)))
            if reserved is None:
                return None
            result = reserved.result
            assert isinstance(result, ImportResult)
            if reserved.finished:
                return reserved
            if result.reserved > result.sent:
                self._send(reserved, spec, rows[result.sent : result.reserved])
            parked = self.store.update(job.job_id, lambda j: _park(j, attempt))
            if parked is None or parked.finished or parked.status != "running":
                return parked
            if isinstance(parked.result, ImportResult) and parked.result.parked:
                return parked
            # Rows finished while these were being sent: room for more right away.

    def _send(self, job: JobRecord, spec: ImportSpec, rows: Sequence[CaptionRow]) -> None:
        for row in rows:
            try:
                key = row_key(spec.folder, row)
            except ClipRejected as error:
                self._reject(job.job_id, row, str(error))
                continue
            child = JobRecord.new(
                CHILD_OWNER,
                IngestSpec(
                    upload_key=key,
                    caption=row.caption,
                    tags=tuple(row.tags) + tuple(spec.tags),
                    source_name=row.video,
                    storage="imports",
                    parent=job.job_id,
                    line=row.line,
                    uploader=job.owner,  # the clips are the importer's, not "import"'s
                ),
                job_id=child_id(job.job_id, row.line),
            )
            if self.store.get(child.job_id) is None:  # a resent row is the same job
                self.store.create(child)
            self.dispatcher.submit(child)

    def _reject(self, import_id: str, row: CaptionRow, reason: str) -> None:
        """A row refused before any worker sees it: recorded as a failed row job, so a resend
        of the same rows never counts it twice."""
        spec = IngestSpec(
            upload_key=row.video, caption=row.caption or "-", source_name=row.video,
            storage="imports", parent=import_id, line=row.line,
        )  # fmt: skip
        record = JobRecord.new(CHILD_OWNER, spec, job_id=child_id(import_id, row.line))
        if self.store.get(record.job_id) is not None:
            return
        self.store.create(with_changes(record, status="failed", error=reason, finished_at=now()))
        self._count(import_id, None, row.line, row.video, reason)

    # -- its rows ------------------------------------------------------------------------------

    def row_finished(self, child: JobRecord) -> None:
        """Count a finished ingest job of an import; send more rows or finish the import."""
        spec = child.spec
        if not isinstance(spec, IngestSpec) or spec.parent is None or not child.finished:
            return
        if child.status == "succeeded":
            created = bool(getattr(child.result, "created", False))
            self._count(spec.parent, child.worker if created else None, spec.line, None, None,
                        created=created)  # fmt: skip
        else:
            reason = child.error or child.status
            self._count(spec.parent, None, spec.line, spec.source_name, reason)

    def _count(
        self,
        import_id: str,
        worker: str | None,
        line: int | None,
        video: str | None,
        rejection: str | None,
        *,
        created: bool = False,
    ) -> None:
        def change(job: JobRecord) -> JobRecord | None:
            return _counted(job, worker, line or 0, video or "", rejection, created)

        updated = self.store.update(import_id, change)
        if updated is not None and updated.status == "running" and _wake(updated):
            woken = self.store.update(import_id, _unpark)
            if woken is not None:  # this row won the wake-up: hand the import to a worker
                self.dispatcher.submit(woken)


# -- pure transitions of an import's record ---------------------------------------------------


def _reserve(job: JobRecord, attempt: int, rows: int) -> JobRecord | None:
    """Reserve the next rows to send (or the ones a dead attempt reserved but never sent)."""
    if job.status != "running" or job.attempts != attempt:
        return None
    result = job.result if isinstance(job.result, ImportResult) else ImportResult(rows=rows)
    if job.cancel_requested:
        return _final(job, result, "canceled")
    if result.reserved > result.sent:  # a previous attempt died while sending
        return with_changes(job, result=result.model_copy(update={"parked": False}))
    spec = job.spec
    assert isinstance(spec, ImportSpec)
    room = max(0, min(spec.window - result.pending, rows - result.sent))
    updated = result.model_copy(
        update={"rows": rows, "reserved": result.sent + room, "pending": result.pending + room,
                "parked": False}
    )  # fmt: skip
    if updated.sent == rows and updated.pending == 0:  # nothing (left) to ingest
        return _final(job, updated, "succeeded")
    return with_changes(job, result=updated)


def _park(job: JobRecord, attempt: int) -> JobRecord | None:
    """Mark the reserved rows sent and release the job until rows finish."""
    if job.status != "running" or job.attempts != attempt:
        return job if job.finished else None
    result = job.result
    assert isinstance(result, ImportResult)
    sent = result.model_copy(update={"sent": result.reserved})
    spec = job.spec
    assert isinstance(spec, ImportSpec)
    if sent.sent == sent.rows and sent.pending == 0:
        return _final(job, sent, "succeeded")
    if sent.sent < sent.rows and sent.pending <= spec.window // 2:
        return with_changes(job, result=sent)  # room already: the attempt goes on sending
    # Claimable again at once (lease in the past): the row that wakes it sends the task again.
    return with_changes(job, result=sent.model_copy(update={"parked": True}), lease_until=0.0)


def _counted(
    job: JobRecord, worker: str | None, line: int, video: str, rejection: str | None,
    created: bool,
) -> JobRecord | None:  # fmt: skip
    if job.finished or not isinstance(job.result, ImportResult):
        return None
    result = job.result
    changes: dict[str, Any] = {"pending": max(0, result.pending - 1)}
    if rejection is not None:
        changes["rejected"] = result.rejected + 1
        if len(result.rejections) < MAX_REJECTIONS_KEPT:
            kept = RejectedRow(line=line, video=video, reason=rejection)
            changes["rejections"] = (*result.rejections, kept)
    elif created:
        changes["imported"] = result.imported + 1
        if worker:
            changes["workers"] = {**result.workers, worker: result.workers.get(worker, 0) + 1}
    else:
        changes["already_present"] = result.already_present + 1
    updated = result.model_copy(update=changes)
    if updated.parked and updated.pending == 0:
        if updated.sent == updated.rows:
            return _final(job, updated, "succeeded")
        if job.cancel_requested:
            return _final(job, updated, "canceled")
    return with_changes(job, result=updated, progress=_progress(updated))


def _wake(job: JobRecord) -> bool:
    """A parked import with rows left and room for them in its window."""
    result, spec = job.result, job.spec
    if not isinstance(result, ImportResult) or not isinstance(spec, ImportSpec):
        return False
    return result.parked and result.sent < result.rows and result.pending <= spec.window // 2


def _unpark(job: JobRecord) -> JobRecord | None:
    result = job.result
    if job.status != "running" or not isinstance(result, ImportResult) or not result.parked:
        return None  # another row woke it first
    return with_changes(job, result=result.model_copy(update={"parked": False}))


def _final(job: JobRecord, result: ImportResult, status: FinalStatus) -> JobRecord:
    return with_changes(
        job,
        status=status,
        result=result.model_copy(update={"parked": False}),
        progress=1.0 if status == "succeeded" else _progress(result),
        lease_until=None,
        finished_at=job.finished_at or now(),
    )
