"""`POST /generate` throughput and latency at rising load, against a bare FastAPI endpoint.

Starts the real API (Redis job store + Celery dispatch) in a uvicorn subprocess, a real worker
subprocess kept busy with generations, and a load generator in this process. The same server
also mounts a bare ``POST /bare`` endpoint (parses a small JSON body, returns 202) so the ratio
isolates what ditmem adds: validation against the preset, the Redis job record, the Celery send.

    python -m bench.api_load [--requests 400] [--levels 1 4 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/13"
PORT = 8765

SERVER = """
import sys
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from ditmem.compose import build_app
from runtime.settings import Settings

class Body(BaseModel):
    prompt: str

app = build_app(Settings())

@app.post("/bare", status_code=202)
def bare(body: Body) -> dict:
    return {"id": "x", "status": "queued"}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


async def _load(url: str, payload: dict, concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(total):
            queue.put_nowait(index)

        async def user() -> None:
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(url, json=payload)
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_s": total / elapsed,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "statuses": statuses,
    }


def _wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    redis.Redis.from_url(REDIS_URL).flushdb()

    with tempfile.TemporaryDirectory() as scratch:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "DITMEM_PRESET": "tiny",
            "DITMEM_REDIS_URL": REDIS_URL,
            "DITMEM_BANK_DIR": f"{scratch}/bank",
            "DITMEM_RESULTS_DIR": f"{scratch}/results",
            "DITMEM_UPLOADS_DIR": f"{scratch}/uploads",
            "DITMEM_MAX_QUEUED_PER_KEY": "1000000",
        }
        log = open(Path(scratch) / "processes.log", "w")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(PORT)], cwd=REPO, env=env, stdout=log, stderr=log
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "service", "worker"], cwd=REPO, env=env, stdout=log, stderr=log
        )
        base = f"http://127.0.0.1:{PORT}"
        try:
            _wait_ready(f"{base}/readyz")
            # Keep the worker busy for the whole run: a few slow generations up front.
            slow = {
                "prompt": "keep busy",
                "num_frames": 17,
                "width": 128,
                "height": 128,
                "steps": 8,
            }
            for _ in range(20):
                httpx.post(f"{base}/generate", json=slow, timeout=30).raise_for_status()
            rows = []
            for level in args.levels:
                payload = {"prompt": "a red ball bouncing", "memory": {"k": 0}}
                bare = asyncio.run(_load(f"{base}/bare", payload, level, args.requests))
                generate = asyncio.run(_load(f"{base}/generate", payload, level, args.requests))
                rows.append(
                    {
                        "concurrency": level,
                        "bare": bare,
                        "generate": generate,
                        "throughput_ratio": generate["requests_per_s"] / bare["requests_per_s"],
                        "p50_ratio": generate["p50_ms"] / bare["p50_ms"],
                        "p99_ratio": generate["p99_ms"] / bare["p99_ms"],
                    }
                )
            busy = httpx.get(f"{base}/metrics").text
        finally:
            for process in (server, worker):
                process.terminate()
            for process in (server, worker):
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
            log.close()
        redis.Redis.from_url(REDIS_URL).flushdb()
    worker_busy = any(
        line.startswith("ditmem_step_seconds_count") and float(line.split()[-1]) > 0
        for line in busy.splitlines()
    )
    print(
        json.dumps({"machine": "2 CPU cores", "worker_busy": worker_busy, "levels": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
