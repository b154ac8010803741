"""A real S3 server for tests: moto's standalone server, run as a subprocess on 127.0.0.1.

Code under test talks to it over HTTP exactly as it would to MinIO or AWS. The server is started
fresh, with a bucket already created; a server that cannot start fails the test with its log:
it is never skipped.

    with moto_server() as (endpoint_url, bucket):
        storage = S3Storage(bucket, endpoint_url=endpoint_url)

While the server runs, the process environment holds test credentials and region (boto3's
standard chain reads them) and no AWS profile, config file or endpoint override of the user's;
everything is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

ACCESS_KEY = "ditmem-test-access-key"
SECRET_KEY = "ditmem-test-secret-key"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0


class MotoServer(NamedTuple):
    endpoint_url: str
    bucket: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _environment(folder: Path) -> Iterator[None]:
    """Test credentials in ``os.environ`` for the block, the user's AWS settings hidden."""
    values = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
    }
    hidden = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    saved = {name: os.environ.get(name) for name in (*values, *hidden)}
    os.environ.update(values)
    for name in hidden:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # an HTTP error status is still an answer
    except OSError:
        return False
    return True


def _start(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server on a free port; fails the test if it does not answer in time."""
    port = _free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(endpoint_url):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            output = log_path.read_text(errors="replace")[-4000:]
            pytest.fail(
                f"moto's S3 server did not start on {endpoint_url} (exit status "
                f"{process.returncode}); install the test extras (moto[server]). Its output:\n"
                f"{output}",
                pytrace=False,
            )
        time.sleep(0.1)
    return process, endpoint_url


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def moto_server(bucket: str | None = None) -> Iterator[MotoServer]:
    """Run moto's S3 server with ``bucket`` (default: a random name) created in it; yields
    ``(endpoint_url, bucket)`` and stops the server afterwards."""
    import boto3

    bucket = bucket or f"ditmem-test-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="ditmem-moto-") as scratch:
        folder = Path(scratch)
        with _environment(folder):
            process, endpoint_url = _start(folder / "moto.log")
            try:
                client = boto3.client(
                    "s3",
                    endpoint_url=endpoint_url,
                    region_name=REGION,
                    aws_access_key_id=ACCESS_KEY,
                    aws_secret_access_key=SECRET_KEY,
                )
                client.create_bucket(Bucket=bucket)
                with contextlib.closing(client):
                    yield MotoServer(endpoint_url, bucket)
            finally:
                _stop(process)
