"""The HTTP API in embedded mode: the real app, the real runner on its thread, tiny preset."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ditmem.compose import build_app
from model.video_io import read_video
from runtime.keys import ApiKey, hash_key
from tests.embedded import LOCAL, SLOW_REQUEST, embedded_settings
from tests.media import moving_square, write_clip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def client(root: Path):
    with TestClient(
        build_app(embedded_settings(root, max_upload_mb=2)), base_url=LOCAL
    ) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def clip(root: Path) -> Path:
    return write_clip(root / "red.mp4", moving_square("red", 1))


def wait(
    client: TestClient,
    job_id: str,
    until=lambda job: job["status"] not in ("queued", "running"),
    timeout=120.0,
    headers=None,
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if until(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def upload(client: TestClient, path: Path, caption: str, headers=None, **fields) -> dict:
    with open(path, "rb") as handle:
        response = client.post(
            "/memory",
            files={"file": (path.name, handle, "video/mp4")},
            data={"caption": caption, **fields},
            headers=headers,
        )
    return response


@pytest.fixture(scope="module")
def clip_id(client: TestClient, clip: Path) -> int:
    response = upload(client, clip, "a red ball rolling to the right", tags="demo,red")
    assert response.status_code == 202, response.text
    job = wait(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job["result"]["clip_id"]


def test_upload_appears_in_listing_search_and_has_a_poster(client, clip_id):
    listed = client.get("/memory").json()
    assert [c["clip_id"] for c in listed["items"]] == [clip_id]
    assert listed["items"][0]["tags"] == ["demo", "red"]
    hits = client.get("/memory/search", params={"q": "a red ball", "k": 3}).json()["hits"]
    assert hits[0]["clip_id"] == clip_id and hits[0]["score"] > 0.5
    detail = client.get(f"/memory/{clip_id}").json()
    poster = client.get(detail["poster_url"])
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    assert poster.content[:2] == b"\xff\xd8"
    assert listed["total"] == 1 and listed["next_cursor"] is None
    older = client.get("/memory", params={"cursor": clip_id}).json()
    assert older["items"] == [] and older["next_cursor"] is None
    assert client.get("/memory", params={"tag": "red"}).json()["total"] is None  # never counted
    huge = client.get("/memory", params={"cursor": 2**63})  # past SQLite's integers
    assert huge.status_code == 422 and "cursor" in huge.json()["error"]["message"]
    offset = client.get("/memory", params={"offset": 10})
    assert offset.status_code == 422 and "cursor" in offset.json()["error"]["message"]


def test_generate_with_retrieved_memory_and_download_the_video(client, clip_id, tmp_path):
    accepted = client.post(
        "/generate", json={"prompt": "a red ball", "memory": {"k": 1}, "seed": 4}
    )
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["links"]["self"] == f"/jobs/{body['id']}"
    job = wait(client, body["id"])

    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["step"] == job["total_steps"] == 2
    assert [m["clip_id"] for m in job["memory_used"]] == [clip_id]
    assert job["result"]["seed"] == 4
    video = client.get(body["links"]["video"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(video.content)
    assert read_video(path).shape == (9, 64, 64, 3)
    partial = client.get(body["links"]["video"], headers={"Range": "bytes=0-99"})
    assert partial.status_code == 206 and len(partial.content) == 100
    assert partial.content == video.content[:100]


def test_the_reference_profile_fills_the_references_defaults(client):
    accepted = client.post("/generate", json={"prompt": "a red ball", "profile": "reference"})
    assert accepted.status_code == 202, accepted.text
    job = wait(client, accepted.json()["id"])
    assert job["status"] == "succeeded", job
    params = job["params"]
    assert params["profile"] == "reference"
    # The tiny preset's reference schedule (4 steps), guidance 5 and memory in both branches.
    assert (params["steps"], params["guidance_scale"], params["memory_guidance"]) == (4, 5.0, False)
    assert job["total_steps"] == 4
    plain = client.post("/generate", json={"prompt": "a red ball", "memory": {"k": 0}}).json()
    assert wait(client, plain["id"])["params"]["profile"] == "default"


def test_a_step_cache_is_a_parameter_of_the_job(client):
    body = {"prompt": "a red ball", "memory": {"k": 0}, "cache": {"kind": "first-block"}}
    job = wait(client, client.post("/generate", json=body).json()["id"])
    assert job["status"] == "succeeded", job
    assert job["params"]["cache"] == {"kind": "first-block", "threshold": 0.05, "interval": None}
    for cache, resolved in (
        ({"kind": "mag", "threshold": 0.2}, {"kind": "mag", "threshold": 0.2, "interval": None}),
        ({"kind": "taylorseer"}, {"kind": "taylorseer", "threshold": None, "interval": 2}),
    ):
        body = {"prompt": "a red ball", "memory": {"k": 0}, "cache": cache}
        job = wait(client, client.post("/generate", json=body).json()["id"])
        assert job["status"] == "succeeded", job
        assert job["params"]["cache"] == resolved
    plain = wait(client, client.post("/generate", json={"prompt": "x", "memory": {"k": 0}})
                 .json()["id"])  # fmt: skip
    assert plain["params"]["cache"] == {"kind": "none", "threshold": None, "interval": None}


def test_pinned_clips_are_used_instead_of_retrieval(client, clip_id):
    accepted = client.post(
        "/generate", json={"prompt": "anything", "memory": {"clip_ids": [clip_id]}}
    )
    job = wait(client, accepted.json()["id"])
    assert job["status"] == "succeeded"
    assert [m["clip_id"] for m in job["memory_used"]] == [clip_id]
    off = wait(
        client, client.post("/generate", json={"prompt": "x", "memory": {"k": 0}}).json()["id"]
    )
    assert off["memory_used"] == []


def test_cancel_running_and_queued_jobs(client):
    running = client.post("/generate", json={"prompt": "long one", **SLOW_REQUEST}).json()["id"]
    queued = client.post("/generate", json={"prompt": "waits", **SLOW_REQUEST}).json()["id"]
    wait(client, running, until=lambda job: job["status"] == "running" and job["step"] >= 1)

    assert client.get(f"/jobs/{queued}").json()["status"] == "queued"
    assert client.delete(f"/jobs/{queued}").json()["status"] == "canceled"
    client.delete(f"/jobs/{running}")
    stopped = wait(client, running)
    assert stopped["status"] == "canceled"
    assert stopped["step"] < stopped["total_steps"]
    never = wait(client, queued)
    assert never["status"] == "canceled" and never["started_at"] is None
    assert client.get(f"/jobs/{running}/video").status_code == 409


def test_a_cancelled_queued_ingest_leaves_no_upload_behind(client, root, tmp_path):
    running = client.post("/generate", json={"prompt": "long one", **SLOW_REQUEST}).json()["id"]
    wait(client, running, until=lambda job: job["status"] == "running")
    clip = write_clip(tmp_path / "queued.mp4", moving_square("green", 1, num_frames=14))
    queued = upload(client, clip, "waits behind the generation").json()["id"]
    assert client.get(f"/jobs/{queued}").json()["status"] == "queued"
    assert len(list((root / "uploads").iterdir())) == 1  # stored, waiting for the worker
    assert client.delete(f"/jobs/{queued}").json()["status"] == "canceled"
    assert list((root / "uploads").iterdir()) == []
    client.delete(f"/jobs/{running}")
    wait(client, running)


def test_video_of_an_unfinished_job_is_409(client):
    job_id = client.post("/generate", json={"prompt": "slow", **SLOW_REQUEST}).json()["id"]
    response = client.get(f"/jobs/{job_id}/video")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_not_finished"
    client.delete(f"/jobs/{job_id}")
    wait(client, job_id)


def test_jobs_are_listed_newest_first(client):
    page = client.get("/jobs", params={"limit": 2}).json()
    assert page["total"] >= 2 and len(page["items"]) == 2
    assert page["items"][0]["created_at"] >= page["items"][1]["created_at"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "steps": 99}, "steps"),
        ({"prompt": "x", "num_frames": 10}, "num_frames"),
        ({"prompt": "x", "width": 70}, "width"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "memory_guidance": "maybe"}, "memory_guidance"),
        ({"prompt": "x", "profile": "fast"}, "profile"),
        ({"prompt": "x", "cache": {"kind": "tea"}}, "cache"),
        ({"prompt": "x", "cache": {"kind": "taylorseer", "threshold": 0.1}}, "cache"),
        ({"prompt": "x", "profile": "reference", "cache": {"kind": "mag"}}, "cache"),
        ({"prompt": "x", "cache": {"kind": "first-block", "threshold": 2}}, "cache"),
        ({"prompt": "x", "memory": {"k": 17}}, "memory.k"),
        ({"prompt": "x", "memory": {"min_score": 2}}, "memory.min_score"),
        ({"prompt": "x", "colour": "red"}, "colour"),
    ],
)
def test_bad_generate_requests_are_422_naming_the_field(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert field in error["message"] or any(
        field == d.get("field") for d in _as_list(error["details"])
    )


def _as_list(details) -> list[dict]:
    return details if isinstance(details, list) else [details or {}]


def test_unknown_ids_are_404_with_the_error_shape(client):
    for path in ("/jobs/nope", "/jobs/nope/video", "/memory/999999", "/memory/999999/poster"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"].endswith("not_found")
    assert client.delete("/memory/999999").status_code == 404
    pinned = client.post("/generate", json={"prompt": "x", "memory": {"clip_ids": [999999]}})
    assert pinned.status_code == 404 and "999999" in pinned.json()["error"]["message"]


def test_bad_uploads_are_rejected_and_store_nothing(client, root, clip):
    before = client.get("/memory").json()["total"]
    text = client.post(
        "/memory", files={"file": ("a.txt", b"hello", "text/plain")}, data={"caption": "x"}
    )
    assert text.status_code == 415
    garbage = client.post(
        "/memory", files={"file": ("a.mp4", b"\x00" * 5000, "video/mp4")}, data={"caption": "x"}
    )
    assert garbage.status_code == 422 and "a.mp4" in garbage.json()["error"]["message"]
    big = client.post(
        "/memory",
        files={"file": ("big.mp4", b"\x00" * (3 * 2**20), "video/mp4")},
        data={"caption": "x"},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "upload_too_large"
    png = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(png, format="PNG")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(jpeg, format="JPEG")
    for name, data, declared in (
        ("still.mp4", png.getvalue(), "video/mp4"),  # a PNG named and declared as a video
        ("photo", jpeg.getvalue(), "application/octet-stream"),
    ):
        still = client.post(
            "/memory", files={"file": (name, data, declared)}, data={"caption": "x"}
        )
        assert still.status_code == 415, still.text
        message = still.json()["error"]["message"]
        assert message.startswith(f"{name}: a still image") and "upload a video" in message
    nul = client.post(
        "/memory", files={"file": ("a\x00b.mp4", b"\x00" * 5000, "video/mp4")},
        data={"caption": "x"},
    )  # fmt: skip
    assert nul.status_code == 422, nul.text  # named without the NUL, not a 500
    assert "b.mp4: cannot be decoded" in nul.json()["error"]["message"]
    assert "\x00" not in nul.json()["error"]["message"]
    assert upload(client, clip, "   ").status_code == 422
    no_caption = client.post("/memory", files={"file": ("a.mp4", clip.read_bytes(), "video/mp4")})
    assert no_caption.status_code == 422
    assert client.get("/memory").json()["total"] == before
    assert list((root / "uploads").iterdir()) == []


def test_health_readiness_and_metrics(client, clip_id):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["mode"] == "embedded"
    assert ready.json()["checks"]["placement"] == "none"  # no offload, no quantisation
    metrics = client.get("/metrics").text
    assert "ditmem_job_duration_seconds_count" in metrics
    count = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("ditmem_job_duration_seconds_count")
    )
    assert count >= 2
    assert 'ditmem_queue_depth{queue="embedded"}' in metrics
    assert "ditmem_retrieval_seconds_bucket" in metrics


def test_openapi_schema_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/generate",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/video",
        "/memory",
        "/memory/search",
        "/memory/{clip_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path


# -- auth ---------------------------------------------------------------------------------------

ALICE, BOB, CAROL, ROOT = "alice-secret-key", "bob-secret-key", "carol-key", "root-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    settings = embedded_settings(
        root,
        auth="keys",
        max_queued_per_key=1,
        api_keys=[
            ApiKey(name="alice", sha256=hash_key(ALICE), scopes={"read", "write"}),
            ApiKey(name="bob", sha256=hash_key(BOB), scopes={"read"}),
            ApiKey(name="carol", sha256=hash_key(CAROL), scopes={"read", "write"}),
            ApiKey(name="root", sha256=hash_key(ROOT), scopes={"read", "write", "admin"}),
        ],
    )
    with TestClient(build_app(settings), base_url=LOCAL) as test_client:
        yield test_client


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_and_scoped(keyed, clip):
    assert keyed.get("/jobs").status_code == 401
    assert keyed.get("/jobs", headers=bearer("wrong")).status_code == 401
    assert keyed.get("/jobs", headers=bearer("wrong")).json()["error"]["code"] == "unauthorized"
    assert upload(keyed, clip, "a red ball", headers=bearer(BOB)).status_code == 403
    assert upload(keyed, clip, "a red ball", headers=bearer(ALICE)).status_code == 202
    assert keyed.get("/healthz").status_code == 200  # probes need no key


def test_a_clip_is_deleted_by_its_owner_or_an_admin_only(keyed, tmp_path):
    def add(colour: str) -> int:
        path = write_clip(tmp_path / f"{colour}.mp4", moving_square(colour, -1))
        accepted = upload(keyed, path, f"a {colour} ball", headers=bearer(ALICE))
        job = wait(keyed, accepted.json()["id"], headers=bearer(ALICE))
        assert job["status"] == "succeeded", job
        return job["result"]["clip_id"]

    first, second = add("green"), add("yellow")
    assert keyed.get(f"/memory/{first}", headers=bearer(BOB)).json()["owner"] == "alice"
    refused = keyed.delete(f"/memory/{first}", headers=bearer(CAROL))  # write, not the owner
    assert refused.status_code == 403 and "added by 'alice'" in refused.json()["error"]["message"]
    assert keyed.delete(f"/memory/{first}", headers=bearer(BOB)).status_code == 403  # read only
    assert keyed.get(f"/memory/{first}", headers=bearer(BOB)).status_code == 200  # still there
    assert keyed.delete(f"/memory/{first}", headers=bearer(ALICE)).status_code == 200
    assert keyed.delete(f"/memory/{second}", headers=bearer(ROOT)).status_code == 200
    assert keyed.get(f"/memory/{second}", headers=bearer(BOB)).status_code == 404


def test_a_key_sees_only_its_own_jobs(keyed):
    mine = keyed.post("/generate", json={"prompt": "alice's"}, headers=bearer(ALICE)).json()["id"]
    wait(keyed, mine, headers=bearer(ALICE))
    assert keyed.get(f"/jobs/{mine}", headers=bearer(BOB)).status_code == 404
    assert keyed.delete(f"/jobs/{mine}", headers=bearer(BOB)).status_code == 404
    assert keyed.get(f"/jobs/{mine}/video", headers=bearer(BOB)).status_code == 404
    assert keyed.get("/jobs", headers=bearer(BOB)).json()["total"] == 0
    assert mine in [j["id"] for j in keyed.get("/jobs", headers=bearer(ALICE)).json()["items"]]


def test_queued_jobs_per_key_are_bounded_with_retry_after(keyed):
    first = keyed.post(
        "/generate", json={"prompt": "runs", **SLOW_REQUEST}, headers=bearer(BOB)
    ).json()["id"]
    wait(keyed, first, until=lambda job: job["status"] == "running", headers=bearer(BOB))
    second = keyed.post("/generate", json={"prompt": "queued", **SLOW_REQUEST}, headers=bearer(BOB))
    assert second.status_code == 202
    third = keyed.post("/generate", json={"prompt": "too many"}, headers=bearer(BOB))
    assert third.status_code == 429
    assert int(third.headers["Retry-After"]) > 0
    # Another key is not affected by bob's queue.
    other = keyed.post("/generate", json={"prompt": "alice", "steps": 1}, headers=bearer(ALICE))
    assert other.status_code == 202
    for job_id in (first, second.json()["id"]):
        keyed.delete(f"/jobs/{job_id}", headers=bearer(BOB))
        wait(keyed, job_id, headers=bearer(BOB))


def test_responses_carry_the_security_headers(client):
    for path in ("/", "/static/app.js", "/memory", "/jobs/nope"):
        response = client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff", path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "unsafe-inline" not in policy
    docs = client.get("/docs")  # Swagger UI's own inline script and CDN assets still load
    assert docs.status_code == 200
    assert docs.headers["content-security-policy"] == "frame-ancestors 'none'"


def test_foreign_hosts_and_cross_site_writes_are_refused(client, clip):
    before = client.get("/memory").json()["total"]
    rebound = client.get("/memory", headers={"Host": "attacker.example"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    with open(clip, "rb") as handle:
        files = {"file": ("red.mp4", handle.read(), "video/mp4")}
    for headers in ({"Origin": "https://evil.example"},
                    {"Referer": "https://evil.example/page.html"}):  # fmt: skip
        forged = client.post("/memory", files=files, data={"caption": "x"}, headers=headers)
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "cross_origin"
        assert client.delete("/memory/1", headers=headers).status_code == 403
    own = client.post("/generate", json={"prompt": "x", "steps": 1},
                      headers={"Origin": "http://localhost"})  # fmt: skip
    assert own.status_code == 202  # the UI's own requests carry its own origin
    assert client.get("/memory", headers={"Origin": "https://evil.example"}).status_code == 200
    assert client.get("/memory").json()["total"] == before  # nothing was stored or deleted


def test_allowed_origins_and_hosts_are_settings(tmp_path):
    settings = embedded_settings(
        tmp_path, allowed_hosts=["api.example.org"], allowed_origins=["https://ui.example.org"]
    )
    with TestClient(build_app(settings), base_url="http://api.example.org") as other:
        assert other.get("/healthz").status_code == 200
        assert other.get("/healthz", headers={"Host": "localhost"}).status_code == 400
        ui = {"Origin": "https://ui.example.org"}
        assert (
            other.post("/generate", json={"prompt": "x", "steps": 1}, headers=ui).status_code == 202
        )


def test_a_rejected_ingest_names_the_users_file(tmp_path, clip):
    with TestClient(build_app(embedded_settings(tmp_path, max_clip_duration_s=0.5)),
                    base_url=LOCAL) as short:  # fmt: skip
        accepted = upload(short, clip, "too long for this bank")
        job = wait(short, accepted.json()["id"])
        assert job["status"] == "failed"
        assert job["error"].startswith(f"{clip.name} lasts"), job["error"]
        assert accepted.json()["id"] not in job["error"]
        assert list((tmp_path / "uploads").iterdir()) == []


def test_a_video_deleted_behind_the_api_is_410(client, root):
    job_id = client.post("/generate", json={"prompt": "x", "steps": 1, "memory": {"k": 0}})
    job = wait(client, job_id.json()["id"])
    assert client.get(f"/jobs/{job['id']}/video").status_code == 200
    for stored in (root / "results").glob(f"{job['id']}-a*.mp4"):
        stored.unlink()
    gone = client.get(f"/jobs/{job['id']}/video")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "video_gone"
