"""``Idempotency-Key`` on ``POST /generate`` and ``POST /memory`` (embedded mode, a real socket
for the race): a retry returns the first job, another body under the key is a 409, parallel
duplicates make one job, and a failed first request leaves the key usable."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ditmem.compose import build_app
from service.local_server import running_server
from tests.embedded import embedded_settings
from tests.media import moving_square, write_clip

BODY = {"prompt": "a red ball", "memory": {"k": 0}, "steps": 1, "seed": 3}


def race(url: str, path: str = "/generate", copies: int = 20, **request) -> list[httpx.Response]:
    """``copies`` identical submissions at once, each on its own connection."""

    def submit(_: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as client:
            return client.post(path, **request)

    with ThreadPoolExecutor(copies) as pool:
        return list(pool.map(submit, range(copies)))


def check_one_job_for_many_submits(url: str) -> None:
    headers = {"Idempotency-Key": "race-1"}
    answers = race(url, json=BODY, headers=headers)
    assert {answer.status_code for answer in answers} <= {200, 202}, [a.text for a in answers]
    assert sorted(answer.status_code for answer in answers).count(202) == 1
    assert len({answer.json()["id"] for answer in answers}) == 1
    replayed = [a for a in answers if a.status_code == 200]
    assert all(a.headers["idempotent-replayed"] == "true" for a in replayed)
    with httpx.Client(base_url=url) as client:
        listed = client.get("/jobs", params={"limit": 200}).json()["items"]
    assert [job["id"] for job in listed].count(answers[0].json()["id"]) == 1
    assert len(listed) == 1


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    settings = embedded_settings(tmp_path_factory.mktemp("idem"), max_queued_per_key=100)
    with running_server(build_app(settings)) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def test_twenty_parallel_identical_submits_make_one_job(tmp_path):
    settings = embedded_settings(tmp_path, max_queued_per_key=100)
    with running_server(build_app(settings)) as url:
        check_one_job_for_many_submits(url)


def test_a_retry_returns_the_first_job_and_another_body_is_409(client):
    headers = {"Idempotency-Key": "retry-1"}
    first = client.post("/generate", json=BODY, headers=headers)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = client.post("/generate", json=BODY, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post("/generate", json=BODY | {"seed": 4}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # Without a key every submit is a job of its own; another key is another job.
    assert client.post("/generate", json=BODY).json()["id"] != first.json()["id"]
    fresh = client.post("/generate", json=BODY, headers={"Idempotency-Key": "retry-2"})
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]


def test_a_refused_first_request_leaves_the_key_usable(client):
    headers = {"Idempotency-Key": "refused-1"}
    refused = client.post("/generate", json=BODY | {"steps": 99}, headers=headers)
    assert refused.status_code == 422
    # The key made no job: the corrected request under the same key...
    corrected = client.post("/generate", json=BODY | {"steps": 2}, headers=headers)
    # ...is another body, yet the refused one never reserved it for good.
    assert corrected.status_code == 202, corrected.text


def test_bad_keys_are_422(client):
    for key in (b"", b"x" * 256, "caf\u00e9".encode()):
        response = client.post("/generate", json=BODY, headers={"Idempotency-Key": key})
        assert response.status_code == 422, (key, response.text)
        assert response.json()["error"]["code"] in ("invalid_idempotency_key", "validation_error")


def test_an_upload_retried_with_its_key_is_one_ingest(client, tmp_path: Path):
    clip = write_clip(tmp_path / "red.mp4", moving_square("red", 1))
    headers = {"Idempotency-Key": "upload-1"}

    def upload(caption: str = "a red square") -> httpx.Response:
        with open(clip, "rb") as handle:
            return client.post("/memory", files={"file": ("red.mp4", handle, "video/mp4")},
                               data={"caption": caption}, headers=headers)  # fmt: skip

    first, again = upload(), upload()
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert upload("another caption").status_code == 409
    jobs = client.get("/jobs", params={"limit": 200}).json()["items"]
    assert [job["id"] for job in jobs if job["kind"] == "ingest"] == [first.json()["id"]]
