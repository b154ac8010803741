"""Import jobs driven by their own rows: windows, parking, wake-ups, exact counts, and an
attempt that dies while sending (its rows are sent again and still counted once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory_bank.storage import LocalStorage
from runtime.imports import ImportDriver, child_id
from runtime.jobs import ImportResult, ImportSpec, IngestResult, JobRecord, MemoryJobStore


class RecordingDispatcher:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def submit(self, job: JobRecord) -> None:
        self.sent.append(job.job_id)

    def depth(self) -> dict[str, int]:
        return {}


@pytest.fixture
def imports(tmp_path: Path) -> LocalStorage:
    rows = ["video,caption"] + [f"clip-{n}.mp4,clip {n}" for n in range(10)]
    rows.append("../outside.mp4,escapes the folder")  # line 12
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "captions.csv").write_text("\n".join(rows) + "\n")
    return LocalStorage(tmp_path)


def start(store: MemoryJobStore, window: int) -> JobRecord:
    spec = ImportSpec(folder="set/videos", captions="set/captions.csv", window=window)
    job = store.create(JobRecord.new("alice", spec))
    return store.claim(job.job_id, "w1", 60)


def finish_row(store: MemoryJobStore, driver: ImportDriver, job_id: str, created=True) -> None:
    claimed = store.claim(job_id, "w2", 60)
    assert claimed is not None, job_id
    result = IngestResult(clip_id=1, created=created)
    driver.row_finished(store.finish(job_id, claimed.attempts, "succeeded", result=result))


def result_of(store: MemoryJobStore, job_id: str) -> ImportResult:
    result = store.get(job_id).result
    assert isinstance(result, ImportResult)
    return result


def test_rows_go_out_a_window_at_a_time_and_every_outcome_counts_once(imports):
    store, dispatcher = MemoryJobStore(), RecordingDispatcher()
    driver = ImportDriver(store, dispatcher, imports)
    job = start(store, window=4)

    parked = driver.advance(job)
    assert parked.status == "running" and parked.result.parked and parked.lease_until == 0.0
    assert dispatcher.sent == [child_id(job.job_id, line) for line in (2, 3, 4, 5)]
    assert store.get(dispatcher.sent[0]).spec.upload_key == "set/videos/clip-0.mp4"

    finish_row(store, driver, dispatcher.sent[0])
    assert dispatcher.sent[-1] != job.job_id  # 3 of 4 in flight: no room yet
    finish_row(store, driver, dispatcher.sent[1], created=False)
    assert dispatcher.sent[-1] == job.job_id  # half the window free: the import is woken
    assert not result_of(store, job.job_id).parked

    while not store.get(job.job_id).finished:
        woken = store.claim(job.job_id, "w3", 60)
        if woken is not None:
            driver.advance(woken)
        for row_id in [i for i in dispatcher.sent if i != job.job_id]:
            if not store.get(row_id).finished:
                finish_row(store, driver, row_id)
    final = store.get(job.job_id)
    assert final.status == "succeeded" and final.progress == 1.0
    result = result_of(store, job.job_id)
    assert (result.rows, result.sent, result.pending) == (11, 11, 0)
    assert (result.imported, result.already_present, result.rejected) == (9, 1, 1)
    assert result.workers == {"w2": 9}
    assert [(r.line, r.video) for r in result.rejections] == [(12, "../outside.mp4")]


def test_an_attempt_that_died_while_sending_is_resent_and_counted_once(imports):
    store, dispatcher = MemoryJobStore(), RecordingDispatcher()
    driver = ImportDriver(store, dispatcher, imports)
    job = start(store, window=20)
    # The first attempt reserves every row, sends two, and dies (no park, lease runs out).
    real_submit = dispatcher.submit
    calls = []

    def dies_after_two(child: JobRecord) -> None:
        calls.append(child.job_id)
        if len(calls) > 2:
            raise SystemExit("worker killed")
        real_submit(child)

    dispatcher.submit = dies_after_two
    with pytest.raises(SystemExit):
        driver.advance(job)
    dispatcher.submit = real_submit
    finish_row(store, driver, dispatcher.sent[0])  # a row of the dead attempt finishes

    store.update(job.job_id, lambda j: j.model_copy(update={"lease_until": 0.0}))  # expired
    retry = store.claim(job.job_id, "w9", 60)
    assert retry.attempts == 2
    driver.advance(retry)
    rows = sorted({i for i in dispatcher.sent if i != job.job_id})
    assert len(rows) == 10  # every valid row a job once, however often it was sent
    for row_id in rows:
        if not store.get(row_id).finished:
            finish_row(store, driver, row_id)
    result = result_of(store, job.job_id)
    assert store.get(job.job_id).status == "succeeded"
    assert (result.imported, result.already_present, result.rejected) == (10, 0, 1)


def test_a_cancelled_import_sends_no_more_rows(imports):
    store, dispatcher = MemoryJobStore(), RecordingDispatcher()
    driver = ImportDriver(store, dispatcher, imports)
    job = start(store, window=2)
    driver.advance(job)  # two rows out, the import parked (no worker holds it)
    cancelled = store.request_cancel(job.job_id)
    assert cancelled.status == "canceled" and cancelled.finished_at is not None  # at once
    for row_id in list(dispatcher.sent):  # rows already sent still finish...
        finish_row(store, driver, row_id)
    assert len(dispatcher.sent) == 2  # ...but wake nothing: no row is sent after the cancel
    assert store.get(job.job_id).status == "canceled"


def test_a_cancel_while_an_attempt_sends_stops_at_its_next_round(imports):
    store, dispatcher = MemoryJobStore(), RecordingDispatcher()
    driver = ImportDriver(store, dispatcher, imports)
    job = start(store, window=2)
    store.request_cancel(job.job_id)  # claimed and live: the cancel is a request
    assert store.get(job.job_id).status == "running"
    assert driver.advance(job).status == "canceled"
    assert dispatcher.sent == []
