"""Worker loss: readiness without workers, and a job whose worker is killed mid-run.

Each test has its own Redis db and folders (``fresh_env``) and its own workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from model.video_io import read_video
from runtime.jobs import RedisJobStore
from tests.embedded import SLOW_REQUEST
from tests.integration.conftest import (
    VISIBILITY_TIMEOUT_S,
    IntegrationEnv,
    WorkerProcess,
    submit_generation,
    wait_for_job,
)

pytestmark = pytest.mark.integration


def test_readyz_is_503_without_a_worker(fresh_env: IntegrationEnv) -> None:
    with fresh_env.api() as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["job_store"] is True  # Redis is fine; nobody serves the queues
        assert body["checks"]["workers"] == 0

        # Jobs are still accepted and wait in the queue.
        job_id = submit_generation(client, "a red square", memory={"k": 0})
        metrics = client.get("/metrics").text
        assert 'ditmem_queue_depth{queue="generate"} 1.0' in metrics
        assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"


def test_killed_worker_job_is_redelivered(
    fresh_env: IntegrationEnv,
    spawn_worker: Callable[[IntegrationEnv], WorkerProcess],
    tmp_path: Path,
) -> None:
    store = RedisJobStore(fresh_env.redis_url)
    first = spawn_worker(fresh_env).wait_ready()
    with fresh_env.api() as client:
        assert client.get("/readyz").status_code == 200
        job_id = submit_generation(
            client, "a square that survives", memory={"k": 0}, **SLOW_REQUEST
        )
        running = wait_for_job(
            client, job_id, timeout=30, until=lambda job: job["status"] != "queued", interval=0.02
        )
        assert running["status"] == "running", running
        first.kill()
        assert first.process.returncode == -9

        killed = store.get(job_id)
        assert killed is not None
        assert killed.status == "running" and killed.attempts == 1
        assert killed.worker == first.name
        assert not list(fresh_env.results_dir.glob(f"{job_id}*.mp4"))

        # The broker hands an unacknowledged task back once it is older than the visibility
        # timeout; a new worker looks for such tasks as it starts (later sweeps are far apart),
        # so it must not start before that.
        delivered = datetime.fromisoformat(running["started_at"]).timestamp()
        time.sleep(max(0.0, delivered + VISIBILITY_TIMEOUT_S + 0.5 - time.time()))
        second = spawn_worker(fresh_env).wait_ready()

        job = wait_for_job(client, job_id, timeout=60 + VISIBILITY_TIMEOUT_S)
        assert job["status"] == "succeeded", job
        assert job["step"] == job["total_steps"] == SLOW_REQUEST["steps"]
        finished = store.get(job_id)
        assert finished is not None
        assert finished.attempts == 2
        assert finished.worker == second.name
        assert finished.lease_until is None

        video = client.get(f"/jobs/{job_id}/video")
        assert video.status_code == 200
        path = tmp_path / "survivor.mp4"
        path.write_bytes(video.content)
        assert read_video(path).shape == (
            SLOW_REQUEST["num_frames"],
            SLOW_REQUEST["height"],
            SLOW_REQUEST["width"],
            3,
        )
