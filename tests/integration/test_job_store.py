"""The Redis job store against the real Redis: typed records, fenced attempts, one round trip
per progress report, and the refusal of records written by the previous format."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from model.generation import GenerationParams
from model.presets import TINY
from runtime.jobs import (
    GenerateResult,
    GenerateSpec,
    JobRecord,
    MemoryClipUsed,
    OutdatedJobRecord,
    RedisJobStore,
)
from tests.integration.conftest import FRESH_DB, IntegrationEnv, redis_url

pytestmark = pytest.mark.integration


@pytest.fixture
def store() -> Iterator[RedisJobStore]:
    prefix = f"ditmem-test-{uuid.uuid4().hex[:8]}"
    jobs = RedisJobStore(redis_url(FRESH_DB), prefix=prefix)
    yield jobs
    for key in jobs.redis.scan_iter(f"{prefix}:*"):
        jobs.redis.delete(key)


def queued_job(owner: str = "alice") -> JobRecord:
    params = GenerationParams.resolve(TINY, "a red ball", seed=7, steps=4)
    used = (MemoryClipUsed(clip_id=3, score=0.5, caption="a red ball falling"),)
    return JobRecord.new(owner, GenerateSpec(params=params, memory=used))


def test_a_record_round_trips_with_its_typed_spec(store: RedisJobStore):
    job = store.create(queued_job())
    loaded = store.get(job.job_id)
    assert loaded == job
    assert loaded.spec.params.seed == 7 and loaded.total_steps == 4
    assert loaded.memory_used[0].caption == "a red ball falling"
    assert store.queued_count("alice") == 1
    assert store.list("alice", 0, 10) == ([job], 1)


def test_progress_is_one_round_trip_and_fenced_by_the_attempt(
    store: RedisJobStore, monkeypatch: pytest.MonkeyPatch
):
    job = store.create(queued_job())
    claimed = store.claim(job.job_id, "w1", lease_s=60)
    assert claimed.attempts == 1 and store.queued_count("alice") == 0

    # The first report loads the script into Redis; every later one is a single command.
    assert store.report_progress(job.job_id, 1, 1, 4, 60) == "continue"
    calls = []
    real = store.redis.execute_command
    monkeypatch.setattr(
        store.redis, "execute_command", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    )
    assert store.report_progress(job.job_id, 1, 2, 4, 60) == "continue"
    assert calls == ["EVALSHA"], calls
    monkeypatch.undo()

    running = store.get(job.job_id)
    assert (running.step, running.progress) == (2, 0.5)
    store.request_cancel(job.job_id)
    assert store.report_progress(job.job_id, 1, 2, 4, 60) == "cancel"  # the same step again
    # A stale attempt (another worker's) is told it lost the job and changes nothing.
    assert store.report_progress(job.job_id, 2, 3, 4, 60) == "lost"
    assert store.finish(job.job_id, 2, "succeeded") is None
    assert store.get(job.job_id).step == 2


def test_finish_writes_status_result_and_error_in_one_transaction(store: RedisJobStore):
    job = store.create(queued_job())
    store.claim(job.job_id, "w1", lease_s=60)
    result = GenerateResult(video=f"{job.job_id}.mp4", record=f"{job.job_id}.json")
    done = store.finish(job.job_id, 1, "succeeded", result=result)
    assert done.status == "succeeded" and done.result == result and done.lease_until is None
    assert (done.step, done.progress) == (4, 1.0)
    assert store.get(job.job_id) == done
    # Finished is final: a second finish (a duplicate delivery) is refused.
    assert store.finish(job.job_id, 1, "failed", error="late") is None


def test_a_record_of_the_previous_format_is_refused_with_a_clear_message(store: RedisJobStore):
    legacy = {"job_id": "abc", "kind": "generate", "owner": "alice", "status": "queued",
              "request": {"prompt": "a red ball"}}  # fmt: skip
    store.redis.set(f"{store.prefix}:job:abc", json.dumps(legacy))
    with pytest.raises(OutdatedJobRecord, match="older ditmem"):
        store.get("abc")
    with pytest.raises(OutdatedJobRecord):  # a worker skips such a delivery (worker.runner)
        store.claim("abc", "w1", lease_s=60)


def test_the_api_answers_410_for_a_record_of_the_previous_format(tmp_path):
    env = IntegrationEnv(tmp_path, FRESH_DB)
    job_id = uuid.uuid4().hex
    env.redis().set(f"ditmem:job:{job_id}", json.dumps({"job_id": job_id, "owner": "local"}))
    try:
        with env.api() as client:
            response = client.get(f"/jobs/{job_id}")
            assert response.status_code == 410, response.text
            assert response.json()["error"]["code"] == "job_record_outdated"
            assert client.get(f"/jobs/{uuid.uuid4().hex}").status_code == 404
    finally:
        env.redis().delete(f"ditmem:job:{job_id}")


def test_every_stored_change_is_a_new_revision_announced_on_the_channel(store: RedisJobStore):
    seen: list = []
    arrived = threading.Event()

    def listen(change) -> None:
        seen.append(change)
        if change.status == "succeeded":
            arrived.set()

    stop = store.subscribe(listen)
    try:
        time.sleep(0.3)  # the subscription is in place
        job = store.create(queued_job())
        claimed = store.claim(job.job_id, "w1", 30)
        assert claimed.revision == 1
        assert store.report_progress(job.job_id, 1, 1, 4, 30) == "continue"
        assert store.get(job.job_id).revision == 2
        done = store.finish(job.job_id, 1, "succeeded")
        assert done.revision == 3
        assert arrived.wait(5), seen
    finally:
        stop()
    mine = [c for c in seen if c.job_id == job.job_id]
    assert [(c.revision, c.status, c.transition) for c in mine] == [
        (0, "queued", True), (1, "running", True), (2, "running", False), (3, "succeeded", True),
    ]  # fmt: skip


def test_queue_positions_and_steps_ahead_are_fleet_wide(store: RedisJobStore):
    first, second, third = (store.create(queued_job(owner)) for owner in ("a", "b", "a"))
    assert [store.queue_position(j) for j in (first, second, third)] == [0, 1, 2]
    # Steps ahead of the third: both queued before it (4 each).
    assert store.steps_ahead(third) == 8
    running = store.claim(first.job_id, "w1", 30)
    store.report_progress(first.job_id, running.attempts, 1, 4, 30)
    third = store.get(third.job_id)
    assert store.queue_position(store.get(second.job_id)) == 0
    assert store.queue_position(third) == 1 and store.queue_position(running) is None
    assert store.steps_ahead(third) == 4 + 3  # the second's 4, and what the first has left
    assert store.recent_step_seconds() is None
    for seconds in (0.5, 0.1, 0.2):
        store.record_step_seconds(seconds)
    assert store.recent_step_seconds() == 0.2
