"""Integration fixtures: the real Redis, real Celery worker subprocesses and the API in-process.

Nothing is mocked. Each stack is a Redis db of its own plus fresh bank/results/uploads folders
shared by the in-process API (``TestClient``) and the worker subprocesses (given the same folders
through ``DITMEM_*`` variables). Leases and the broker's visibility timeout are short, so a task
whose worker was killed is delivered again within seconds.

Workers take ~15 s to start (pipeline and caption embedder load), so they are started sparingly:
``stack`` holds one worker for a whole test module; tests that kill workers build their own
``fresh_env`` and start workers with ``spawn_worker``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from ditmem.compose import build_app
from runtime.settings import Settings
from tests.embedded import LOCAL

REPO = Path(__file__).resolve().parents[2]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SHARED_DB = 14  # the module-scoped stack with its long-lived worker
FRESH_DB = 15  # function-scoped stacks (worker-less readiness, killed workers)
VISIBILITY_TIMEOUT_S = 8
JOB_LEASE_S = 4
WORKER_READY_TIMEOUT_S = 120
FINISHED = frozenset({"succeeded", "failed", "canceled"})

_worker_processes: list[WorkerProcess] = []


def redis_url(db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


# -- polling -------------------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval)


def get_job(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(
    client: TestClient,
    job_id: str,
    timeout: float = 60,
    until: Callable[[dict[str, Any]], bool] = lambda job: job["status"] in FINISHED,
    interval: float = 0.05,
) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until ``until(job)``; fail with the last record on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(client, job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} timed out after {timeout:.0f} s; last: {job}", False)
        time.sleep(interval)


def submit_generation(client: TestClient, prompt: str, **fields: Any) -> str:
    response = client.post("/generate", json={"prompt": prompt, **fields})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    return body["id"]


# -- environments and workers --------------------------------------------------------------------


@dataclass
class IntegrationEnv:
    """One Redis db and one set of folders, shared by an API and its workers."""

    root: Path
    db: int

    @property
    def redis_url(self) -> str:
        return redis_url(self.db)

    @property
    def bank_dir(self) -> Path:
        return self.root / "bank"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    def values(self) -> dict[str, str]:
        """The settings both sides use, as ``DITMEM_*`` values."""
        return {
            "preset": "tiny",
            "device": "cpu",
            "auth": "open",
            "redis_url": self.redis_url,
            "bank_dir": str(self.bank_dir),
            "results_dir": str(self.results_dir),
            "uploads_dir": str(self.uploads_dir),
            "visibility_timeout_s": str(VISIBILITY_TIMEOUT_S),
            "job_lease_s": str(JOB_LEASE_S),
            "log_level": "INFO",
        }

    def settings(self) -> Settings:
        # No .env file, and explicit values for everything the stack depends on.
        return Settings(_env_file=None, **self.values())

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def api(self) -> TestClient:
        """The API in this process; use as a context manager (runs the lifespan)."""
        return TestClient(build_app(self.settings()), base_url=LOCAL)


@dataclass
class WorkerProcess:
    """``python -m ditmem worker`` in a subprocess, logging to a file."""

    env: IntegrationEnv
    name: str
    log_path: Path
    queues: str = "generate,ingest"
    process: subprocess.Popen = field(init=False)
    started_at: float = field(init=False)

    def start(self) -> WorkerProcess:
        # Like the in-process API's Settings, the worker sees the caller's other DITMEM_* values.
        environment = dict(os.environ)
        environment.update({f"DITMEM_{k.upper()}": v for k, v in self.env.values().items()})
        environment.update(
            DITMEM_WORKER_NAME=self.name,
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(REPO), environment.get("PYTHONPATH", "")])
            ),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ditmem",
                    "--log-level",
                    "INFO",
                    "worker",
                    f"--queues={self.queues}",
                ],  # fmt: skip
                cwd=REPO,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest reaches it only through teardown
            )
        self.started_at = time.monotonic()
        _worker_processes.append(self)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> WorkerProcess:
        """Until this worker announced its loaded model in ``ditmem:workers``."""
        client = self.env.redis()
        deadline = time.monotonic() + timeout
        try:
            while client.zscore("ditmem:workers", self.name) is None:
                if not self.alive:
                    pytest.fail(
                        f"worker {self.name} exited with {self.process.returncode} before it "
                        f"was ready; log tail:\n{self.log_tail()}",
                        pytrace=False,
                    )
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"worker {self.name} not ready after {timeout:.0f} s; log tail:\n"
                        f"{self.log_tail()}",
                        pytrace=False,
                    )
                time.sleep(0.2)
        finally:
            client.close()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash or OOM kill would."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL after ``grace_s``."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(10)


def _flush(db: int) -> None:
    client = redis.Redis.from_url(redis_url(db))
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="session", autouse=True)
def _integration_redis() -> Iterator[None]:
    """The real Redis must answer; the suite's dbs are emptied before and after the session."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(
            f"integration tests need Redis at {REDIS_HOST}:{REDIS_PORT} ({error}); "
            "deselect them with -m 'not integration'",
            pytrace=False,
        )
    finally:
        client.close()
    for db in (SHARED_DB, FRESH_DB):
        _flush(db)
    yield
    for db in (SHARED_DB, FRESH_DB):
        _flush(db)


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[[IntegrationEnv], WorkerProcess]]:
    """``spawn_worker(env)`` starts a worker (not waited for); all are stopped at teardown."""
    started: list[WorkerProcess] = []

    def spawn(env: IntegrationEnv) -> WorkerProcess:
        name = f"it-{len(started)}-{uuid.uuid4().hex[:8]}"
        worker = WorkerProcess(env, name, tmp_path / "logs" / f"{name}.log").start()
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.stop()


@pytest.fixture
def fresh_env(tmp_path: Path) -> Iterator[IntegrationEnv]:
    """A stack of this test only: empty Redis db ``FRESH_DB`` and new folders; no worker."""
    _flush(FRESH_DB)
    yield IntegrationEnv(tmp_path / "stack", FRESH_DB)
    _flush(FRESH_DB)


@dataclass
class Stack:
    """An environment with one running worker and the API client."""

    env: IntegrationEnv
    worker: WorkerProcess
    client: TestClient


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker and one API for a module (db ``SHARED_DB``, folders of this module)."""
    _flush(SHARED_DB)
    env = IntegrationEnv(tmp_path_factory.mktemp("stack"), SHARED_DB)
    worker = WorkerProcess(env, f"it-shared-{uuid.uuid4().hex[:8]}", env.root / "worker.log")
    worker.start()
    try:
        worker.wait_ready()
        with env.api() as client:
            yield Stack(env, worker, client)
    finally:
        worker.stop()
        _flush(SHARED_DB)


@pytest.fixture
def idle_stack(stack: Stack) -> Stack:
    """``stack`` once its worker has nothing queued, so a new job starts right away."""
    if not stack.worker.alive:
        pytest.fail(f"the shared worker died; log tail:\n{stack.worker.log_tail()}", False)
    client = stack.env.redis()
    try:
        wait_until(
            lambda: client.llen("generate") == 0 and client.llen("ingest") == 0,
            30,
            "the shared worker's queues to drain",
        )
    finally:
        client.close()
    return stack


# -- worker logs in failure reports --------------------------------------------------------------

_TEST_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_STARTED] = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    began = item.stash.get(_TEST_STARTED, 0.0)
    for worker in _worker_processes:
        if worker.alive or worker.started_at >= began:
            state = "running" if worker.alive else f"exited {worker.process.returncode}"
            report.sections.append(
                (f"worker {worker.name} (pid {worker.pid}, {state}) log tail", worker.log_tail())
            )
