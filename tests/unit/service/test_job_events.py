"""``GET /jobs/{id}/events`` on a real socket (embedded mode, tiny preset): the whole event
sequence of real jobs, reconnection with ``Last-Event-ID``, keep-alive comments, queue
positions and start estimates, and the job's own access rules."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from httpx_sse import connect_sse

from ditmem.compose import build_app
from runtime.keys import ApiKey, hash_key
from service.local_server import running_server
from tests.embedded import SLOW_REQUEST, embedded_settings

FINAL = {"succeeded", "failed", "canceled"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return build_app(embedded_settings(tmp_path_factory.mktemp("events"), event_ping_s=0.5))


@pytest.fixture(scope="module")
def server(app) -> str:
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def submit(client: httpx.Client, **body) -> str:
    response = client.post("/generate", json={"prompt": "a red ball", "memory": {"k": 0}, **body})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def events(client: httpx.Client, job_id: str, headers=None, until=None) -> list:
    """Every event of the stream until it ends (or ``until(event)`` says stop)."""
    seen = []
    with connect_sse(
        client, "GET", f"/jobs/{job_id}/events", headers=dict(headers or {})
    ) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            if not event.data:  # a keep-alive comment (httpx-sse hands those on too)
                continue
            seen.append(event)
            if until is not None and until(event):
                break
    return seen


def wait_finished(client: httpx.Client, job_id: str) -> dict:
    for _ in range(600):
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not finish")


def test_a_job_streams_its_whole_life_and_the_stream_ends(client):
    job_id = submit(client, steps=4)
    stream = events(client, job_id)
    names = [event.event for event in stream]
    assert names[-1] == "succeeded" and set(names) <= {"queued", "started", "progress", "succeeded"}
    # It may have started before the stream connected; every step after that is an event.
    progress = [json.loads(event.data) for event in stream if event.event == "progress"]
    assert [p["step"] for p in progress] == list(range(4 - len(progress) + 1, 4 + 1))
    assert progress[-1]["total_steps"] == 4 and progress[-1]["progress"] == 1.0
    ids = [int(event.id) for event in stream]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    final = json.loads(stream[-1].data)
    assert final["video_url"] == f"/jobs/{job_id}/video"
    assert client.get(final["video_url"]).status_code == 200
    # A finished job's stream replays its final state and ends at once.
    again = events(client, job_id)
    assert [event.event for event in again] == ["succeeded"] and again[0].id == stream[-1].id


def test_a_queued_job_streams_its_position_then_its_run(client):
    ahead = [submit(client, **SLOW_REQUEST) for _ in range(3)]
    third = submit(client, steps=2)
    view = client.get(f"/jobs/{third}").json()
    assert view["status"] == "queued" and view["queue_position"] >= 2
    stream = events(client, third)
    queued = [json.loads(event.data) for event in stream if event.event == "queued"]
    positions = [item["queue_position"] for item in queued]
    # Seconds of work ahead and a position re-read at most once a second: it moved, forward only.
    assert positions[0] >= 2 and min(positions) < positions[0], positions
    assert positions == sorted(positions, reverse=True)
    assert stream[-1].event == "succeeded"
    first, second = ahead[0], ahead[1]
    for job_id in (first, second):
        wait_finished(client, job_id)
    # Step times of finished videos now exist: a queued job gets a start estimate.
    busy = submit(client, **SLOW_REQUEST)
    waiting = submit(client, steps=2)
    view = client.get(f"/jobs/{waiting}").json()
    assert view["queue_position"] == 0 or view["status"] != "queued"
    if view["status"] == "queued":
        assert view["estimated_start"] is not None
    for job_id in (busy, waiting):
        wait_finished(client, job_id)


def test_reconnecting_with_last_event_id_skips_what_was_received(client):
    job_id = submit(client, **SLOW_REQUEST)
    first = events(client, job_id, until=lambda event: event.event == "progress")
    last = int(first[-1].id)
    rest = events(client, job_id, headers={"Last-Event-ID": str(last)})
    assert rest, "the stream sent nothing after reconnecting"
    assert all(int(event.id) > last for event in rest)
    assert rest[-1].event == "succeeded"
    steps = [json.loads(e.data)["step"] for e in first + rest if e.event == "progress"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_an_idle_stream_gets_keep_alive_comments(client, server):
    busy = [submit(client, **SLOW_REQUEST) for _ in range(3)]
    waiting = submit(client, **SLOW_REQUEST)
    comments = 0
    with client.stream("GET", f"/jobs/{waiting}/events") as response:
        started = time.monotonic()
        for line in response.iter_lines():
            if line.startswith(":"):
                comments += 1
            if comments >= 2 or time.monotonic() - started > 20:
                break
    assert comments >= 2
    for job_id in [*busy, waiting]:
        client.delete(f"/jobs/{job_id}")
    assert events(client, waiting)[-1].event in FINAL
    for job_id in busy:
        wait_finished(client, job_id)


def test_failed_and_canceled_jobs_end_their_streams(client):
    queued_behind = submit(client, **SLOW_REQUEST)
    victim = submit(client, steps=2)
    client.delete(f"/jobs/{victim}")
    [canceled] = events(client, victim)
    assert canceled.event == "canceled" and json.loads(canceled.data)["status"] == "canceled"
    wait_finished(client, queued_behind)


def test_unknown_jobs_and_other_keys_jobs_are_404(tmp_path):
    alice, bob = "alice-events-key", "bob-events-key"
    settings = embedded_settings(
        tmp_path, auth="keys", api_keys=[
            ApiKey(name="alice", sha256=hash_key(alice)),
            ApiKey(name="bob", sha256=hash_key(bob)),
        ],
    )  # fmt: skip
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url) as http:
        as_alice = {"Authorization": f"Bearer {alice}"}
        job_id = http.post("/generate", json={"prompt": "x", "memory": {"k": 0}},
                           headers=as_alice).json()["id"]  # fmt: skip
        assert http.get("/jobs/nope/events", headers=as_alice).status_code == 404
        other = http.get(f"/jobs/{job_id}/events", headers={"Authorization": f"Bearer {bob}"})
        assert other.status_code == 404
        assert http.get(f"/jobs/{job_id}/events").status_code == 401
        mine = events(http, job_id, headers=as_alice)
        assert mine[-1].event == "succeeded"


def test_streams_leave_no_watch_behind(app, client):
    job_id = submit(client, steps=1)
    events(client, job_id)
    # A client that leaves mid-stream: its watch goes when the server notices.
    busy = submit(client, **SLOW_REQUEST)
    events(client, busy, until=lambda event: True)
    for _ in range(100):
        if app.state.feed.watching == 0:
            break
        time.sleep(0.05)
    assert app.state.feed.watching == 0
    wait_finished(client, busy)


def test_live_previews_stream_their_url_and_change_no_pixel(client, tmp_path):
    from PIL import Image

    job_id = submit(client, preview_every=1, seed=11, **SLOW_REQUEST)
    previews = []
    with connect_sse(client, "GET", f"/jobs/{job_id}/events") as source:
        for event in source.iter_sse():
            data = json.loads(event.data) if event.data else {}
            if event.event == "progress" and "preview_url" in data and not previews:
                image = client.get(data["preview_url"])
                if image.status_code == 200:  # the run may have just ended
                    previews.append(image)
            if event.event in FINAL:
                break
    assert event.event == "succeeded"
    [preview] = previews
    assert preview.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(preview.content))
    # The tiny preset's VAE has a spatial stride of 8: a 128x128 video previews at 16x16.
    assert picture.size == (16, 16)
    # Gone with the run; the video is what the same request makes without previews.
    assert client.get(f"/jobs/{job_id}/preview").status_code == 404
    plain = submit(client, seed=11, **SLOW_REQUEST)
    wait_finished(client, plain)
    with_previews = client.get(f"/jobs/{job_id}/video").content
    assert with_previews == client.get(f"/jobs/{plain}/video").content
    stream = events(client, plain)
    assert all("preview_url" not in json.loads(e.data) for e in stream)


def test_a_stream_can_ask_for_the_end_only(client):
    job_id = submit(client, steps=4)
    stream = []
    with connect_sse(client, "GET", f"/jobs/{job_id}/events",
                     params={"events": "succeeded,failed,canceled"}) as source:  # fmt: skip
        stream = [event for event in source.iter_sse() if event.data]
    assert [event.event for event in stream] == ["succeeded"]
    bad = client.get(f"/jobs/{job_id}/events", params={"events": "succeeded,nope"})
    assert bad.status_code == 422 and "nope" in bad.json()["error"]["message"]
