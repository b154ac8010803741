"""Bulk import on the fleet: throughput of ``ditmem memory import`` fanned out to 1 vs 2 workers.

64 toy clips (lossless, 8 frames of 16x16) are imported into a fresh bank through Redis and real
``ditmem worker`` processes on the toy preset, each limited to one thread, first with one
worker, then with two. The clock runs from the first job sent to the last one finished, read
from the job records (the importer's own start-up is the same in both runs and left out).

    python -m bench.fleet_import [--clips 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/11"


def _environment(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # one thread per worker: the ratio measures workers, not cores
        "MKL_NUM_THREADS": "1",
        "DITMEM_PRESET": "toy",
        "DITMEM_DEVICE": "cpu",
        "DITMEM_REDIS_URL": REDIS_URL,
        "DITMEM_BANK_DIR": str(root / "bank"),
        "DITMEM_RESULTS_DIR": str(root / "results"),
        "DITMEM_UPLOADS_DIR": str(root / "uploads"),
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_clips(folder: Path, count: int) -> Path:
    from ditmem.toy import bank_specs, write_toy_clip

    specs = bank_specs(max(1, count // 16), seed=0)[:count]
    rows = ["video,caption"]
    for index, spec in enumerate(specs):
        name = f"toy-{index:03d}.mkv"
        write_toy_clip(spec, folder / name)
        rows.append(f"{name},{spec.caption} number {index}")
    captions = folder / "captions.csv"
    captions.write_text("\n".join(rows) + "\n")
    return captions


def _run(workers: int, clips: Path, captions: Path, root: Path) -> dict:
    from memory_bank.bulk import read_caption_rows
    from runtime.builders import open_bank, open_storages
    from runtime.bulk_import import fan_out_import
    from runtime.celery_app import make_celery
    from runtime.dispatch import CeleryDispatcher
    from runtime.jobs import RedisJobStore
    from runtime.settings import Settings

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    environment = _environment(root)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "ditmem", "worker"],
            env=environment | {"DITMEM_WORKER_NAME": f"bench-{n}"},
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for n in range(workers)
    ]
    try:
        deadline = time.monotonic() + 180
        while client.zcard("ditmem:workers") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start")
            time.sleep(0.2)
        settings = Settings(
            _env_file=None, preset="toy", redis_url=REDIS_URL, bank_dir=root / "bank",
            results_dir=root / "results", uploads_dir=root / "uploads",
        )  # fmt: skip
        store, storages = RedisJobStore(REDIS_URL), open_storages(settings)
        celery = make_celery(settings)
        with open_bank(settings, storages) as bank:
            importer_cpu = time.process_time()
            workers_cpu = sum(_cpu_seconds(process.pid) for process in processes)
            summary = fan_out_import(
                read_caption_rows(captions), clips, bank=bank, store=store,
                dispatcher=CeleryDispatcher(celery, store.redis), uploads=storages.uploads,
                owner="bench", progress=False, poll_s=0.1,
            )  # fmt: skip
            importer_cpu = time.process_time() - importer_cpu
            workers_cpu = sum(_cpu_seconds(process.pid) for process in processes) - workers_cpu
        celery.close()
        # The jobs' own clocks: from the first row sent to the last one finished, so how often
        # the importer polls changes nothing.
        jobs, _ = store.list("bench", 0, 100_000)
        first = min(job.created_at for job in jobs)
        seconds = (max(job.finished_at for job in jobs) - first).total_seconds()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
        client.flushdb()
    if summary.rejected or summary.imported != summary.total:
        raise RuntimeError(f"import incomplete: {summary}")
    return {
        "workers": workers, "clips": summary.imported, "seconds": seconds,
        "clips_per_s": summary.imported / seconds, "per_worker": dict(summary.workers),
        # Where the 2 cores went while importing (CPU seconds of each side).
        "importer_cpu_s": importer_cpu, "workers_cpu_s": workers_cpu,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (the median)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs, ratios = [], []
    with tempfile.TemporaryDirectory() as scratch:
        clips = Path(scratch) / "clips"
        clips.mkdir()
        captions = _write_clips(clips, args.clips)
        for repeat in range(args.repeats):
            pair = [
                _run(workers, clips, captions, Path(scratch) / f"run-{repeat}-{workers}")
                for workers in (1, 2)
            ]
            ratios.append(pair[1]["clips_per_s"] / pair[0]["clips_per_s"])
            runs += pair
    for run in runs:
        print(f"{run['workers']} worker(s): {run['clips']} clips in {run['seconds']:.1f} s "
              f"= {run['clips_per_s']:.2f} clips/s  {run['per_worker']}  CPU s: importer "
              f"{run['importer_cpu_s']:.2f}, workers {run['workers_cpu_s']:.2f}")  # fmt: skip
    ratio = statistics.median(ratios)
    rounded = [round(r, 2) for r in ratios]
    print(f"throughput ratio 2 vs 1 workers: median {ratio:.2f}x of {rounded}")
    if args.json:
        payload = {"runs": runs, "ratios": ratios, "median_ratio": ratio}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
