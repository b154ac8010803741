"""The API with its files in an S3-protocol bucket (moto's server over real HTTP): uploads, the
bank's latents and the result videos never touch the local folders, and videos download with
HTTP Range through the API or from a presigned URL."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient

from ditmem.compose import build_app
from model.video_io import read_video
from tests.embedded import LOCAL, embedded_settings
from tests.media import moving_square, write_clip
from tests.s3 import MotoServer, moto_server
from tests.unit.service.test_api_embedded import upload, wait

PREFIX = "fleet"


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


def keys(s3: MotoServer, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{PREFIX}/{prefix}")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def local_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and "index" not in p.parts]


def settings_for(root: Path, s3: MotoServer, **overrides):
    return embedded_settings(
        root, storage_url=f"s3://{s3.bucket}/{PREFIX}", s3_endpoint_url=s3.endpoint_url,
        **overrides,
    )  # fmt: skip


def test_uploads_bank_files_and_videos_live_in_the_bucket(tmp_path: Path, s3: MotoServer):
    root = tmp_path / "host"
    clip = write_clip(tmp_path / "red.mp4", moving_square("red", 1))
    with TestClient(build_app(settings_for(root, s3)), base_url=LOCAL) as client:
        accepted = upload(client, clip, "a red square moving right")
        assert accepted.status_code == 202, accepted.text
        ingest = wait(client, accepted.json()["id"])
        assert ingest["status"] == "succeeded", ingest
        clip_id = ingest["result"]["clip_id"]
        # The clip's latent, and the index snapshots every host starts from.
        assert {k.split("/")[2] for k in keys(s3, "bank/")} == {"latents", "index"}
        assert keys(s3, "uploads/") == []  # consumed by the ingest

        job_id = client.post(
            "/generate", json={"prompt": "a red square", "memory": {"clip_ids": [clip_id]}}
        ).json()["id"]
        job = wait(client, job_id)
        assert job["status"] == "succeeded", job
        assert keys(s3, "results/") == [
            f"{PREFIX}/results/{job_id}-a1.json", f"{PREFIX}/results/{job_id}-a1.mp4"
        ]  # fmt: skip

        whole = client.get(f"/jobs/{job_id}/video")
        assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
        (tmp_path / "whole.mp4").write_bytes(whole.content)
        assert read_video(tmp_path / "whole.mp4").shape == (9, 64, 64, 3)
        size = len(whole.content)
        part = client.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == whole.content[10:100]
        assert part.headers["content-range"] == f"bytes 10-99/{size}"
        tail = client.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=-16"})
        assert tail.status_code == 206 and tail.content == whole.content[-16:]
        beyond = client.get(f"/jobs/{job_id}/video", headers={"Range": f"bytes={size}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"

        poster = client.get(f"/memory/{clip_id}/poster")  # from the manifest: no file at all
        assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"
    # The host's own folders hold only the manifest and the index: nothing another host needs.
    assert [p.name for p in local_files(root)] == ["manifest.sqlite3"]


def test_presigned_downloads_redirect_to_the_bucket(tmp_path: Path, s3: MotoServer):
    settings = settings_for(tmp_path / "host", s3, presigned_downloads=True, presigned_ttl_s=60)
    with TestClient(build_app(settings), base_url=LOCAL, follow_redirects=False) as client:
        job_id = client.post("/generate", json={"prompt": "a ball", "memory": {"k": 0}}).json()[
            "id"
        ]
        assert wait(client, job_id)["status"] == "succeeded"
        redirect = client.get(f"/jobs/{job_id}/video")
        assert redirect.status_code == 307
        location = redirect.headers["location"]
        assert location.startswith(s3.endpoint_url) and "Signature" in location
        with urllib.request.urlopen(location, timeout=10) as response:  # a plain HTTP client
            body = response.read()
        (tmp_path / "presigned.mp4").write_bytes(body)
        assert read_video(tmp_path / "presigned.mp4").shape[0] == 9
        # Someone else's job stays unreachable: the auth check comes before any redirect.
        assert client.get("/jobs/0123456789abcdef/video").status_code == 404
