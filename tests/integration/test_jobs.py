"""Jobs through the real stack: API in-process, Celery over Redis, one worker subprocess.

All tests of this module share the ``stack`` worker; each waits for its own jobs to finish.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.presets import TINY
from model.video_io import read_video
from runtime.celery_app import GENERATE_TASK, make_celery
from runtime.jobs import RedisJobStore
from tests.embedded import SLOW_REQUEST
from tests.integration.conftest import (
    Stack,
    get_job,
    submit_generation,
    wait_for_job,
)
from tests.media import moving_square, write_clip

pytestmark = pytest.mark.integration


def _running_at_step(job: dict) -> bool:
    return job["status"] != "queued" and (job["status"] != "running" or job["step"] >= 1)


def test_upload_search_generate_download(idle_stack: Stack, tmp_path: Path) -> None:
    client, env = idle_stack.client, idle_stack.env
    clip = write_clip(tmp_path / "square.mp4", moving_square("red", direction=1, num_frames=12))
    caption = "a red square sliding to the right on a black background"

    # Upload: stored, probed, queued for a worker to ingest.
    response = client.post(
        "/memory",
        files={"file": ("square.mp4", clip.read_bytes(), "video/mp4")},
        data={"caption": caption, "tags": " red, square ,"},
    )
    assert response.status_code == 202, response.text
    ingest = wait_for_job(client, response.json()["id"], timeout=60)
    assert ingest["status"] == "succeeded", ingest
    assert ingest["kind"] == "ingest" and ingest["progress"] == 1.0
    clip_id = ingest["result"]["clip_id"]
    assert ingest["result"]["created"] is True
    assert list(env.uploads_dir.iterdir()) == [], "the worker must remove an ingested upload"

    # The API process sees the clip the worker added to the shared bank.
    record = client.get(f"/memory/{clip_id}")
    assert record.status_code == 200, record.text
    assert record.json()["caption"] == caption
    assert set(record.json()["tags"]) == {"red", "square"}
    poster = client.get(f"/memory/{clip_id}/poster")
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    search = client.get("/memory/search", params={"q": "a red square moving right", "k": 3})
    assert search.status_code == 200, search.text
    assert clip_id in [hit["clip_id"] for hit in search.json()["hits"]]

    # Generate with one retrieved clip.
    job_id = submit_generation(client, "a red square moving to the right", memory={"k": 1})
    job = wait_for_job(client, job_id, timeout=60)
    assert job["status"] == "succeeded", job
    assert job["error"] is None
    assert job["progress"] == 1.0
    assert job["total_steps"] == TINY.steps and job["step"] == job["total_steps"]
    assert job["started_at"] is not None and job["finished_at"] is not None
    assert [used["clip_id"] for used in job["memory_used"]] == [clip_id]
    assert job["memory_used"][0]["caption"] == caption
    assert job["links"]["video"] == f"/jobs/{job_id}/video"
    stored = RedisJobStore(env.redis_url).get(job_id)
    assert stored is not None and stored.attempts == 1

    # The video: a real mp4 with the requested (default) frame count and size.
    video = client.get(f"/jobs/{job_id}/video")
    assert video.status_code == 200, video.text
    assert video.headers["content-type"] == "video/mp4"
    downloaded = tmp_path / "downloaded.mp4"
    downloaded.write_bytes(video.content)
    frames = read_video(downloaded)
    assert frames.shape == (TINY.num_frames, TINY.height, TINY.width, 3)

    # Seeking: a byte range.
    partial = client.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=0-99"})
    assert partial.status_code == 206, partial.text
    assert len(partial.content) == 100
    assert partial.content == video.content[:100]
    assert partial.headers["content-range"] == f"bytes 0-99/{len(video.content)}"

    # The results folder holds the same mp4 and a record naming the clip.
    assert (env.results_dir / f"{job_id}-a1.mp4").read_bytes() == video.content
    result_record = json.loads((env.results_dir / f"{job_id}-a1.json").read_text())
    assert result_record["job_id"] == job_id
    assert [used["clip_id"] for used in result_record["memory"]] == [clip_id]


def test_cancel_queued_job(idle_stack: Stack) -> None:
    client, env = idle_stack.client, idle_stack.env
    first = submit_generation(client, "a blue square, first", memory={"k": 0}, **SLOW_REQUEST)
    second = submit_generation(client, "a blue square, second", memory={"k": 0}, **SLOW_REQUEST)
    last = submit_generation(client, "a blue square, last", memory={"k": 0}, **SLOW_REQUEST)
    wait_for_job(client, first, timeout=30, until=lambda job: job["status"] != "queued")
    assert get_job(client, last)["status"] == "queued", "needs the last job still queued"

    canceled = client.delete(f"/jobs/{last}")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"  # final at once: it never runs
    assert canceled.json()["finished_at"] is not None

    # A job sent after the canceled one finishing means the worker has seen its delivery too.
    sentinel = submit_generation(client, "a blue square, sentinel", memory={"k": 0})
    for job_id in (first, second, sentinel):
        job = wait_for_job(client, job_id, timeout=90)
        assert job["status"] == "succeeded", job

    job = get_job(client, last)
    assert job["status"] == "canceled", job
    assert job["started_at"] is None and job["step"] == 0
    stored = RedisJobStore(env.redis_url).get(last)
    assert stored is not None
    assert stored.attempts == 0 and stored.worker is None
    assert not list(env.results_dir.glob(f"{last}*.mp4"))
    assert client.get(f"/jobs/{last}/video").status_code == 409


def test_cancel_running_job(idle_stack: Stack) -> None:
    client, env = idle_stack.client, idle_stack.env
    # A cancel lands between denoising steps, which take a fraction of a second here: a DELETE
    # that finds the job at its last steps cannot show it stopping early, so try again.
    for _attempt in range(3):
        job_id = submit_generation(
            client, "a green square turning", memory={"k": 0}, **SLOW_REQUEST
        )
        seen = wait_for_job(client, job_id, timeout=30, until=_running_at_step, interval=0.01)
        response = client.delete(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        at_cancel = response.json()
        job = wait_for_job(client, job_id, timeout=60)
        if at_cancel["status"] == "running" and at_cancel["step"] <= SLOW_REQUEST["steps"] - 2:
            break
    else:
        pytest.fail(f"could not cancel a job before its last steps; last seen: {seen}", False)

    assert at_cancel["finished_at"] is None  # running: it stops after its current step
    assert job["status"] == "canceled", job
    assert job["started_at"] is not None and job["finished_at"] is not None
    assert job["total_steps"] == SLOW_REQUEST["steps"]
    assert at_cancel["step"] <= job["step"] < job["total_steps"], job
    assert job["progress"] < 1.0
    assert not list(env.results_dir.glob(f"{job_id}*.mp4"))
    assert client.get(f"/jobs/{job_id}/video").status_code == 409

    # The worker serves the next job normally.
    after = wait_for_job(client, submit_generation(client, "a green square"), timeout=60)
    assert after["status"] == "succeeded", after


def test_duplicate_delivery_is_skipped(idle_stack: Stack) -> None:
    client, env = idle_stack.client, idle_stack.env
    job_id = submit_generation(client, "a yellow square sliding left", memory={"k": 0})
    job = wait_for_job(client, job_id, timeout=60)
    assert job["status"] == "succeeded", job
    video = env.results_dir / f"{job_id}-a1.mp4"
    mtime, size = video.stat().st_mtime_ns, video.stat().st_size

    # Celery may deliver a task again (redelivery after a lost ack): same task, same job id.
    celery_app = make_celery(env.settings())
    try:
        result = celery_app.send_task(GENERATE_TASK, args=[job_id], queue="generate")
        assert result.get(timeout=60) == "skipped (succeeded)"
    finally:
        celery_app.close()

    stored = RedisJobStore(env.redis_url).get(job_id)
    assert stored is not None
    assert stored.attempts == 1
    assert stored.status == "succeeded"
    assert get_job(client, job_id)["finished_at"] == job["finished_at"]
    assert (video.stat().st_mtime_ns, video.stat().st_size) == (mtime, size)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_readyz_and_metrics_with_worker(idle_stack: Stack) -> None:
    client = idle_stack.client
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert ready.json()["status"] == "ok"
    assert checks["mode"] == "celery" and checks["job_store"] is True
    assert checks["workers"] >= 1

    job = wait_for_job(client, submit_generation(client, "a red square", memory={"k": 0}))
    assert job["status"] == "succeeded", job

    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = _samples(metrics.text)
    assert samples[("ditmem_queue_depth", (("queue", "generate"),))] == 0
    assert samples[("ditmem_queue_depth", (("queue", "ingest"),))] == 0
    assert samples[("ditmem_jobs_submitted_total", (("kind", "generate"),))] >= 1
    # Measured in the worker process: they must reach the API's /metrics through Redis.
    measured = {
        "job durations": samples[("ditmem_job_duration_seconds_count", ())],
        "step times": samples[("ditmem_step_seconds_count", ())],
        "finished generations": samples.get(
            ("ditmem_jobs_finished_total", (("kind", "generate:succeeded"),)), 0
        ),
    }
    assert all(count >= 1 for count in measured.values()), measured


def test_a_batch_on_the_celery_service(idle_stack: Stack, tmp_path: Path) -> None:
    """``ditmem batch --server`` against an API on a socket whose jobs a Celery worker runs:
    every video made by the worker, downloaded, placed and recorded with its job id."""
    from ditmem.compose import build_app
    from runtime.batch import plan, read_prompts
    from runtime.batch_outputs import BatchOptions
    from runtime.batch_remote import BatchOnServer, ServerOptions
    from service.local_server import running_server

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue ball\na green ball\n")
    out = tmp_path / "out"
    with running_server(build_app(idle_stack.env.settings())) as url:
        runner = BatchOnServer(ServerOptions(url=url, in_flight=2, poll_s=0.05))
        assert runner.check() == "tiny"
        summary = runner.run(plan(read_prompts(prompts), "plain", seed=3), out,
                             BatchOptions(steps=1), progress=False)  # fmt: skip
        runner.client.close()
    assert (summary.made, summary.failed) == (3, 0), summary.failures
    lines = [json.loads(line) for line in (out / "batch.jsonl").read_text().splitlines()]
    assert sorted(line["seed"] for line in lines) == [3, 4, 5]
    for line in lines:
        job = get_job(idle_stack.client, line["job_id"])
        assert job["status"] == "succeeded" and job["params"]["seed"] == line["seed"]
        assert read_video(out / line["output"]).shape[0] == TINY.num_frames


def test_a_jobs_events_stream_from_the_worker_through_redis(idle_stack: Stack) -> None:
    """The event stream of a job a worker subprocess runs: every step it reports reaches the
    API's stream by Redis pub/sub, with the live previews the worker stores, and the stream ends
    with the final event."""
    import httpx
    from httpx_sse import connect_sse

    from ditmem.compose import build_app
    from service.local_server import running_server

    settings = idle_stack.env.settings()
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url) as client:
        body = {"prompt": "a red ball", "memory": {"k": 0}, "preview_every": 1, **SLOW_REQUEST}
        job_id = client.post("/generate", json=body).json()["id"]
        previews = []
        stream = []
        with connect_sse(client, "GET", f"/jobs/{job_id}/events", timeout=60) as source:
            for event in source.iter_sse():
                if not event.data:
                    continue
                stream.append(event)
                url = json.loads(event.data).get("preview_url")
                if url and not previews:  # the worker stored it where the API serves it from
                    previews.append(client.get(url))
    names = [event.event for event in stream]
    assert names[-1] == "succeeded", names
    assert names.count("progress") >= 1 and set(names) <= {"queued", "started", "progress",
                                                           "succeeded"}  # fmt: skip
    steps = [json.loads(event.data)["step"] for event in stream if event.event == "progress"]
    assert steps == sorted(steps) and steps[-1] == SLOW_REQUEST["steps"]
    [preview] = previews
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"


def test_a_webhook_of_a_job_a_worker_finished(idle_stack: Stack) -> None:
    """The worker's finish writes the delivery into the Redis outbox with the transition; the
    API's sender delivers it, signed."""
    from standardwebhooks.webhooks import Webhook

    from ditmem.compose import build_app
    from runtime.settings import Settings
    from tests.embedded import LOCAL
    from tests.webhook_receiver import new_secret, webhook_receiver

    secret = new_secret()
    settings = Settings(_env_file=None, **idle_stack.env.values(), webhook_secret=secret,
                        webhook_allow_private=True, webhook_poll_s=0.05)  # fmt: skip
    from fastapi.testclient import TestClient

    with webhook_receiver() as receiver, TestClient(build_app(settings), base_url=LOCAL) as api:
        body = {"prompt": "a red ball", "steps": 1, "memory": {"k": 0},
                "webhook": {"url": receiver.url}}  # fmt: skip
        job_id = api.post("/generate", json=body).json()["id"]
        [delivery] = receiver.wait_for(1, timeout=60)
    payload = Webhook(secret).verify(delivery.body, delivery.headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
