"""Upload bounds against a real server on a socket: a chunked body over the size limit is
answered 413 while it still streams (and the rest is never read), and uploads beyond
DITMEM_MAX_CONCURRENT_UPLOADS are refused with 429 and Retry-After before their body is read."""

from __future__ import annotations

import json
import select
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from ditmem.compose import build_app
from service.local_server import running_server
from tests.embedded import embedded_settings

LIMIT_MB = 1
BOUNDARY = "ditmemboundary"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("limits")
    app = build_app(embedded_settings(root, max_upload_mb=LIMIT_MB, max_concurrent_uploads=2))
    with running_server(app) as url:
        yield url


def _connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=10)


def _upload_head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /memory HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()


def _part_head() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="caption"\r\n\r\nbig\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_a_chunked_upload_over_the_limit_is_cut_off_with_413(server):
    sock = _connect(server)
    sock.sendall(_upload_head(None))
    chunk = b"\0" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, answered = 0, False
    first = _part_head()
    sock.sendall(f"{len(first):x}\r\n".encode() + first + b"\r\n")
    while sent < 60 * 2**20:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            answered = True
            break
        try:
            sock.sendall(framed)
        except (BrokenPipeError, ConnectionResetError):
            answered = True
            break
        sent += len(chunk)
    assert answered, "the server read all 60 MiB"
    assert sent < (LIMIT_MB + 4) * 2**20  # stopped right after the limit, not at the end
    status, headers, body = _response(sock)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "upload_too_large"
    sock.close()
    assert httpx.get(f"{server}/healthz").status_code == 200  # and it serves on


def test_uploads_beyond_the_concurrency_bound_get_429(server):
    # Two uploads that send their headers and a little body, then stall: both are in flight.
    stalled = []
    for _ in range(2):
        sock = _connect(server)
        sock.sendall(_upload_head(200_000) + _part_head() + b"\0" * 1000)
        stalled.append(sock)
    time.sleep(0.5)
    refused = httpx.post(f"{server}/memory", files={"file": ("a.mp4", b"x", "video/mp4")},
                         data={"caption": "x"})  # fmt: skip
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "too_many_uploads"
    for sock in stalled:
        sock.close()
    deadline = time.monotonic() + 10
    while True:  # the stalled uploads end once their connections are gone
        after = httpx.post(f"{server}/memory", files={"file": ("a.mp4", b"x", "video/mp4")},
                           data={"caption": "x"})  # fmt: skip
        if after.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after.status_code == 422  # received and probed: not a video
    assert httpx.get(f"{server}/memory").json()["total"] == 0
