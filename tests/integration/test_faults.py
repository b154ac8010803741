"""Workers that freeze or die, with Celery's visibility timeout left at its default (hours):
leases, the reaper and fenced writes decide what happens, and nothing is written twice.

Real Redis, real worker processes (SIGSTOP, SIGCONT, SIGKILL), the API in this process (its
own reaper runs in it, as in production).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from runtime.jobs import WORKER_SILENT_S, RedisJobStore
from tests.embedded import SLOW_REQUEST
from tests.integration.conftest import (
    JOB_LEASE_S,
    IntegrationEnv,
    WorkerProcess,
    submit_generation,
    wait_for_job,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@dataclass
class DefaultVisibilityEnv(IntegrationEnv):
    """Celery hands a dead worker's task back only after 3 hours, as in production."""

    def values(self) -> dict[str, str]:
        return super().values() | {"visibility_timeout_s": str(3 * 3600)}


@pytest.fixture
def env(fresh_env: IntegrationEnv) -> DefaultVisibilityEnv:
    return DefaultVisibilityEnv(fresh_env.root, fresh_env.db)


def finished_count(client) -> float:
    text = client.get("/metrics").text
    found = re.search(r'ditmem_jobs_finished_total\{kind="generate:succeeded"\} ([0-9.]+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_frozen_worker_that_resumes_writes_nothing(
    env: DefaultVisibilityEnv, spawn_worker: Callable[[IntegrationEnv], WorkerProcess]
) -> None:
    store = RedisJobStore(env.redis_url)
    workers = [spawn_worker(env), spawn_worker(env)]
    for worker in workers:
        worker.wait_ready()
    with env.api() as client:
        job_id = submit_generation(client, "a square that freezes", memory={"k": 0},
                                   **SLOW_REQUEST)  # fmt: skip
        wait_for_job(client, job_id, until=lambda j: j["status"] == "running" and j["step"] >= 1)
        owner = store.get(job_id).worker
        frozen = next(w for w in workers if w.name == owner)
        survivor = next(w for w in workers if w is not frozen)
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            # Its lease runs out; a reaper requeues the job and the other worker runs it.
            done = wait_for_job(client, job_id, timeout=120)
            assert done["status"] == "succeeded", done
            record = store.get(job_id)
            assert record.worker == survivor.name and record.attempts == 2
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        files = sorted(p.name for p in env.results_dir.glob(f"{job_id}*"))
        assert files == [f"{job_id}-a2.json", f"{job_id}-a2.mp4"]
        stamps = {name: (env.results_dir / name).stat().st_mtime_ns for name in files}
        # The resumed attempt finds its claim gone at its next write and drops the job.
        wait_until(lambda: "lost its claim" in frozen.log_tail(200), 60, "the frozen attempt")
        time.sleep(1.0)
        assert sorted(p.name for p in env.results_dir.glob(f"{job_id}*")) == files
        assert {n: (env.results_dir / n).stat().st_mtime_ns for n in files} == stamps
        assert json.loads((env.results_dir / files[0]).read_text())["job_id"] == job_id
        assert store.get(job_id).status == "succeeded" and store.get(job_id).attempts == 2
        assert finished_count(client) == 1.0
        assert client.get(f"/jobs/{job_id}/video").status_code == 200


def test_a_dead_workers_job_is_requeued_cancelled_at_once_and_readiness_drops(
    env: DefaultVisibilityEnv, spawn_worker: Callable[[IntegrationEnv], WorkerProcess]
) -> None:
    store = RedisJobStore(env.redis_url)
    first = spawn_worker(env).wait_ready()
    with env.api() as client:
        job_id = submit_generation(client, "a square that survives", memory={"k": 0},
                                   **SLOW_REQUEST)  # fmt: skip
        wait_for_job(client, job_id, until=lambda j: j["status"] == "running" and j["step"] >= 1)
        first.kill()
        killed_at = time.monotonic()
        second = spawn_worker(env).wait_ready()
        # Requeued by a reaper once the lease ended, not after the 3 h visibility timeout.
        done = wait_for_job(client, job_id, timeout=120)
        assert done["status"] == "succeeded", done
        assert store.get(job_id).worker == second.name and store.get(job_id).attempts == 2
        assert time.monotonic() - killed_at < 90

        # A running job whose worker is gone: cancelling ends it at once.
        orphan = submit_generation(client, "a square left alone", memory={"k": 0},
                                   **SLOW_REQUEST)  # fmt: skip
        wait_for_job(client, orphan, until=lambda j: j["status"] == "running" and j["step"] >= 1)
        second.kill()
        died_at = time.monotonic()
        time.sleep(JOB_LEASE_S + 0.5)  # its lease is over; nobody will ever finish it
        cancelled = client.delete(f"/jobs/{orphan}").json()
        assert cancelled["status"] == "canceled" and cancelled["finished_at"] is not None

        # No worker left: readiness says so within the heartbeat bound.
        wait_until(lambda: client.get("/readyz").status_code == 503, WORKER_SILENT_S + 5,
                   "/readyz to notice the dead workers", interval=0.2)  # fmt: skip
        assert time.monotonic() - died_at <= WORKER_SILENT_S + 5
        assert client.get("/readyz").json()["checks"]["workers"] == 0
