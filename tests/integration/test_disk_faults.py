"""Full and read-only disks under the embedded API (real tmpfs mounts of a few KB): a clear job
error or a 507/503 with the JSON shape, no temporary left open or on disk, and the keep-alive
connection survives an unexpected error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from ditmem.compose import build_app
from service.local_server import running_server
from tests.embedded import embedded_settings
from tests.integration.conftest import wait_until
from tests.media import write_clip

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs, nearly filled: a few KB left for whatever is written there."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        pytest.fail(f"disk-full tests mount a tmpfs (as root): {done.stderr.strip()}")
    try:
        filler = mount / "filler"
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)  # unbuffered: fill it to the end
        try:
            while os.write(descriptor, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(descriptor)
        os.truncate(filler, max(0, filler.stat().st_size - 4096))  # then give back 4 KB
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def open_files_under(folder: Path) -> list[str]:
    links = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(folder)):
            links.append(target)
    return links


def test_a_full_results_disk_fails_the_job_clearly_and_leaves_nothing(tmp_path, tiny_disk):
    settings = embedded_settings(tmp_path, results_dir=tiny_disk / "results")
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url) as client:
        job_id = client.post("/generate", json={"prompt": "a red ball", "memory": {"k": 0},
                                                "num_frames": 17}).json()["id"]  # fmt: skip
        job = wait_until(
            lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] != "queued"
            and j["status"] != "running" and j, 120, "the job to end")  # fmt: skip
        assert job["status"] == "failed" and job["error"] == (
            "the disk is full (no space left on the device)"
        ), job
        assert sorted(p.name for p in tiny_disk.rglob("*") if p.is_file()) == ["filler"]
        assert open_files_under(tiny_disk) == []  # no descriptor kept on a deleted temporary
        assert client.get(f"/jobs/{job_id}/video").status_code == 409
        assert client.get("/healthz").status_code == 200


def test_full_and_read_only_upload_disks_answer_507_and_503(tmp_path, tiny_disk):
    noise = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    clip = write_clip(tmp_path / "big.mp4", noise)  # noise: tens of KB, more than the disk has
    assert clip.stat().st_size > 16384
    settings = embedded_settings(tmp_path, uploads_dir=tiny_disk / "uploads")
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url) as client:

        def send() -> httpx.Response:
            with open(clip, "rb") as handle:
                return client.post("/memory", files={"file": ("big.mp4", handle, "video/mp4")},
                                   data={"caption": "a red ball"})  # fmt: skip

        full = send()
        assert full.status_code == 507, full.text
        assert full.json()["error"] == {"code": "insufficient_storage",
                                        "message": "the disk is full (no space left on the device)",
                                        "details": None}  # fmt: skip
        assert [p.name for p in (tiny_disk / "uploads").iterdir()] == []  # partial removed
        subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
        read_only = send()
        assert read_only.status_code == 503, read_only.text
        assert read_only.json()["error"]["code"] == "storage_unavailable"
        assert client.get("/memory").json()["total"] == 0


def test_an_unexpected_error_keeps_the_connection(tmp_path):
    app = build_app(embedded_settings(tmp_path))
    with running_server(app) as url:

        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        app.state.ditmem.bank.search = broken
        parsed = urlparse(url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
            answers = []
            for path in ("/memory/search?q=x", "/healthz"):  # both on one connection
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))  # fmt: skip
                while len(body) < length:
                    body += sock.recv(65536)
                answers.append((int(head.split()[1]), json.loads(body)))
        assert answers[0] == (500, {"error": {"code": "internal_error",
                                              "message": "internal error; see the log",
                                              "details": None}})  # fmt: skip
        assert answers[1][0] == 200
