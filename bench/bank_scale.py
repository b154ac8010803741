"""The bank at scale: SQLite vs PostgreSQL manifests filled with 100K and 1M synthetic clips.

Clips are synthetic (no video is decoded): clustered unit caption vectors of all-MiniLM-L6-v2's
width (``bench.bank_search``'s mixture), memory tokens of 2 x 8 x 64 bf16 values and a 3 KB
poster, written through ``ClipStore.insert_many`` in batches of 1,000. For each backend and
size it measures, in this order:

* insert rate (clips/s) over the first and the last 10% of the fill: flat means an import
  costs the same per clip at the millionth as at the first;
* the first open of a bank with no index snapshot (the index is built from the manifest and
  saved), then the cold start of a new process to its first search with that snapshot, both
  as separate processes with their peak RSS;
* ``bank.search`` p50/p99 in-process, prompts never seen before (the caption embedder runs
  every time) and repeated (served by the prompt-embedding cache);
* HTTP ``GET /memory/search`` p50/p99 against a real server (uvicorn, embedded mode), one
  request at a time, uncached and cached prompts;
* the same HTTP search while another process adds 1,000 clips one at a time through its own
  ``MemoryBank`` (as workers ingest), with the server applying them as it searches;
* ``GET /memory`` of the first and of the deepest page (keyset cursor just above the oldest
  clip), 50 clips a page.

    python -m bench.bank_scale                        # 100K and 1M, both backends (~40 min)
    python -m bench.bank_scale --sizes 10000 --backends sqlite --json /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import psycopg
import torch

from bench.bank_search import DIM, clustered_unit_vectors
from memory_bank.store import ClipRow, ClipStore, NewClip
from model.tokens import ClipTokens

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
EMBEDDER = "all-MiniLM-L6-v2"
BATCH = 1000
PORT = 8766
DEFAULT_OUT = REPO / "docs" / "bench-results" / "bank_scale_cpu.json"

SERVER = """
import sys
import uvicorn
from ditmem.compose import build_app
from runtime.settings import Settings

uvicorn.run(build_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

# Opens the bank in a fresh process, searches once, prints timings and peak RSS as JSON.
COLD_START = """
import json, resource, sys, time
started = time.perf_counter()
from memory_bank.bank import MemoryBank
from memory_bank.embed import open_text_embedder
embedder = open_text_embedder()
loaded = time.perf_counter()
bank = MemoryBank(sys.argv[1], embedder, database_url=sys.argv[2] or None)
opened = time.perf_counter()
hits = bank.search("a red ball bouncing off a wall", k=5)
searched = time.perf_counter()
bank.close()  # an index built here is snapshotted before the process ends
print(json.dumps({
    "imports_and_embedder_s": loaded - started, "open_s": opened - loaded,
    "first_search_s": searched - opened, "to_first_search_s": searched - loaded,
    "hits": len(hits), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""

# Adds clips one at a time through a MemoryBank of its own, as an ingesting worker does.
ADDER = """
import sys, time
import numpy as np
from bench.bank_scale import synthetic_rows
from memory_bank.bank import ClipToAdd, MemoryBank
from memory_bank.embed import open_text_embedder
root, url, count, first = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
encoder_version = sys.argv[5]
bank = MemoryBank(root, open_text_embedder(), database_url=url)
rng = np.random.default_rng(7)
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
for row in synthetic_rows(first, count, rng, encoder_version):
    bank.add_clips([ClipToAdd(row.clip, row.tokens, row.encoder_version, row.poster_jpeg)])
print(f"added {count} in {time.perf_counter() - started:.2f} s", flush=True)
bank.close()
"""


def synthetic_rows(
    first: int, count: int, rng: np.random.Generator, encoder_version: str
) -> list[ClipRow]:
    """``count`` synthetic clips numbered from ``first`` (their content hashes differ), with
    tokens labelled as the toy encoder's, so the server's worker finds none stale."""
    centers = _centers()
    vectors = clustered_unit_vectors(count, centers, 0.8, rng)
    rows = []
    for offset, vector in enumerate(vectors):
        number = first + offset
        tokens = ClipTokens(
            torch.from_numpy(rng.standard_normal((1, 8, 64), dtype=np.float32)),
            torch.from_numpy(rng.standard_normal((1, 8, 64), dtype=np.float32)),
            torch.tensor([2, 1, 1, 1, 1, 1, 1, 1]),
        )
        clip = NewClip(
            caption=f"synthetic clip {number}: a scene of cluster {number % len(centers)}",
            source_name=f"clip-{number:07d}.mp4",
            content_hash=f"{number:064x}",
            duration_s=4.0, fps=16.0, num_frames=64, width=832, height=480, size_bytes=2_000_000,
            tags=("synthetic", f"part-{number % 10}"),
            embedder=EMBEDDER,
            text_embedding=vector,
        )  # fmt: skip
        rows.append(ClipRow(clip, tokens, encoder_version, rng.bytes(3072), False, None))
    return rows


_CENTERS: list[np.ndarray] = []


def _centers() -> np.ndarray:
    if not _CENTERS:
        generator = np.random.default_rng(1234)
        centers = generator.standard_normal((1000, DIM)).astype(np.float32)
        _CENTERS.append(centers / np.linalg.norm(centers, axis=1, keepdims=True))
    return _CENTERS[0]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "n": len(ordered),
        "p50_ms": 1e3 * statistics.median(ordered),
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1e3 * ordered[-1],
    }


@contextmanager
def postgres_database():
    name = f"ditmem_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def toy_encoder_version() -> str:
    from runtime.builders import load_pipeline_from
    from runtime.settings import Settings

    pipe = load_pipeline_from(Settings(_env_file=None, preset="toy", device="cpu"))
    return pipe.memory_encoder.fingerprint()


def fill(root: Path, url: str | None, size: int, encoder_version: str) -> dict:
    store = ClipStore(root, url)
    rng = np.random.default_rng(0)
    tenth = max(BATCH, size // 10)
    rates: list[tuple[int, float]] = []
    started = time.perf_counter()
    for first in range(0, size, BATCH):
        rows = synthetic_rows(first, min(BATCH, size - first), rng, encoder_version)
        began = time.perf_counter()
        store.insert_many(rows)
        rates.append((first, len(rows) / (time.perf_counter() - began)))
    total_s = time.perf_counter() - started
    store.close()
    head = [rate for first, rate in rates if first < tenth]
    tail = [rate for first, rate in rates if first >= size - tenth]
    return {
        "first_10pct_clips_per_s": statistics.median(head),
        "last_10pct_clips_per_s": statistics.median(tail),
        "wall_s_including_synthesis": total_s,
    }


def _python(code: str, *args: str, env: dict[str, str]) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True
    )
    if completed.returncode:
        raise RuntimeError(completed.stderr[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _environment(root: Path, url: str | None) -> dict[str, str]:
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "DITMEM_PRESET": "toy",
        "DITMEM_DEVICE": "cpu",
        "DITMEM_BANK_DIR": str(root),
        "DITMEM_RESULTS_DIR": str(root.parent / "results"),
        "DITMEM_UPLOADS_DIR": str(root.parent / "uploads"),
    }
    environment.pop("DITMEM_REDIS_URL", None)
    if url:
        environment["DITMEM_DATABASE_URL"] = url
    return environment


def _bank_search(root: Path, url: str | None, prompts: list[str]) -> dict:
    from memory_bank.bank import MemoryBank
    from memory_bank.embed import open_text_embedder

    with MemoryBank(root, open_text_embedder(), database_url=url) as bank:
        for prompt in prompts[:10]:
            bank.search(prompt, k=5)
        fresh = []
        for prompt in prompts[10:]:
            began = time.perf_counter()
            bank.search(prompt, k=5)
            fresh.append(time.perf_counter() - began)
        cached = []
        for prompt in prompts[10:]:
            began = time.perf_counter()
            bank.search(prompt, k=5)
            cached.append(time.perf_counter() - began)
    return {"uncached": percentiles(fresh), "cached": percentiles(cached)}


def _http_searches(client: httpx.Client, prompts: list[str]) -> list[float]:
    seconds = []
    for prompt in prompts:
        began = time.perf_counter()
        response = client.get("/memory/search", params={"q": prompt, "k": 5})
        seconds.append(time.perf_counter() - began)
        response.raise_for_status()
    return seconds


def _wait_ready(client: httpx.Client, server: subprocess.Popen, timeout: float = 600) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read()[-3000:]}")
        try:
            if client.get("/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready")


def _http(root: Path, url: str | None, size: int, prompts: list[str], encoder_version: str) -> dict:
    environment = _environment(root, url)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(PORT)],
        env=environment, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    results: dict = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=120) as client:
            results["server_ready_s"] = _wait_ready(client, server)
            _http_searches(client, prompts[:10])
            results["search_uncached"] = percentiles(_http_searches(client, prompts[10:]))
            results["search_cached"] = percentiles(_http_searches(client, prompts[10:]))

            adder = subprocess.Popen(
                [sys.executable, "-c", ADDER, str(root), url or "", "1000", str(size),
                 encoder_version],
                env=environment, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert adder.stdout.readline().strip() == "ready"
            adder.stdin.write("go\n")
            adder.stdin.flush()
            done = threading.Event()
            report: list[str] = []

            def wait_adder() -> None:
                report.extend(adder.stdout.read().splitlines())
                adder.wait()
                done.set()

            threading.Thread(target=wait_adder, daemon=True).start()
            during: list[float] = []
            index = 0
            while not done.is_set():
                # Prompts cycle through the cache: the time is the bank's, not the embedder's.
                during += _http_searches(client, [prompts[10 + index % (len(prompts) - 10)]])
                index += 1
            if adder.returncode:
                raise RuntimeError("the adding process failed")
            results["search_while_adding_1000"] = {**percentiles(during), "adder": report}
            listed = client.get("/memory", params={"limit": 1}).json()
            results["clips_after_adding"] = listed["total"]

            deepest = 51  # clip ids start at 1: the page below this cursor is the oldest 50
            for name, params in (("first_page", {}), ("deepest_page", {"cursor": deepest})):
                seconds = []
                for _ in range(60):
                    began = time.perf_counter()
                    response = client.get("/memory", params={"limit": 50, **params})
                    seconds.append(time.perf_counter() - began)
                    response.raise_for_status()
                    assert len(response.json()["items"]) == 50
                results[f"list_{name}"] = percentiles(seconds[10:])
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results


def run(backend: str, size: int, scratch: Path, prompts: list[str], encoder: str) -> dict:
    root = scratch / f"{backend}-{size}" / "bank"
    root.mkdir(parents=True)
    with postgres_database() if backend == "postgresql" else _no_database() as url:
        print(f"[{backend} {size}] filling", flush=True)
        result: dict = {"backend": backend, "clips": size, "insert": fill(root, url, size, encoder)}
        environment = _environment(root, url)
        print(f"[{backend} {size}] first open without a snapshot", flush=True)
        result["open_without_snapshot"] = _python(COLD_START, str(root), url or "", env=environment)
        print(f"[{backend} {size}] cold start with the snapshot", flush=True)
        result["cold_start_with_snapshot"] = _python(
            COLD_START, str(root), url or "", env=environment
        )
        print(f"[{backend} {size}] bank.search", flush=True)
        result["bank_search"] = _bank_search(root, url, prompts)
        print(f"[{backend} {size}] HTTP", flush=True)
        result["http"] = _http(root, url, size, prompts, encoder)
    print(json.dumps(result, indent=2), flush=True)
    return result


@contextmanager
def _no_database():
    yield None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--prompts", type=int, default=310)
    parser.add_argument("--scratch", type=Path, default=None, help="where banks are built")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    prompts = [
        f"prompt {i}: a {['red', 'blue', 'green'][i % 3]} ball rolling {i % 7} metres"
        for i in range(args.prompts)
    ]
    runs = []
    encoder = toy_encoder_version()
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for size in args.sizes:
            for backend in args.backends:
                runs.append(run(backend, size, Path(scratch), prompts, encoder))
    report = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
