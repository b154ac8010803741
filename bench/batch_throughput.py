"""Batch generation on the toy preset: ``ditmem batch`` in-process vs ``--server``.

One 32-prompt file, three ways, one after the other in one run:

1. in-process: ``ditmem batch PROMPTS --out DIR`` (the model loaded in the command);
2. ``--server`` against ``ditmem serve`` in embedded mode (one worker thread in the API);
3. ``--server`` against ``ditmem serve`` on Redis with 2 ``ditmem worker`` processes, each
   given one of the 2 cores (``OMP_NUM_THREADS=1``).

The rate is videos per second from the first video started to the last one placed (what each
command prints): loading the model (in-process) or starting the service is left out, because a
running service has paid for it already. Every run makes the same 32 videos with the same seeds
into its own folder. ``--repeats`` rounds of the three (in turn, so a slow moment of the
machine hits all three alike); the table gives each one's median.

    python -m bench.batch_throughput [--prompts 32] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/10"
MOTIONS = ("moving left", "moving right", "falling", "bouncing")
COLOURS = ("red", "green", "blue", "yellow", "white", "magenta", "cyan", "orange")
RESULT = re.compile(
    r"(\d+) made, (\d+) already there, (\d+) failed .*?([\d.]+) videos/s over ([\d.]+) s"
)


def _environment(root: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "DITMEM_PRESET": "toy",
        "DITMEM_DEVICE": "cpu",
        "DITMEM_BANK_DIR": str(root / "bank"),
        "DITMEM_RESULTS_DIR": str(root / "results"),
        "DITMEM_UPLOADS_DIR": str(root / "uploads"),
        "DITMEM_MAX_QUEUED_PER_KEY": "64",
        **extra,
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _batch(prompts: Path, out: Path, environment: dict[str, str], *extra: str) -> dict:
    command = [sys.executable, "-m", "ditmem", "batch", str(prompts), "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    match = RESULT.search(done.stdout)
    if done.returncode or not match:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr[-2000:]}")
    made, skipped, failed, rate, making = match.groups()
    return {"made": int(made), "skipped": int(skipped), "failed": int(failed),
            "videos_per_s": float(rate), "making_s": float(making), "command_s": wall,
            "summary": done.stdout.strip().splitlines()[-1]}  # fmt: skip


def _wait_ready(url: str, workers: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/readyz", timeout=2)
            if ready.status_code == 200 and ready.json()["checks"]["workers"] >= workers:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the service at {url} was not ready in {timeout_s:.0f} s")


def _served(prompts: Path, root: Path, workers: int) -> dict:
    """``--server`` against a service: embedded (``workers == 0``) or Celery workers."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    celery = workers > 0
    environment = _environment(root, DITMEM_PORT=str(port), DITMEM_HOST="127.0.0.1")
    if celery:
        environment["DITMEM_REDIS_URL"] = REDIS_URL
        redis.Redis.from_url(REDIS_URL).flushdb()
    processes = [subprocess.Popen([sys.executable, "-m", "ditmem", "serve"], env=environment,
                                  cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)]  # fmt: skip
    for n in range(workers):
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "ditmem", "worker", "--queues", "generate"],
                env=environment
                | {
                    "DITMEM_WORKER_NAME": f"bench-{n}",
                    "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1",
                },
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
    try:
        _wait_ready(url, max(1, workers))
        result = _batch(prompts, root / "out", _environment(root), "--server", url,
                        "--in-flight", "8")  # fmt: skip
        if celery:
            result["per_worker"] = _jobs_per_worker()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
        if celery:
            redis.Redis.from_url(REDIS_URL).flushdb()
    return result


def _jobs_per_worker() -> dict[str, int]:
    from runtime.jobs import RedisJobStore

    store = RedisJobStore(REDIS_URL)
    jobs, _ = store.list("local", 0, 10_000)  # the open-mode caller
    counts: dict[str, int] = {}
    for job in jobs:
        counts[str(job.worker)] = counts.get(str(job.worker), 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    lines = [f"a {COLOURS[n % len(COLOURS)]} square {MOTIONS[n % len(MOTIONS)]}"
             for n in range(args.prompts)]  # fmt: skip
    ways = {
        "in-process": lambda root: _batch(prompts, root / "out", _environment(root)),
        "--server, embedded": lambda root: _served(prompts, root, workers=0),
        "--server, Celery, 2 workers": lambda root: _served(prompts, root, workers=2),
    }
    runs: dict[str, list[dict]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as scratch:
        prompts = Path(scratch) / "prompts.txt"
        prompts.write_text("\n".join(lines) + "\n")
        for repeat in range(args.repeats):
            for number, (name, run) in enumerate(ways.items()):
                runs[name].append(run(Path(scratch) / f"{repeat}-{number}"))
                last = runs[name][-1]
                extra = f", per worker {last['per_worker']}" if "per_worker" in last else ""
                print(f"{name:30s} {last['summary'].split(' in ')[0]}: {last['made']} videos "
                      f"in {last['making_s']:.1f} s = {last['videos_per_s']:.2f} videos/s"
                      f"{extra}", flush=True)  # fmt: skip
    medians = {name: statistics.median(r["videos_per_s"] for r in done)
               for name, done in runs.items()}  # fmt: skip
    base = medians["in-process"]
    print(f"\nmedian of {args.repeats} runs each ({args.prompts} prompts, toy preset):")
    for name, rate in medians.items():
        each = ", ".join(f"{r['videos_per_s']:.2f}" for r in runs[name])
        print(f"{name:30s} {rate:.2f} videos/s = {rate / base:.2f}x in-process  ({each})")
    if args.json:
        payload = {"prompts": args.prompts, "repeats": args.repeats, "runs": runs,
                   "median_videos_per_s": medians,
                   "ratio_to_in_process": {n: r / base for n, r in medians.items()}}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
