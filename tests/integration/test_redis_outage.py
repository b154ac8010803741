"""A Redis outage under a running API: job endpoints answer 503 with the JSON error shape and
Retry-After, the memory bank keeps answering, /readyz names the failing check, /metrics still
renders, nothing is left behind, and everything works again once Redis is back.

The Redis is a private ``redis-server`` this test starts and kills (the shared one stays up).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import IntegrationEnv, wait_until
from tests.media import moving_square, write_clip

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateRedis:
    def __init__(self, port: int, folder: Path) -> None:
        self.port, self.folder = port, folder
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (the outage test starts its own)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(answers, 20, "the private redis-server")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


@dataclass
class PrivateRedisEnv(IntegrationEnv):
    port: int = 0

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[tuple[PrivateRedisEnv, PrivateRedis]]:
    port = _free_port()
    server = PrivateRedis(port, tmp_path)
    server.start()
    try:
        yield PrivateRedisEnv(tmp_path / "stack", 0, port=port), server
    finally:
        server.kill()


def test_a_redis_outage_degrades_cleanly(outage, tmp_path: Path) -> None:
    env, server = outage
    clip = write_clip(tmp_path / "red.mp4", moving_square("red", 1))
    with env.api() as client:
        assert client.get("/jobs").status_code == 200
        server.kill()

        for method, path, kwargs in (
            ("GET", "/jobs", {}),
            ("POST", "/generate", {"json": {"prompt": "a red ball"}}),
        ):
            response = client.request(method, path, **kwargs)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"]["code"] == "job_store_unavailable"
            assert int(response.headers["retry-after"]) > 0
        with open(clip, "rb") as handle:
            uploaded = client.post("/memory", files={"file": ("red.mp4", handle, "video/mp4")},
                                   data={"caption": "a red ball"})  # fmt: skip
        assert uploaded.status_code == 503 and uploaded.json()["error"]["code"]
        assert [p for p in env.uploads_dir.rglob("*") if p.is_file()] == []  # nothing left

        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["failing"][0] == "job_store"
        assert client.get("/metrics").status_code == 200
        # The bank needs no Redis: listing and search go on.
        assert client.get("/memory").status_code == 200
        assert client.get("/memory/search", params={"q": "a red ball"}).status_code == 200

        server.start()  # Redis is back: the same process serves jobs again
        wait_until(lambda: client.get("/jobs").status_code == 200, 30, "the API to reconnect")
        assert client.post("/generate", json={"prompt": "a red ball"}).status_code == 202
        assert client.get("/readyz").json()["failing"] == ["workers"]  # none started here
